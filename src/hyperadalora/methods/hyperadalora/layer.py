"""`SVDLinear`: a linear layer with an SVD-form adapter ``(alpha / r) * P diag(lambda * mask) Q``.

The layer holds no trainable adapter parameter. Before each forward the model hands it the tensors of the
step (`set_tensors`): views of the hypernetworks' batched outputs while training, or fixed tensors once
the hypernetworks are dropped (`set_fixed`, after `load_adapter` or `drop_hypernetworks`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...quantization import is_conv1d, layer_features
from ...tuner_utils import ADAPTABLE, add_product, flat_base_forward, is_adaptable
from ...wrapper import BaseAdapterLayer
from ..base import RoleSpec


class SVDLinear(BaseAdapterLayer):
    """``base(x) + scaling * (dropout(x) Q^T diag(lambda)) P^T``, with the step's tensors set by the model."""

    # how HyperAdaLoRA's hypernetworks generate each tensor (see `methods.base.RoleSpec`): P (out, r) one token per
    # row, lambda one token per rank, Q (r, in) one token per column
    ROLES = {"P": RoleSpec(rank_axis=1), "lambda": RoleSpec(rank_axis=1), "Q": RoleSpec(rank_axis=0)}

    def __init__(self, base_layer: nn.Module, index: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"SVDLinear wraps {ADAPTABLE} layers, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)  # a transformers Conv1D: W0 stored (in, out)
        self.index = index
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = layer_features(base_layer)
        self.P: Optional[torch.Tensor] = None        # (out_features, r)
        self.lam: Optional[torch.Tensor] = None      # (r,), already masked
        self.Q: Optional[torch.Tensor] = None        # (r, in_features)
        self.disabled = False

    def set_tensors(self, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> None:
        self.P, self.lam, self.Q = P, lam, Q

    def set_fixed(self, P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> None:
        """Freeze the adapter to these tensors (stored as buffers, so `.to()` moves them)."""
        for name in ("P", "lam", "Q"):
            if name in self._buffers:
                del self._buffers[name]
            if hasattr(self, name):
                delattr(self, name)
        self.register_buffer("P", P.detach().clone())
        self.register_buffer("lam", lam.detach().clone())
        self.register_buffer("Q", Q.detach().clone())

    @property
    def rank(self) -> int:
        return 0 if self.lam is None else int((self.lam != 0).sum())

    def delta_weight(self) -> torch.Tensor:
        """``scaling * P diag(lam) Q``, the update to add to the base weight (out x in)."""
        return (self.P * (self.lam * self.scaling)) @ self.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.P is None or self.P.shape[1] == 0:
            return self.base_layer(x)
        lead = x.shape[:-1]
        x, out = flat_base_forward(self.base_layer, x)
        P, lam, Q = self.P, self.lam, self.Q
        dtype = x.dtype if torch.is_floating_point(x) else P.dtype
        if P.dtype != dtype:
            P, lam, Q = P.to(dtype), lam.to(dtype), Q.to(dtype)
        scale = lam * self.scaling
        x = self.dropout(x)
        if x.numel() > Q.numel():
            # more tokens than input features: scale Q's rows (r x in) rather than the activations (tokens x r).
            # Either way backward keeps one (tokens x r) activation for P's gradient; scaling the activations
            # would keep a second one for lambda's gradient, scaling Q keeps an (r x in) matrix instead
            h = x @ (Q * scale[:, None]).t()
        else:
            h = (x @ Q.t()) * scale
        return add_product(out, h, P).view(*lead, out.shape[-1])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, index={self.index}, scaling={self.scaling:g}"
