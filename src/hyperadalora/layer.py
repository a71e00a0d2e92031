"""`SVDLinear`: a linear layer with an SVD-form adapter ``(alpha / r) * P diag(lambda * mask) Q``.

The layer holds no trainable adapter parameter. Before each forward the model hands it the tensors of the
step (`set_tensors`): views of the hypernetworks' batched outputs while training, or fixed tensors once
the hypernetworks are dropped (`set_fixed`, after `load_adapter` or `drop_hypernetworks`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def add_product(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``out + h @ B^T`` for a linear layer's output ``out`` (tokens, d_out), ``h`` (tokens, r), ``B`` (d_out, r).

    The product is accumulated into ``out`` in place when ``out`` is a fresh 2-D tensor (not a view; what
    `nn.Linear` returns for a 2-D input, see `flat_base_forward`): one fused multiply-add and no (tokens x d_out)
    temporary for the product nor for the sum (3-4% of a MiniLM training step on the CPU). Autograd allows it
    because the base layer's backward does not read its own output. In place on a *view* would make autograd
    copy the whole gradient in backward (CopySlices), so anything else takes ``out + h @ B^T``.
    """
    if (out._base is None and out.dim() == 2 and h.dim() == 2 and out.is_contiguous()
            and h.dtype == out.dtype):
        return out.addmm_(h, B.t().to(out.dtype))
    return out + h @ B.t()


def flat_base_forward(base_layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x2, base_layer(x2))`` with ``x2 = x`` as (tokens, in): for a 3-D input `nn.Linear` returns a *view* of a 2-D
    result, for a 2-D one the result itself, which `add_product` can then add into in place. The caller views the
    sum back to ``x.shape[:-1] + (d_out,)``. A forward hook on the base layer therefore sees (tokens, in)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2, base_layer(x2)


class SVDLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, index: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SVDLinear wraps nn.Linear layers, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.index = index
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.P: Optional[torch.Tensor] = None        # (out_features, r)
        self.lam: Optional[torch.Tensor] = None      # (r,), already masked
        self.Q: Optional[torch.Tensor] = None        # (r, in_features)
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `.weight` of a linear layer keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

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
