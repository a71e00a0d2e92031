"""Rank allocation: AdaLoRA's budget schedule and global pruning of singular values.

The allocator works on tensors handed to it (importance scores of shape ``(n_layers, init_r)``), never on
parameter names, so it drives generated tensors (HyperAdaLoRA) as well as trained ones.

Steps are counted in *optimizer steps completed*: `update` is called with ``step = 1`` after the first
optimizer step and ``step = total_step`` after the last one.

Budget (total number of kept ranks over all layers), AdaLoRA's cubic schedule::

    step <= tinit                   : init_budget   = init_r * n_layers
    step >= total_step - tfinal     : target_budget = target_r * n_layers
    otherwise                       : target + (init - target) * (1 - (step - tinit) / (total_step - tfinal - tinit)) ** 3

Masking happens every ``deltaT`` steps while the budget shrinks, and at every step from
``total_step - tfinal`` on (a no-op once the target is reached). A masking keeps the ``budget`` most
important ranks among those still kept (a pruned rank stays pruned), so after it exactly
``min(budget, kept)`` ranks are kept; since the budget never rises, that is the budget.
"""

from __future__ import annotations

from typing import Optional

import torch


def budget_at(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int) -> int:
    """The global rank budget after ``step`` optimizer steps (non-increasing in ``step``)."""
    if step <= tinit:
        return init_budget
    end = total_step - tfinal
    if step >= end:
        return target_budget
    frac = 1.0 - (step - tinit) / (end - tinit)
    return int(target_budget + (init_budget - target_budget) * frac ** 3)


class RankAllocator:
    """Keeps the rank masks of ``n_layers`` adapters of rank ``init_r`` and prunes them on schedule.

    Args:
        importance: ``magnitude`` (|lambda|, the paper) or ``sensitivity`` (AdaLoRA: EMA of |x * dL/dx|
            times the EMA of its uncertainty, summed over the rank's lambda and mean over its P column and
            Q row).
    """

    def __init__(self, n_layers: int, init_r: int, target_r: int, total_step: int, tinit: int = 0, tfinal: int = 0,
                 deltaT: int = 1, importance: str = "magnitude", beta1: float = 0.85, beta2: float = 0.85,
                 device: Optional[torch.device] = None):
        if total_step is None:
            raise ValueError("total_step is required for rank allocation: set it to the run's number of optimizer steps.")
        if tinit + tfinal >= total_step:
            raise ValueError(f"tinit + tfinal = {tinit + tfinal} >= total_step = {total_step}: lower tinit/tfinal "
                             f"or raise total_step.")
        if not 0 <= target_r <= init_r:
            raise ValueError(f"target_r={target_r} must be in [0, init_r={init_r}].")
        self.n_layers, self.init_r, self.target_r = n_layers, init_r, target_r
        self.total_step, self.tinit, self.tfinal, self.deltaT = total_step, tinit, tfinal, deltaT
        self.importance, self.beta1, self.beta2 = importance, beta1, beta2
        self.init_budget, self.target_budget = init_r * n_layers, target_r * n_layers
        self.mask = torch.ones(n_layers, init_r, dtype=torch.bool, device=device)
        self.ipt: Optional[torch.Tensor] = None   # EMA of the sensitivity, (n_layers, init_r) per component
        self.unc: Optional[torch.Tensor] = None
        self.last_step = 0
        self.n_maskings = 0

    # ---------------------------------------------------------------- schedule
    def budget(self, step: int) -> int:
        return budget_at(step, self.init_budget, self.target_budget, self.tinit, self.tfinal, self.total_step)

    def is_masking_step(self, step: int) -> bool:
        if step >= self.total_step - self.tfinal:
            return True
        return step > self.tinit and step % self.deltaT == 0

    @property
    def total_rank(self) -> int:
        return int(self.mask.sum())

    @property
    def ranks(self) -> list[int]:
        return self.mask.sum(dim=1).tolist()

    # ---------------------------------------------------------------- scores
    def update_sensitivity(self, components: torch.Tensor) -> None:
        """components: (C, n_layers, init_r) instant sensitivities |x * grad| of the rank's tensors."""
        s = components.detach().float()
        if self.ipt is None:
            self.ipt, self.unc = torch.zeros_like(s), torch.zeros_like(s)
        self.ipt.mul_(self.beta1).add_(s, alpha=1 - self.beta1)
        self.unc.mul_(self.beta2).add_((s - self.ipt).abs(), alpha=1 - self.beta2)

    def scores(self, magnitude: Optional[torch.Tensor]) -> torch.Tensor:
        if self.importance == "magnitude":
            if magnitude is None:
                raise ValueError("importance='magnitude' needs the singular values.")
            return magnitude.detach().abs().float()
        if self.ipt is None:
            raise RuntimeError("importance='sensitivity' needs update_sensitivity() before masking "
                               "(the generated tensors had no gradient: was backward() called?).")
        return (self.ipt * self.unc).sum(dim=0)

    # ---------------------------------------------------------------- pruning
    def prune_to(self, budget: int, scores: torch.Tensor) -> bool:
        """Keep the ``budget`` highest-scoring ranks among the kept ones. Returns True if the mask changed."""
        kept = self.total_rank
        if budget >= kept:
            return False
        flat_mask = self.mask.flatten()
        s = scores.to(self.mask.device).flatten().float().clone()
        s[~flat_mask] = float("-inf")
        s = torch.where(flat_mask, torch.nan_to_num(s, nan=torch.finfo(s.dtype).min), float("-inf"))  # pruned < NaN
        new = torch.zeros_like(flat_mask)
        if budget > 0:
            # stable order: equal scores keep the lower index, deterministic on every process
            order = torch.argsort(-s, stable=True)[:budget]
            new[order] = True
        new &= flat_mask
        self.mask = new.view_as(self.mask)
        self.n_maskings += 1
        return True

    def update(self, step: int, magnitude: Optional[torch.Tensor] = None,
               sensitivity: Optional[torch.Tensor] = None) -> bool:
        """Called once per optimizer step (after it). Returns True if the masks changed."""
        self.last_step = step
        if sensitivity is not None and self.importance == "sensitivity":
            self.update_sensitivity(sensitivity)
        if not self.is_masking_step(step):
            return False
        budget = self.budget(step)
        if budget >= self.total_rank:
            return False
        return self.prune_to(budget, self.scores(magnitude))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"mask": self.mask.clone(), "ipt": None if self.ipt is None else self.ipt.clone(),
                "unc": None if self.unc is None else self.unc.clone(), "last_step": self.last_step,
                "n_maskings": self.n_maskings}

    def load_state_dict(self, state: dict) -> None:
        mask = state["mask"]
        if tuple(mask.shape) != tuple(self.mask.shape):
            raise ValueError(f"rank mask of shape {tuple(mask.shape)} does not fit {tuple(self.mask.shape)} "
                             f"(n_layers x init_r).")
        self.mask = mask.to(self.mask.device, torch.bool).clone()
        self.ipt = None if state.get("ipt") is None else state["ipt"].to(self.mask.device, copy=True)
        self.unc = None if state.get("unc") is None else state["unc"].to(self.mask.device, copy=True)
        self.last_step = int(state.get("last_step", 0))
        self.n_maskings = int(state.get("n_maskings", 0))
