"""`HyperAdaLoraModel`: injection into a transformers model, generation, rank allocation, save/load/export/merge.

Training step, as with peft's AdaLoRA::

    out = model(**batch)                 # generates P, lambda, Q; out.loss includes gamma * orthogonal penalty
    out.loss.backward()
    optimizer.step()
    model.update_and_allocate(step)      # step = optimizer steps done (1-based); re-masks on schedule
    optimizer.zero_grad()

`update_and_allocate` also commits the recurrent state. If nobody calls it, the model notices that the
hypernetworks were updated (parameter versions, or for fused optimizers, which do not bump them, a copy of the
output projections: `phi_changed`) at the next forward, commits the state itself and warns once that rank
allocation is not running (peft #1327): use `HyperAdaLoraTrainer`, or `RankAllocationCallback` with a `Trainer`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .allocator import RankAllocator
from .config import CONFIG_NAME, HyperAdaLoraConfig
from .generator import RoleGenerator, hypernetwork_param_groups
from .layer import SVDLinear
from .quantization import (dense_linear, dequantized_weight, keep_trainable_layout, quantization_kind,
                           refuse_quantized_merge)
from .wrapper import AdapterWrapper, with_signature_of

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
HYPERNET_WEIGHTS_NAME = "hypernetworks.safetensors"
OUTPUT_LAYER_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out", "output_layer")


# ---------------------------------------------------------------------------------------------- targets
def _default_targets(model: nn.Module) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in MAPPING:
        return list(MAPPING[model_type])
    raise ValueError(f"No default target_modules for model_type={model_type!r}: set target_modules (module name "
                     f"suffixes, a regex, or 'all-linear').")


def find_target_modules(model: nn.Module, config: HyperAdaLoraConfig) -> list[str]:
    """Names of the nn.Linear modules to adapt, as peft matches them (suffix for a list, full regex for a str)."""
    targets = config.target_modules if config.target_modules is not None else _default_targets(model)
    saved = tuple(config.modules_to_save or ())
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def excluded(name):
        parts = name.split(".")
        return any(p in OUTPUT_LAYER_NAMES or p in saved for p in parts)

    if targets == "all-linear":
        names = [n for n, _ in linear if not excluded(n)]
    elif isinstance(targets, str):
        names = [n for n, _ in linear if re.fullmatch(targets, n)]
    else:
        names = [n for n, _ in linear if any(n == t or n.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in linear)]
        if unmatched:
            others = [n for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in unmatched)]
            hint = f" ({others[0]} is a {type(model.get_submodule(others[0])).__name__}, not nn.Linear)" if others else ""
            raise ValueError(f"target_modules {unmatched} match no nn.Linear module of the model{hint}. "
                             f"Linear modules look like: {[n for n, _ in linear[:8]]}.")
    names = [n for n in names if not excluded(n) or targets != "all-linear"]
    if not names:
        raise ValueError(f"target_modules={targets!r} matches no nn.Linear module of the model. "
                         f"Linear modules look like: {[n for n, _ in linear[:8]]}.")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapter_types() -> tuple:
    """The module types that mean a model already carries adapters: this package's wrappers and adapter layers, and
    peft's tuners and tuner layers."""
    from .methods.base import AdapterLayer  # here: methods.base imports this module

    types = [AdapterWrapper, SVDLinear, AdapterLayer]
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

        types += [PeftModel, BaseTuner, BaseTunerLayer]
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    return tuple(types)


def refuse_adapted_model(model: nn.Module, action: str) -> None:
    """Raise a ValueError if ``model`` already carries adapters (of this package or of peft).

    `get_peft_model` and `load_adapter` replace the target layers of the model they are given *in place*, so a base
    model that went through one of them once is no longer a base model; without this check the second call fails
    with a puzzling "matches no nn.Linear module" (the targets are now adapter layers)."""
    types = _adapter_types()
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, types)]
    if not found:
        return
    name, module = found[0]
    where = "the model itself" if name == "" else repr(name)
    cls = type(module)
    kind = cls.__name__ if cls.__module__.startswith(__package__) else f"{cls.__module__}.{cls.__qualname__}"
    raise ValueError(
        f"{action}: the model already carries adapters ({where} is a {kind}; {len(found)} adapter module(s) in "
        f"all). get_peft_model and load_adapter (this package's and peft's) put the adapters into the model they are "
        f"given, in place, so a model that went through one of them is no longer a base model. Pass an unmodified "
        f"base model (load it again, e.g. with from_pretrained), or keep using the model that get_peft_model / "
        f"load_adapter returned (its merge_and_unload() gives back a plain transformers model).")


def check_rank_fits(model: nn.Module, names: list[str], r: int, rank_field: str, reason: str, fix: str) -> None:
    """Raise a ValueError naming the first target layer whose smaller dimension is below the rank ``r``.

    ``reason``: why the rank must fit (e.g. the principal initialisation needs ``r`` singular vectors); ``fix``:
    the setting that avoids it, besides a lower rank or leaving the layer out."""
    for name in names:
        layer = model.get_submodule(name)
        smaller = min(layer.in_features, layer.out_features)
        if smaller < r:
            raise ValueError(
                f"Target layer {name!r} (in_features={layer.in_features}, out_features={layer.out_features}) is "
                f"narrower than {rank_field}={r}: {reason} (here {smaller}). Lower {rank_field} to <= {smaller}, leave "
                f"{name!r} out of target_modules (train it in full with modules_to_save instead), or {fix}.")


class _Injection:
    """Undo an adapter injection that failed half-way: put the base layers back and restore requires_grad, so that
    a model refused by `get_peft_model` / `load_adapter` stays the unmodified base model it was."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.replaced: list[tuple[str, nn.Module]] = []

    def replace(self, name: str, layer: nn.Module) -> None:
        original = self.model.get_submodule(name)
        _replace(self.model, name, layer)
        self.replaced.append((name, original))

    def took(self, names: list[str], layers: list[nn.Module]) -> None:
        """The adapter ``layers`` (each with its ``base_layer``) were injected at ``names`` (by a wrapper)."""
        self.replaced = [(name, layer.base_layer) for name, layer in zip(names, layers)]

    def undo(self) -> None:
        for name, original in reversed(self.replaced):
            _replace(self.model, name, original)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        self.replaced = []


def saved_layers_missing(model: nn.Module, names: list[str]) -> list[str]:
    """Descriptions of the saved target layers ``names`` that have no nn.Linear of that name in ``model``."""
    modules = dict(model.named_modules())
    missing = []
    for name in names:
        module = modules.get(name)
        if module is None:
            missing.append(name)
        elif not isinstance(module, nn.Linear):
            missing.append(f"{name} (a {type(module).__name__}, not nn.Linear)")
    return missing


def saved_heads_missing(model: nn.Module, tensors: dict, modules_to_save, target_names) -> list[str]:
    """The saved ``modules_to_save.*`` tensors that no module to save of ``model`` takes (what load_adapter would
    otherwise drop silently)."""
    targets = set(target_names)
    heads = [n for n, _ in model.named_modules() if n not in targets
             and any(n == t or n.endswith("." + t) for t in modules_to_save or ())]
    prefixes = tuple(f"modules_to_save.{n}." for n in heads)
    return sorted(k[len("modules_to_save."):] for k in tensors
                  if k.startswith("modules_to_save.") and not k.startswith(prefixes))


def refuse_missing_modules(model: nn.Module, directory, target_names: list[str], tensors: dict,
                           modules_to_save) -> None:
    """Raise a ValueError if the adapter saved in ``directory`` has layers or heads that ``model`` lacks."""
    missing = saved_layers_missing(model, target_names)
    heads = saved_heads_missing(model, tensors, modules_to_save, target_names)
    if not missing and not heads:
        return
    parts = []
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        parts.append(f"{len(missing)} of its {len(target_names)} adapted layers have no matching nn.Linear in the "
                     f"model: {shown}")
    if heads:
        shown = ", ".join(heads[:8]) + (f", ... ({len(heads) - 8} more)" if len(heads) > 8 else "")
        parts.append(f"saved module weights that no module of the model takes: {shown}")
    raise ValueError(f"The adapter in {str(directory)!r} does not fit this model: {'; '.join(parts)}. It was trained "
                     f"on another base model (e.g. one with more layers): load it onto the model it was trained on.")


def load_onto(model: nn.Module, directory, names: list[str], tensors: dict, modules_to_save, build: Callable,
              load: Callable) -> nn.Module:
    """The common part of every ``load_adapter``: refuse a model that carries adapters already or lacks saved layers
    (`refuse_adapted_model`, `refuse_missing_modules`), wrap it (``build()``, a wrapper with ``target_names`` and
    ``adapters``), put the saved tensors in (``load(wrapped)``), and freeze the result. A file that does not fit gives
    the model back unchanged."""
    refuse_adapted_model(model, "load_adapter")
    refuse_missing_modules(model, directory, names, tensors, modules_to_save)
    injection = _Injection(model)
    wrapped = build()
    injection.took(wrapped.target_names, wrapped.adapters)
    try:
        load(wrapped)
    except BaseException:
        injection.undo()
        raise
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped


DIGEST_KEY = "hyperadalora_sha256"                # metadata: the tensors' digest (checkpoint.tensors_digest)
CONFIG_DIGEST_KEY = "hyperadalora_config_sha256"  # metadata: the SHA-256 of the config file written beside it


def _file_sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None,
                      config_path: Optional[str] = None) -> None:
    """Write ``tensors`` atomically (a temporary file, fsynced, renamed), with the digest of the tensors and, given
    ``config_path``, of that (already written) config file in the metadata: `load_safetensors_checked` refuses a
    file or config altered since."""
    from .checkpoint import tensors_digest

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    if config_path is not None:
        metadata[CONFIG_DIGEST_KEY] = _file_sha256(config_path)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_safetensors_checked(path: str, config_path: Optional[str] = None) -> dict:
    """The tensors of a file written by `_save_safetensors`; ValueError naming the file when it is unreadable
    (truncated...) or when it, or the config file beside it, no longer matches the digests it recorded (a flipped
    byte). Files written before the digests were recorded load unchecked."""
    from safetensors import safe_open

    from .checkpoint import tensors_digest

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted.") from e
    if DIGEST_KEY in metadata and tensors_digest(tensors) != metadata[DIGEST_KEY]:
        raise ValueError(f"{path} is corrupted: its tensors do not match the digest recorded in it. Not loaded.")
    if config_path is not None and CONFIG_DIGEST_KEY in metadata and \
            _file_sha256(config_path) != metadata[CONFIG_DIGEST_KEY]:
        raise ValueError(f"{config_path} is corrupted or was changed after {os.path.basename(path)} was written "
                         f"beside it (its SHA-256 differs from the one recorded there). Not loaded.")
    return tensors


def _full_precision(device: torch.device):
    """Autocast off for the hypernetworks: under bf16 autocast (mixed precision) they, their state and the
    generated tensors stay in their own precision (fp32); only the adapted layers run in bf16."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _world_size() -> int:
    """Processes of the default torch.distributed group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def phi_fingerprint(generators: nn.ModuleDict) -> torch.Tensor:
    """A copy of the hypernetworks' output projections (token width x hypernet_dim numbers per role): every optimizer
    step that trains the hypernetworks moves them, since every generated entry depends on them.

    Parameter version counters (`_version`) miss the steps of fused optimizers: ``torch.optim.AdamW(fused=True)``,
    transformers' default ``optim="adamw_torch_fused"``, update the parameters in place without bumping them."""
    return torch.cat([g.hypernet.out_proj.weight.detach().reshape(-1) for g in generators.values()])


def phi_changed(generators: nn.ModuleDict, version: Optional[int], fingerprint: Optional[torch.Tensor]) -> bool:
    """Whether the hypernetworks were updated since their parameter versions summed to ``version`` and their
    `phi_fingerprint` was ``fingerprint``. The versions answer for free for every optimizer that bumps them (the
    fingerprint is compared, one small device-to-host read, only when they did not move)."""
    if sum(p._version for p in generators.parameters()) != version:
        return True
    if fingerprint is None:
        return False
    now = phi_fingerprint(generators)
    return now.shape != fingerprint.shape or not torch.equal(now, fingerprint.to(now))


def principal_subspaces(adapters: list, r: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seed states of ``init='principal'``: the top-``r`` left (P, ``(out, r)``) and right (Q^T, ``(in, r)``) singular
    vectors of each frozen weight ``W0`` (exact SVD up to 1024 on the short side, randomised above)."""
    ps, qs = [], []
    for layer in adapters:
        w = dequantized_weight(layer.base_layer)  # fp32; a 4-bit / 8-bit weight is packed: never read it directly
        if min(w.shape) <= 1024:
            u, _, vh = torch.linalg.svd(w, full_matrices=False)
            u, v = u[:, :r], vh[:r].t()
        else:
            u, _, v = torch.svd_lowrank(w, q=r + 8, niter=4)
            u, v = u[:, :r], v[:, :r]
        # copies: a slice would keep the whole U / V^T of every layer alive until the generators are built
        # (60 MiB on MiniLM, more than a batch-1 training step of AdaLoRA takes)
        ps.append(u.detach().to("cpu", copy=True))
        qs.append(v.detach().to("cpu", copy=True))
    return ps, qs


# ---------------------------------------------------------------------------------------------- model
class HyperAdaLoraModel(AdapterWrapper):
    """A transformers model with HyperAdaLoRA adapters.

    Attributes:
        base_model: the wrapped transformers model (its target nn.Linear replaced by `SVDLinear`).
        generators: ``{"P", "lambda", "Q"}`` -> `RoleGenerator` (absent once the hypernetworks are dropped).
        allocator: the `RankAllocator` holding the rank masks.
    """

    ROLES = ("P", "lambda", "Q")
    ADAPTER_LAYER = SVDLinear

    def __init__(self, model: nn.Module, config: HyperAdaLoraConfig, *, _fixed: bool = False):
        super().__init__()
        if not isinstance(config, HyperAdaLoraConfig):
            raise TypeError(f"config must be a HyperAdaLoraConfig, got {type(config).__name__}.")
        if not _fixed and config.total_step is None:
            raise ValueError("HyperAdaLoraConfig.total_step is required for training: set it to the number of "
                             "optimizer steps of the run (as for peft's AdaLoraConfig).")
        refuse_adapted_model(model, "load_adapter" if _fixed else "get_peft_model")
        self.peft_config = config
        self.base_model = model
        self.target_names = find_target_modules(model, config)
        if not _fixed:  # what the generators need of every layer, checked before the model is touched
            if config.init == "principal":
                check_rank_fits(model, self.target_names, config.init_r, "init_r",
                                "init='principal' seeds P and Q with the top init_r singular vectors of the layer's "
                                "weight, and it has min(in_features, out_features) of them", "use init='orthonormal'")
            if config.basis == "orthonormal":
                check_rank_fits(model, self.target_names, config.init_r, "init_r",
                                "basis='orthonormal' makes the init_r columns of P and rows of Q orthonormal, which "
                                "needs init_r <= min(in_features, out_features)", "use basis='free' or 'unit'")
        injection = _Injection(model)
        try:
            self._inject(model, config, _fixed, injection)
        except BaseException:
            injection.undo()
            raise
        self._pending: Optional[dict] = None        # last training generation: role -> [group tensors]
        self._pending_version: Optional[int] = None
        self._pending_fingerprint: Optional[torch.Tensor] = None
        self._pending_committed = False
        self._cache_key = None
        self._cache_fingerprint: Optional[torch.Tensor] = None
        self._mask_version = 0
        self._warned_no_allocate = False
        self._allocate_called = False
        self.mask_divergences = 0                  # multi-process: masks replaced by process 0's (should stay 0)
        self.last_task_loss: Optional[torch.Tensor] = None
        self.last_orth_penalty: Optional[torch.Tensor] = None
        # Trainer reads the forward's signature (columns to keep, label names): show the base model's.
        self.__class__ = with_signature_of(HyperAdaLoraModel, type(model))

    def _inject(self, model: nn.Module, config: HyperAdaLoraConfig, _fixed: bool, injection: _Injection) -> None:
        """Replace the target layers, build the rank allocator and (to train) the hypernetworks. `__init__` undoes
        the replacement if anything here fails."""
        for p in model.parameters():
            p.requires_grad_(False)
        keep_trainable_layout(model)  # 4-bit layers: bitsandbytes' CPU inference repacking has no backward
        scaling = config.lora_alpha / config.init_r
        self.adapters: list[SVDLinear] = []
        for i, name in enumerate(self.target_names):
            layer = SVDLinear(model.get_submodule(name), i, scaling, config.lora_dropout)
            injection.replace(name, layer)
            self.adapters.append(layer)
        self.saved_module_names = self._mark_modules_to_save()
        n, r = len(self.adapters), config.init_r
        device = next(model.parameters()).device
        self.allocator = RankAllocator(n, r, config.target_r, config.total_step or 1, config.tinit if not _fixed else 0,
                                       config.tfinal if not _fixed else 0, config.deltaT, config.importance,
                                       config.beta1, config.beta2, device=device)
        self.fixed = _fixed
        if not _fixed:
            gen = torch.Generator().manual_seed(config.seed)
            torch_state = torch.random.get_rng_state()
            torch.manual_seed(config.seed)  # hypernetwork initialisation independent of the caller's RNG
            try:
                seed_pq = "normal" if config.init == "normal" else "orthonormal"
                seeds_p = seeds_q = None
                if config.init == "principal":
                    seeds_p, seeds_q = principal_subspaces(self.adapters, r)
                self.generators = nn.ModuleDict({
                    "P": RoleGenerator("P", [a.out_features for a in self.adapters], r, 1, seed_pq, config, gen,
                                       seeds_p, compact_offset=True, basis=config.basis),
                    "lambda": RoleGenerator("lambda", [r] * n, 1, 0, "normal" if config.init == "normal" else "zeros",
                                            config, gen),
                    "Q": RoleGenerator("Q", [a.in_features for a in self.adapters], r, 1, seed_pq, config, gen,
                                       seeds_q, compact_offset=True, basis=config.basis),
                })
            finally:
                torch.random.set_rng_state(torch_state)
            self.generators.to(device)

    # ------------------------------------------------------------------ set-up helpers
    @property
    def n_layers(self) -> int:
        return len(self.adapters)

    # ------------------------------------------------------------------ parameters
    def hypernetwork_parameters(self) -> list[nn.Parameter]:
        return [] if self.fixed else list(self.generators.parameters())

    def optimizer_param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Parameter groups for an optimizer: the hypernetworks at ``lr * hypernet_lr_ratio`` (their row embeddings
        at ``lr * feature_lr_ratio``, see `generator.hypernetwork_param_groups`), the heads at ``lr``."""
        groups = [] if self.fixed else hypernetwork_param_groups(self.generators, self.peft_config, lr, weight_decay)
        heads = [p for p in self.base_model.parameters() if p.requires_grad]
        if heads:
            groups.append({"params": heads, "lr": lr, "weight_decay": weight_decay, "name": "modules_to_save"})
        return [g for g in groups if g["params"]]

    def _phi_version(self) -> int:
        return sum(p._version for p in self.generators.parameters())

    def _phi_fingerprint(self) -> torch.Tensor:
        return phi_fingerprint(self.generators)

    def _phi_changed(self, version: Optional[int], fingerprint: Optional[torch.Tensor]) -> bool:
        return phi_changed(self.generators, version, fingerprint)

    # ------------------------------------------------------------------ generation
    def _generate(self, track: bool) -> dict:
        """One batched pass per role and distinct matrix length, over all layers (independent of their number)."""
        with _full_precision(self.generators["lambda"].states()[0].device):
            return {role: self.generators[role].generate(track=track) for role in self.ROLES}

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
        Ps, Qs = self._per_layer("P", outs["P"]), self._per_layer("Q", outs["Q"])
        for layer, P, l, Qt in zip(self.adapters, Ps, lam, Qs):
            layer.set_tensors(P, l, Qt.t())

    def _per_layer(self, role: str, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One (L_i, w) view per layer, in layer order (`RoleGenerator.per_layer`)."""
        return self.generators[role].per_layer(outs)

    def _maybe_commit(self, auto: bool) -> None:
        """Recurrent state: once the hypernetworks have been updated, the last generation becomes the state."""
        if (self._pending is None or self._pending_committed
                or not self._phi_changed(self._pending_version, self._pending_fingerprint)):
            return
        if auto and not self._allocate_called and not self._warned_no_allocate:
            warnings.warn("HyperAdaLoRA: the hypernetworks were updated but update_and_allocate() was not called: "
                          "the rank budget is not being allocated. Call model.update_and_allocate(step) after "
                          "optimizer.step(), train with hyperadalora.HyperAdaLoraTrainer, or add "
                          "hyperadalora.RankAllocationCallback() to your Trainer.", stacklevel=3)
            self._warned_no_allocate = True
        for role in self.ROLES:
            self.generators[role].commit(self._pending[role], self.peft_config.momentum)
        self._pending = {role: [t.detach() for t in outs] for role, outs in self._pending.items()}
        self._pending_committed = True
        self._cache_key = None

    def materialize(self, training_pass: Optional[bool] = None) -> Optional[dict]:
        """Generate this step's tensors and install them in the layers.

        A training pass (module in training mode and autograd on) generates with a graph into the
        hypernetworks; otherwise the tensors are generated once under no_grad and cached until the
        hypernetworks, the state or the masks change.
        """
        if self.fixed:
            return None
        if training_pass is None:
            training_pass = self.training and torch.is_grad_enabled()
        if training_pass:
            self._maybe_commit(auto=True)
            outs = self._generate(track=True)
            if self.peft_config.importance == "sensitivity":
                for tensors in outs.values():
                    for t in tensors:
                        if t.requires_grad:
                            t.retain_grad()
            self._pending, self._pending_version = outs, self._phi_version()
            self._pending_fingerprint = self._phi_fingerprint()
            self._pending_committed = False
            self._cache_key = None
        else:
            version = self._phi_version()
            key = (version, self._mask_version, self.allocator.last_step,
                   tuple(s.data_ptr() for g in self.generators.values() for s in g.states()),
                   tuple(s._version for g in self.generators.values() for s in g.states()))
            if key == self._cache_key and not self._phi_changed(version, self._cache_fingerprint):
                return None
            with torch.no_grad():
                outs = self._generate(track=False)
            self._cache_key, self._cache_fingerprint = key, self._phi_fingerprint()
        self._install(outs)
        return outs

    # ------------------------------------------------------------------ loss
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
        with _full_precision(outs["P"][0].device):
            return (self._gram_penalty(outs["P"]) + self._gram_penalty(outs["Q"])) / self.n_layers

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        outs = self.materialize()
        penalty = None
        if outs is not None and self._pending is outs and self.peft_config.orth_reg_weight > 0:
            # computed before the base model: autograd runs the nodes created last first, so the penalty's
            # gradient reaches the generated tensors at the end of backward, once the model's activations are
            # freed, instead of being held through the whole backward (the peak)
            penalty = self.orthogonal_penalty(outs)
        output = self.base_model(*args, **kwargs)
        loss = getattr(output, "loss", None)
        if outs is not None and self._pending is outs and isinstance(loss, torch.Tensor):
            self.last_task_loss = loss.detach()
            if penalty is not None:
                self.last_orth_penalty = penalty.detach()
                output.loss = loss + self.peft_config.orth_reg_weight * penalty.to(loss.dtype)
        elif isinstance(loss, torch.Tensor):
            self.last_task_loss = loss.detach()
        return output

    # ------------------------------------------------------------------ rank allocation
    def _sensitivity(self) -> Optional[torch.Tensor]:
        """(3, n_layers, init_r) instant sensitivities |x * grad| of the generated P, lambda, Q: per group of
        stacked layers (no loop over layers), mean over a rank's P column / Q row."""
        outs = self._pending
        if outs is None or any(t.grad is None for ts in outs.values() for t in ts):
            return None
        grads = {role: [t.grad for t in outs[role]] for role in self.ROLES}
        world = _world_size()
        if world > 1:  # the gradients a single process would see for the global batch (as DDP does for phi)
            import torch.distributed as dist

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
        import torch.distributed as dist

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
        self._allocate_called = True
        sensitivity = self._sensitivity() if self.peft_config.importance == "sensitivity" else None
        magnitude = None if self._pending is None else self._pending["lambda"][0][..., 0].detach()
        if magnitude is None:
            magnitude = self.generators["lambda"].generate()[0][..., 0]
        self._maybe_commit(auto=False)
        changed = self.allocator.update(int(global_step), magnitude=magnitude, sensitivity=sensitivity)
        if _world_size() > 1 and self.allocator.is_masking_step(int(global_step)):
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

    @property
    def total_rank(self) -> int:
        return sum(self.rank_pattern.values())

    # ------------------------------------------------------------------ training state (checkpoints)
    def trainable_state_dict(self) -> dict:
        """Everything training changes, for an exact resume: the hypernetworks (weights, recurrent state,
        anchors), the trained heads, the rank allocator (masks, importance EMAs) and the step bookkeeping."""
        state = {f"generators.{k}": v.detach().clone() for k, v in self.generators.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self._modules_to_save_state().items()})
        return {"tensors": state, "allocator": self.allocator.state_dict(),
                "mask_version": self._mask_version, "allocate_called": self._allocate_called}

    def load_trainable_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        gen = {k[len("generators."):]: v for k, v in tensors.items() if k.startswith("generators.")}
        missing, unexpected = self.generators.load_state_dict(gen, strict=False)
        if missing or unexpected:
            raise ValueError(f"Checkpoint does not fit this model's hypernetworks: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}.")
        for name in self.saved_module_names:
            prefix = f"modules_to_save.{name}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if sub:
                self.base_model.get_submodule(name).load_state_dict(sub)
        self.allocator.load_state_dict(state["allocator"])
        self._mask_version = int(state.get("mask_version", 0)) + 1
        self._allocate_called = bool(state.get("allocate_called", False))
        self._pending, self._pending_version, self._cache_key = None, None, None
        self._pending_fingerprint = self._cache_fingerprint = None
        self._pending_committed = False

    # ------------------------------------------------------------------ the final adapter
    @torch.no_grad()
    def final_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (P, lambda, Q) of the current adapter, sliced to the kept ranks."""
        if self.fixed:
            return [(a.P, a.lam, a.Q) for a in self.adapters]
        was_training = self.training
        self.eval()
        self.materialize(training_pass=False)
        self.train(was_training)
        result = []
        for layer, keep in zip(self.adapters, self.allocator.mask):
            idx = keep.nonzero().flatten()
            result.append((layer.P[:, idx].detach().clone(), layer.lam[idx].detach().clone(),
                           layer.Q[idx, :].detach().clone()))
        return result

    def drop_hypernetworks(self) -> "HyperAdaLoraModel":
        """Freeze the adapter to its current tensors and delete the hypernetworks (inference cost = AdaLoRA's)."""
        if self.fixed:
            return self
        for layer, (P, lam, Q) in zip(self.adapters, self.final_tensors()):
            layer.set_fixed(P, lam, Q)
        del self.generators
        self.fixed = True
        self._pending = None
        return self

    def save_pretrained(self, directory: str, save_hypernetworks: bool = False) -> None:
        """Write ``adapter_model.safetensors`` (P, lambda, Q per layer sliced to its rank, and the trained heads)
        and ``hyperadalora_config.json`` (with the rank pattern). ``save_hypernetworks=True`` also writes the
        hypernetworks, their state and the masks (to continue training)."""
        os.makedirs(directory, exist_ok=True)
        tensors = {}
        for name, (P, lam, Q) in zip(self.target_names, self.final_tensors()):
            tensors[f"{name}.lora_P"], tensors[f"{name}.lora_lambda"], tensors[f"{name}.lora_Q"] = P, lam, Q
        tensors.update(self._modules_to_save_state())
        # the config first: the tensors' file records its digest (load_adapter refuses an altered one)
        self.peft_config.save_pretrained(directory, rank_pattern=self.rank_pattern,
                                         target_names=self.target_names)
        _save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), {"format": "pt"},
                          config_path=os.path.join(directory, CONFIG_NAME))
        if save_hypernetworks and not self.fixed:
            state = {f"generators.{k}": v for k, v in self.generators.state_dict().items()}
            state["allocator.mask"] = self.allocator.mask.to(torch.uint8)
            _save_safetensors(state, os.path.join(directory, HYPERNET_WEIGHTS_NAME), {"format": "pt"})

    def export_lora(self, directory: str, rank=None, allowed_ranks=None) -> None:
        """Write a vanilla peft LoRA adapter: ``B = (alpha / r) P diag(lambda)``, ``A = Q``, LoRA scaling 1.
        ``rank=None``: per-layer ranks in ``rank_pattern`` and ``alpha_pattern`` equal to the rank; layers pruned to
        rank 0 are left out. ``rank=N`` or ``"auto"`` (the smallest that holds every layer; rounded up to one of
        ``allowed_ranks`` if given, e.g. ``hyperadalora.export.VLLM_MAX_LORA_RANKS``): every layer padded to one rank
        with zero rows in A and zero columns in B, pruned layers as zero blocks, outputs unchanged; the form vLLM and
        LoRAX load (see `hyperadalora.export`). Load either with ``peft.PeftModel.from_pretrained(base_model,
        directory)``."""
        from .export import export, lora_weights

        uniform = rank is not None or bool(allowed_ranks)
        export(lora_weights(self), directory, "peft-uniform" if uniform else "peft", rank=rank,
               allowed_ranks=allowed_ranks)

    @torch.no_grad()
    def merge_and_unload(self, dequantize: bool = False) -> nn.Module:
        """Add ``scaling * P diag(lambda) Q`` into each base weight and return the plain transformers model.

        A quantized (bitsandbytes 4-bit / 8-bit) base is refused, unless ``dequantize=True``: then each adapted
        quantized layer becomes a dense ``nn.Linear`` holding the dequantized weight plus the update."""
        if not dequantize:
            refuse_quantized_merge(self.adapters, self.target_names)
        finals = self.final_tensors()
        for name, layer, (P, lam, Q) in zip(self.target_names, self.adapters, finals):
            base = layer.base_layer
            if quantization_kind(base) is not None:
                weight = dequantized_weight(base)
                if lam.numel():
                    weight += ((P * (lam * layer.scaling)) @ Q).to(weight)
                _replace(self.base_model, name, dense_linear(base, weight))
                continue
            if lam.numel():
                delta = (P * (lam * layer.scaling)) @ Q
                base.weight.data += delta.to(base.weight.dtype)
            _replace(self.base_model, name, base)
        return self.base_model


# ---------------------------------------------------------------------------------------------- entry points
def get_peft_model(model: nn.Module, config):
    """`HyperAdaLoraModel` for a `HyperAdaLoraConfig`; any peft config goes to ``peft.get_peft_model``."""
    if isinstance(config, HyperAdaLoraConfig):
        return HyperAdaLoraModel(model, config)
    import peft

    return peft.get_peft_model(model, config)


def load_adapter(model: nn.Module, directory: str) -> HyperAdaLoraModel:
    """Load an adapter written by `HyperAdaLoraModel.save_pretrained` onto ``model`` (inference; fixed tensors)."""
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        HyperAdaLoraConfig.from_pretrained(directory)  # the clearer error for a directory that holds no adapter
        raise FileNotFoundError(f"No {ADAPTER_WEIGHTS_NAME} in {directory!r}.")
    config_path = os.path.join(directory, CONFIG_NAME)
    # the tensors and the config checked against their digests before either is read
    tensors = load_safetensors_checked(path, config_path if os.path.isfile(config_path) else None)
    config = HyperAdaLoraConfig.from_pretrained(directory)
    with open(config_path) as f:
        saved = json.load(f)
    names = saved.get("target_names") or sorted(k[:-len(".lora_P")] for k in tensors if k.endswith(".lora_P"))
    if names:
        config.target_modules = "|".join(re.escape(n) for n in names)
    wrapped = load_onto(model, directory, names, tensors, config.modules_to_save,
                        build=lambda: HyperAdaLoraModel(model, config, _fixed=True),
                        load=lambda w: _load_fixed_tensors(w, tensors, path))
    wrapped.fixed = True
    return wrapped


def saved_head_states(wrapped, tensors: dict) -> list:
    """[(module, state)] of the saved ``modules_to_save.*`` weights of ``wrapped``'s modules to save, each checked
    against the module (keys and shapes) before anything is loaded."""
    heads = []
    for name in wrapped.saved_module_names:
        module = wrapped.base_model.get_submodule(name)
        prefix = f"modules_to_save.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            own = module.state_dict()
            misfit = sorted(set(own) ^ set(state)) + [k for k in state if k in own and own[k].shape != state[k].shape]
            if misfit:
                raise ValueError(f"Saved weights of {name!r} do not fit the model (keys missing, unexpected or of "
                                 f"another shape: {misfit[:5]}): this adapter was trained on another base model.")
            heads.append((module, state))
    return heads


def _load_fixed_tensors(wrapped: HyperAdaLoraModel, tensors: dict, path: str) -> None:
    """Check every saved tensor against the model first, then load them (a misfit changes nothing)."""
    layers = []
    for name, layer in zip(wrapped.target_names, wrapped.adapters):
        try:
            P, lam, Q = (tensors[f"{name}.lora_{k}"] for k in ("P", "lambda", "Q"))
        except KeyError as e:
            raise ValueError(f"{path} has no tensor {e.args[0]!r}: the adapter was saved for another model.") from None
        if P.shape[0] != layer.out_features or Q.shape[1] != layer.in_features:
            raise ValueError(f"Adapter for {name!r} has shape (out={P.shape[0]}, in={Q.shape[1]}) but the model's "
                             f"layer is (out={layer.out_features}, in={layer.in_features}): this adapter was trained "
                             f"on another base model.")
        layers.append((layer, P, lam, Q))
    heads = saved_head_states(wrapped, tensors)
    for layer, P, lam, Q in layers:
        w = layer.base_layer.weight
        layer.set_fixed(P.to(w.device), lam.to(w.device), Q.to(w.device))
    for module, state in heads:
        module.load_state_dict(state)
