"""``hydralora``: HydraLoRA (Tian et al., NeurIPS 2024), an asymmetric LoRA: per layer one shared A and N B heads,
mixed token by token by a router.

``h = W0 x + (lora_alpha / r) * sum_k w_k(x) B_k A x`` with ``w(x) = softmax(W_g x)`` over the N heads, for every
token; A ``(r, d_in)``, B_k ``(d_out, r)`` zero-initialised (identity at step 0), the router ``W_g`` ``(N, d_in)``
randomly initialised (with a zero router every token would weigh the heads equally, the heads would get the same
gradient and stay equal). Here A, the heads and the router are trained directly; ``hyperhydralora`` generates A
and the heads.

Merging is only defined for one head: with N > 1 the weights ``w_k(x)`` depend on the input, so no single weight
matrix gives the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..tuner_utils import add_product
from .base import AdapterLayer, Method, MethodConfig, RoleSpec, register


class HydraLayer(AdapterLayer):
    """One A, ``n_heads`` B heads and a router per layer."""

    ROLES = {"A": RoleSpec(rank_axis=0), "B": RoleSpec(rank_axis=1, zero_start=True)}

    def setup(self, config) -> None:
        self.n_heads = config.n_heads
        self.router = nn.Linear(self.in_features, self.n_heads, bias=False)

    def shapes(self):
        return {"A": [(self.r, self.in_features)], "B": [(self.out_features, self.r)] * self.n_heads}

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(W_g x)`` over the heads, for every token: (..., n_heads), summing to 1."""
        w = self.router.weight
        return torch.softmax(x.to(w.dtype) @ w.t(), dim=-1)

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype(x)
        (A,) = self.tensors("A", dtype)
        B = torch.cat(self.tensors("B", dtype), dim=1)                   # (d_out, N * r): [B_1 ... B_N]
        h = self.dropout(x) @ A.t()                                      # (..., r): the shared A
        w = self.routing_weights(x).to(dtype)                            # (..., N)
        z = (w.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)              # (..., N * r): w_k * A x, head-major
        return add_product(out, z * self.scaling, B)                     # sum_k w_k B_k A x

    def has_lora_form(self) -> bool:  # one head: the router's softmax is 1, the update the fixed B_1 A
        return self.n_heads == 1

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_heads != 1:
            raise ValueError(f"HydraLoRA with n_heads={self.n_heads} weighs its heads per token (a router): it is not "
                             f"a plain LoRA update B @ A and does not export as peft LoRA (n_heads=1 does).")
        (A,), (B,) = self.tensors("A"), self.tensors("B")
        return A.detach().clone(), (B * self.scaling).detach().clone()

    def merged_weight(self) -> torch.Tensor:
        if self.n_heads != 1:
            raise ValueError(
                f"HydraLoRA with n_heads={self.n_heads} cannot be merged into the base weights: its update "
                f"sum_k w_k(x) B_k A x weighs the heads by a router softmax that depends on each input token, so no "
                f"fixed weight matrix reproduces it. Keep the adapter unmerged (save_pretrained / load_adapter), "
                f"or train with n_heads=1 (then w_1 = 1 and the update is the fixed B_1 A).")
        (A,), (B,) = self.tensors("A"), self.tensors("B")
        weight = self.base_weight()
        return weight + ((B @ A) * self.scaling).to(weight.dtype)


@dataclass
class HydraLoraConfig(MethodConfig):
    """HydraLoRA: rank ``r`` shared A, ``n_heads`` B heads and a token-wise router per layer, trained directly."""

    method = "hydralora"

    n_heads: int = field(default=3, metadata={"help": "B heads per layer, mixed by the router (HydraLoRA's N)."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.n_heads, bool) or not isinstance(self.n_heads, int):
            raise TypeError(f"n_heads must be an integer, got {self.n_heads!r} ({type(self.n_heads).__name__}).")
        if self.n_heads < 1:
            raise ValueError(f"n_heads={self.n_heads} must be >= 1 (the number of B heads per layer; 1 is plain "
                             f"LoRA with a trivial router).")


METHOD = register(Method("hydralora", HydraLoraConfig, HydraLayer,
                         description="HydraLoRA: shared A, N router-weighted B heads per layer"))
