"""`HyperAdaLoraModel`: generated AdaLoRA, as an `AdapterModel` with HyperAdaLoRA's hooks.

Three generated roles (P, lambda, Q) plus what AdaLoRA adds on top of LoRA (as peft's ``AdaLoraModel`` does on
``LoraModel`` + ``RankAllocator``): the rank mask applied when the tensors are installed, the orthogonal penalty in
the loss, the rank allocator after the optimizer step, the mask version in the cache key, the adapter saved sliced
to the kept ranks, and `export_lora`.

Training step, as with peft's AdaLoRA::

    out = model(**batch)                 # generates P, lambda, Q; out.loss includes gamma * orthogonal penalty
    out.loss.backward()
    optimizer.step()
    model.update_and_allocate(step)      # step = optimizer steps done (1-based); re-masks on schedule
    optimizer.zero_grad()

`update_and_allocate` also commits the recurrent state. If nobody calls it, the model notices that the
hypernetworks were updated at the next forward, commits the state itself and warns once that rank allocation is
not running (peft #1327): use `HyperAdaLoraTrainer`, or `RankAllocationCallback` with a `Trainer`.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ...config import CONFIG_NAME, HyperAdaLoraConfig
from ...export import export, lora_weights
from ...generator import RoleGenerator
from ...quantization import dequantized_weight, quantization_kind
from ...tuner_utils import (HYPERNET_WEIGHTS_NAME, check_rank_fits, full_precision,
                            principal_subspaces, save_safetensors, world_size)
from ..adapter_files import refuse_misfit
from ..adapter_model import AdapterModel
from .allocation import RankAllocator
from .layer import SVDLinear


class HyperAdaLoraModel(AdapterModel):
    """A transformers model with HyperAdaLoRA adapters.

    Attributes:
        base_model: the wrapped transformers model (its target nn.Linear replaced by `SVDLinear`).
        generators: ``{"P", "lambda", "Q"}`` -> `RoleGenerator` (absent once the hypernetworks are dropped).
        allocator: the `RankAllocator` holding the rank masks.
    """

    METHOD = "hyperadalora"
    ALLOCATES_RANK = True
    CONFIG_NAME = CONFIG_NAME
    ROLES = ("P", "lambda", "Q")

    # ------------------------------------------------------------------ set-up hooks
    def _check(self, model: nn.Module, generated: tuple) -> None:
        config = self.peft_config
        if not generated:
            return
        if config.total_step is None:
            raise ValueError("HyperAdaLoraConfig.total_step is required for training: set it to the number of "
                             "optimizer steps of the run (as for peft's AdaLoraConfig).")
        if config.init == "principal":
            check_rank_fits(model, self.target_names, config.init_r, "init_r",
                            "init='principal' seeds P and Q with the top init_r singular vectors of the layer's "
                            "weight, and it has min(in_features, out_features) of them", "use init='orthonormal'")
        if config.basis == "orthonormal":
            check_rank_fits(model, self.target_names, config.init_r, "init_r",
                            "basis='orthonormal' makes the init_r columns of P and rows of Q orthonormal, which "
                            "needs init_r <= min(in_features, out_features)", "use basis='free' or 'unit'")

    def _make_layer(self, base: nn.Linear, index: int, generated: tuple) -> SVDLinear:
        config = self.peft_config
        return SVDLinear(base, index, config.lora_alpha / config.init_r, config.lora_dropout)

    def _setup(self, trained_only: bool, device: torch.device) -> None:
        config = self.peft_config
        self.allocator = RankAllocator(self.n_layers, config.init_r, config.target_r, config.total_step or 1,
                                       config.tinit if not trained_only else 0, config.tfinal if not trained_only else 0,
                                       config.deltaT, config.importance, config.beta1, config.beta2, device=device)
        self._mask_version = 0
        self._warned_no_allocate = False
        self._allocate_called = False
        self.mask_divergences = 0                  # multi-process: masks replaced by process 0's (should stay 0)
        # importance='sensitivity' under gradient accumulation: the gradients of the generated tensors of this
        # optimizer step's earlier micro-batches (role order of ROLES), summed (`_carry_step_grads`)
        self._step_grads: Optional[list] = None

    def _build_generators(self, generated: tuple) -> tuple[nn.ModuleDict, dict]:
        config, n, r = self.peft_config, self.n_layers, self.peft_config.init_r
        gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # hypernetwork initialisation independent of the caller's RNG
        seed_pq = "normal" if config.init == "normal" else "orthonormal"
        seeds_p = seeds_q = None
        if config.init == "principal":
            seeds_p, seeds_q = principal_subspaces(self.adapters, r)
        generators = nn.ModuleDict({
            "P": RoleGenerator("P", [a.out_features for a in self.adapters], r, 1, seed_pq, config, gen,
                               seeds_p, compact_offset=True, basis=config.basis),
            "lambda": RoleGenerator("lambda", [r] * n, 1, 0, "normal" if config.init == "normal" else "zeros",
                                    config, gen),
            "Q": RoleGenerator("Q", [a.in_features for a in self.adapters], r, 1, seed_pq, config, gen,
                               seeds_q, compact_offset=True, basis=config.basis),
        })
        return generators, {}

    # ------------------------------------------------------------------ generation hooks
    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda(): also move the rank masks along
        result = super()._apply(fn, *args, **kwargs)
        alloc = self.__dict__.get("allocator")
        if alloc is not None:
            alloc.mask = fn(alloc.mask)
            alloc.ipt = None if alloc.ipt is None else fn(alloc.ipt)
            alloc.unc = None if alloc.unc is None else fn(alloc.unc)
        return result

    def _install(self, outs: dict) -> None:
        """Hand each layer its views: P (out, r), lambda*mask (r,), Q (r, in)."""
        lam = outs["lambda"][0][..., 0] * self.allocator.mask.to(outs["lambda"][0].dtype)  # (n, r): one group
        Ps, Qs = self.generators["P"].per_layer(outs["P"]), self.generators["Q"].per_layer(outs["Q"])
        for layer, P, l, Qt in zip(self.adapters, Ps, lam, Qs):
            layer.set_tensors(P, l, Qt.t())

    def _cache_extra(self) -> tuple:
        return (self._mask_version, self.allocator.last_step)

    def _before_commit(self, auto: bool) -> None:
        if auto and not self._allocate_called and not self._warned_no_allocate:
            warnings.warn("HyperAdaLoRA: the hypernetworks were updated but update_and_allocate() was not called: "
                          "the rank budget is not being allocated. Call model.update_and_allocate(step) after "
                          "optimizer.step(), train with hyperadalora.HyperAdaLoraTrainer, or add "
                          "hyperadalora.RankAllocationCallback() to your Trainer.", stacklevel=5)
            self._warned_no_allocate = True

    def _after_training_generation(self, outs: dict) -> None:
        if self.peft_config.importance == "sensitivity":
            self._carry_step_grads()
            for tensors in outs.values():
                for t in tensors:
                    if t.requires_grad:
                        t.retain_grad()

    def _carry_step_grads(self) -> None:
        """Before a training generation replaces the last one: if that one belongs to this optimizer step (not
        committed: the hypernetworks were not updated since; and their parameters hold gradients: no zero_grad since),
        add its tensors' gradients to the step's sum. Every micro-batch of a step generates its own tensors, whose
        ``.grad`` is that micro-batch's only; with the sum `_sensitivity` reads the gradient of the whole step, as
        peft's AdaLoRA reads ``p.grad``, which accumulates over the micro-batches."""
        prev = self._pending
        if (prev is None or self._pending_committed
                or not any(p.grad is not None for p in self.generators.parameters())):
            self._step_grads = None   # a new step
            return
        grads = [[t.grad for t in prev[role]] for role in self.ROLES]
        if any(g is None for gs in grads for g in gs):
            return   # a training forward without backward: nothing to add
        if self._step_grads is None:
            self._step_grads = grads
        else:
            self._step_grads = [[a + g for a, g in zip(acc, gs)] for acc, gs in zip(self._step_grads, grads)]

    # ------------------------------------------------------------------ loss
    @property
    def penalty_weight(self) -> float:
        return self.peft_config.orth_reg_weight

    def penalty(self, outs: dict) -> Optional[torch.Tensor]:
        return self.orthogonal_penalty(outs) if self.peft_config.orth_reg_weight > 0 else None

    def penalty_logs(self) -> dict:
        """The last orthogonal penalty and the generated tensors' norm, for the training log."""
        if self.last_penalty is None:
            return {}
        return {"orth_penalty": float(self.last_penalty), "gen_norm": self.generated_norm()}

    def generated_norm(self) -> float:
        """Mean Frobenius norm of the rows of the generated P and Q of the last training step (watch for recurrent
        drift); NaN before the first."""
        if not self._pending:
            return float("nan")
        norms = [t.detach().flatten(1).norm(dim=1) for role in ("P", "Q") for t in self._pending[role]]
        return float(torch.cat(norms).mean())

    @staticmethod
    def _gram_penalty(groups: list[torch.Tensor]) -> torch.Tensor:
        """sum over layers of ||M^T M - I||_F^2 for token matrices M (n, L, r) (P, and Q^T)."""
        total = 0.0
        for m in groups:
            gram = m.transpose(1, 2) @ m
            eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
            total = total + ((gram - eye) ** 2).sum()
        return total

    def orthogonal_penalty(self, outs: Optional[dict] = None) -> torch.Tensor:
        """mean over layers of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 on the generated (or fixed) tensors."""
        if outs is None and not self.fixed:
            outs = self._pending if self._pending is not None else self._generate(track=False)
        if outs is None:  # fixed adapters
            total = sum(((a.P.t() @ a.P - torch.eye(a.P.shape[1], device=a.P.device)) ** 2).sum()
                        + ((a.Q @ a.Q.t() - torch.eye(a.Q.shape[0], device=a.Q.device)) ** 2).sum()
                        for a in self.adapters)
            return torch.as_tensor(total) / self.n_layers
        with full_precision(outs["P"][0].device):
            return (self._gram_penalty(outs["P"]) + self._gram_penalty(outs["Q"])) / self.n_layers

    # ------------------------------------------------------------------ rank allocation
    def _sensitivity(self) -> Optional[torch.Tensor]:
        """(3, n_layers, init_r) instant sensitivities |x * grad| of the generated P, lambda, Q: per group of
        stacked layers (no loop over layers), mean over a rank's P column / Q row; ``grad`` that of the whole
        optimizer step (the micro-batches' sum, `_carry_step_grads`)."""
        outs = self._pending
        if outs is None or any(t.grad is None for ts in outs.values() for t in ts):
            return None
        grads = {role: [t.grad for t in outs[role]] for role in self.ROLES}
        if self._step_grads is not None:  # the step's earlier micro-batches (gradient accumulation)
            grads = {role: [acc + g for acc, g in zip(self._step_grads[i], grads[role])]
                     for i, role in enumerate(self.ROLES)}
        world = world_size()
        if world > 1:  # the gradients a single process would see for the global batch (as DDP does for phi)
            flat = torch.cat([g.flatten() for role in self.ROLES for g in grads[role]])
            dist.all_reduce(flat)
            flat /= world
            parts = iter(flat.split([g.numel() for role in self.ROLES for g in grads[role]]))
            grads = {role: [next(parts).view_as(g) for g in grads[role]] for role in self.ROLES}
        comps = []
        for role in self.ROLES:
            per_role = None
            for g, (t, grad) in enumerate(zip(outs[role], grads[role])):
                s = (t.detach() * grad).abs()                     # (n_g, L, w)
                s = s[..., 0] if role == "lambda" else s.mean(dim=1)  # (n_g, init_r)
                if per_role is None:
                    per_role = s.new_zeros(self.n_layers, s.shape[-1])
                per_role.index_copy_(0, self._group_members(role, g, s.device), s)
            comps.append(per_role)
        return torch.stack(comps)

    def _group_members(self, role: str, group: int, device) -> torch.Tensor:
        """Layer indices of a role's group g, in the group's stacking order (cached)."""
        cache = self.__dict__.setdefault("_members_cache", {})
        key = (role, group, str(device))
        if key not in cache:
            slots = self.generators[role].layer_slot
            members = sorted((pos, i) for i, (g, pos) in enumerate(slots) if g == group)
            cache[key] = torch.tensor([i for _, i in members], dtype=torch.long, device=device)
        return cache[key]

    def _sync_masks(self) -> bool:
        """Multi-process training: every rank takes rank 0's masks (a safety net; they are computed from identical
        values on every rank). Returns True if this rank's masks differed."""
        shared = self.allocator.mask.to(torch.uint8)
        dist.broadcast(shared, src=0)
        shared = shared.bool()
        if torch.equal(shared, self.allocator.mask):
            return False
        self.mask_divergences += 1
        warnings.warn(f"HyperAdaLoRA: the rank masks of process {dist.get_rank()} differed from process 0's; "
                      f"process 0's were taken ({self.mask_divergences} time(s) so far).", stacklevel=3)
        self.allocator.mask = shared
        return True

    @torch.no_grad()
    def update_and_allocate(self, global_step: int) -> bool:
        """After ``optimizer.step()`` (and before ``zero_grad()``): commit the state, update the importance and
        re-mask on schedule. ``global_step`` counts optimizer steps done, 1 after the first. Returns True if
        the masks changed.

        Under torch.distributed (DDP) every process must call it at every step: the gradients of the generated
        tensors are averaged over the processes before the sensitivity is computed (as DDP averages the
        hypernetworks' gradients) and, on masking steps, the masks of process 0 are broadcast to all."""
        if self.fixed:
            raise RuntimeError("This adapter's hypernetworks were dropped (loaded or finalised): it cannot train.")
        if global_step is None:
            raise TypeError("HyperAdaLoRA's update_and_allocate needs global_step, the optimizer steps done (1 after "
                            "the first): the rank budget follows it.")
        self._allocate_called = True
        sensitivity = self._sensitivity() if self.peft_config.importance == "sensitivity" else None
        self._step_grads = None
        magnitude = None if self._pending is None else self._pending["lambda"][0][..., 0].detach()
        if magnitude is None:
            magnitude = self.generators["lambda"].generate()[0][..., 0]
        self._commit(auto=False)
        changed = self.allocator.update(int(global_step), magnitude=magnitude, sensitivity=sensitivity)
        if world_size() > 1 and self.allocator.is_masking_step(int(global_step)):
            changed = self._sync_masks() or changed
        if changed:
            self._mask_version += 1
            self._cache_key = None
        return changed

    @property
    def rank_pattern(self) -> dict:
        """{module name: current rank}."""
        if self.fixed:
            return {n: int(a.lam.numel()) for n, a in zip(self.target_names, self.adapters)}
        return dict(zip(self.target_names, self.allocator.ranks))

    # ------------------------------------------------------------------ training state (checkpoints)
    def trainable_state_dict(self) -> dict:
        """Everything training changes, for an exact resume: the hypernetworks (weights, recurrent state,
        anchors), the trained heads, the rank allocator (masks, importance EMAs) and the step bookkeeping."""
        state = {f"generators.{k}": v.detach().clone() for k, v in self.generators.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self._modules_to_save_state().items()})
        return {"tensors": state, "allocator": self.allocator.state_dict(),
                "mask_version": self._mask_version, "allocate_called": self._allocate_called}

    def load_trainable_state_dict(self, state: dict) -> None:
        """Put a `trainable_state_dict` back; ValueError, changing nothing, for a state of another model."""
        tensors = state["tensors"]
        refuse_misfit(self.trainable_state_dict()["tensors"], tensors)
        mask = state["allocator"].get("mask")
        if mask is not None and tuple(mask.shape) != tuple(self.allocator.mask.shape):
            raise ValueError(f"The state's rank masks are {tuple(mask.shape)}, this model's "
                             f"{tuple(self.allocator.mask.shape)} (another number of layers or init_r).")
        gen = {k[len("generators."):]: v for k, v in tensors.items() if k.startswith("generators.")}
        self.generators.load_state_dict(gen, strict=False)
        for name in self.saved_module_names:
            prefix = f"modules_to_save.{name}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if sub:
                self.base_model.get_submodule(name).load_state_dict(sub)
        self.allocator.load_state_dict(state["allocator"])
        self._mask_version = int(state.get("mask_version", 0)) + 1
        self._allocate_called = bool(state.get("allocate_called", False))
        self._forget_generation()

    def checkpoint_state(self) -> tuple[dict, dict]:
        state = self.trainable_state_dict()
        tensors = {f"model.{k}": v for k, v in state["tensors"].items()}
        alloc = state["allocator"]
        tensors.update({f"allocator.{k}": alloc[k] for k in ("mask", "ipt", "unc") if alloc[k] is not None})
        meta = {"allocator": {k: alloc[k] for k in ("last_step", "n_maskings")},
                "mask_version": state["mask_version"], "allocate_called": state["allocate_called"]}
        return tensors, meta

    def load_checkpoint_state(self, tensors: dict, meta: dict) -> None:
        alloc = {k: tensors.get(f"allocator.{k}") for k in ("mask", "ipt", "unc")}
        alloc.update(meta["allocator"])
        self.load_trainable_state_dict({"tensors": {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                                        "allocator": alloc, "mask_version": meta["mask_version"],
                                        "allocate_called": meta["allocate_called"]})

    # ------------------------------------------------------------------ the final adapter
    @torch.no_grad()
    def final_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (P, lambda, Q) of the current adapter, sliced to the kept ranks."""
        if self.fixed:
            return [(a.P, a.lam, a.Q) for a in self.adapters]
        self._materialized()
        result = []
        for layer, keep in zip(self.adapters, self.allocator.mask):
            idx = keep.nonzero().flatten()
            result.append((layer.P[:, idx].detach().clone(), layer.lam[idx].detach().clone(),
                           layer.Q[idx, :].detach().clone()))
        return result

    def _freeze_generated(self) -> None:
        for layer, (P, lam, Q) in zip(self.adapters, self.final_tensors()):
            layer.set_fixed(P, lam, Q)

    def _adapter_tensors(self) -> dict:
        tensors = {}
        for name, (P, lam, Q) in zip(self.target_names, self.final_tensors()):
            tensors[f"{name}.lora_P"], tensors[f"{name}.lora_lambda"], tensors[f"{name}.lora_Q"] = P, lam, Q
        return tensors

    def _config_extra(self) -> dict:
        return {"rank_pattern": self.rank_pattern, "target_names": self.target_names, **self._layout_extra()}

    def save_pretrained(self, directory: str, save_hypernetworks: bool = False) -> None:
        """Write ``adapter_model.safetensors`` (P, lambda, Q per layer sliced to its rank, and the trained heads)
        and ``hyperadalora_config.json`` (with the rank pattern). ``save_hypernetworks=True`` also writes the
        hypernetworks, their state and the masks (to continue training)."""
        super().save_pretrained(directory)
        if save_hypernetworks and not self.fixed:
            state = {f"generators.{k}": v for k, v in self.generators.state_dict().items()}
            state["allocator.mask"] = self.allocator.mask.to(torch.uint8)
            save_safetensors(state, os.path.join(directory, HYPERNET_WEIGHTS_NAME), {"format": "pt"})

    @property
    def exports_lora(self) -> bool:
        return True

    def export_lora(self, directory: str, rank=None, allowed_ranks=None) -> None:
        """Write a vanilla peft LoRA adapter: ``B = (alpha / r) P diag(lambda)``, ``A = Q``, LoRA scaling 1.
        ``rank=None``: per-layer ranks in ``rank_pattern`` and ``alpha_pattern`` equal to the rank; layers pruned to
        rank 0 are left out. ``rank=N`` or ``"auto"`` (the smallest that holds every layer; rounded up to one of
        ``allowed_ranks`` if given, e.g. ``hyperadalora.export.VLLM_MAX_LORA_RANKS``): every layer padded to one rank
        with zero rows in A and zero columns in B, pruned layers as zero blocks, outputs unchanged; the form vLLM and
        LoRAX load (see `hyperadalora.export`). Load either with ``peft.PeftModel.from_pretrained(base_model,
        directory)``."""
        uniform = rank is not None or bool(allowed_ranks)
        export(lora_weights(self), directory, "peft-uniform" if uniform else "peft", rank=rank,
               allowed_ranks=allowed_ranks)

    def _merged_weights(self) -> list[torch.Tensor]:
        """``W0 + scaling * P diag(lambda) Q`` per layer (dequantized for a quantized base)."""
        weights = []
        for layer, (P, lam, Q) in zip(self.adapters, self.final_tensors()):
            base = layer.base_layer
            weight = (dequantized_weight(base) if quantization_kind(base) is not None
                      else dequantized_weight(base, base.weight.dtype).clone())  # (out, in), also for a Conv1D
            if lam.numel():
                weight += ((P * (lam * layer.scaling)) @ Q).to(weight.dtype)
            weights.append(weight)
        return weights

    # ------------------------------------------------------------------ loading
    @classmethod
    def read_config(cls, directory: str) -> HyperAdaLoraConfig:
        return HyperAdaLoraConfig.from_pretrained(directory)

    @classmethod
    def saved_target_names(cls, tensors: dict) -> list[str]:
        return sorted(k[:-len(".lora_P")] for k in tensors if k.endswith(".lora_P"))

    def _load_saved_tensors(self, tensors: dict, path: str) -> None:
        """Check every saved tensor against the model first, then load them (a misfit changes nothing)."""
        layers = []
        for name, layer in zip(self.target_names, self.adapters):
            try:
                P, lam, Q = (tensors[f"{name}.lora_{k}"] for k in ("P", "lambda", "Q"))
            except KeyError as e:
                raise ValueError(f"{path} has no tensor {e.args[0]!r}: the adapter was saved for another "
                                 f"model.") from None
            if P.shape[0] != layer.out_features or Q.shape[1] != layer.in_features:
                raise ValueError(f"Adapter for {name!r} has shape (out={P.shape[0]}, in={Q.shape[1]}) but the "
                                 f"model's layer is (out={layer.out_features}, in={layer.in_features}): this adapter "
                                 f"was trained on another base model.")
            layers.append((layer, P, lam, Q))
        heads = self._saved_head_states(tensors)
        for layer, P, lam, Q in layers:
            w = layer.base_layer.weight
            layer.set_fixed(P.to(w.device), lam.to(w.device), Q.to(w.device))
        for module, state in heads:
            module.load_state_dict(state)
