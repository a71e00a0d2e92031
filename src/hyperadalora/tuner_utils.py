"""Tuner utilities every adapter method shares (the lowest layer of the package: it imports only `quantization` and
`wrapper`).

- targets: which linear layers (``nn.Linear``, transformers' ``Conv1D``) of a transformers model to adapt
  (`find_target_modules`, `default_targets`), whether a layer is wide enough for a rank (`check_rank_fits`), refusing
  a model that carries adapters already (`refuse_adapted_model`);
- injection with undo (`Injection`, `replace_module`) and the common part of every loader (`load_onto`);
- adapter files: safetensors written atomically with the digests of the tensors and of the config beside them
  (`save_safetensors`, `load_safetensors_checked`, `tensors_digest`);
- the adapter layers' shared kernels (`add_product`, `flat_base_forward`);
- generation helpers: autocast off for the hypernetworks (`full_precision`), the hypernetworks' change detection
  (`phi_fingerprint`, `phi_changed`), the principal seeds (`principal_subspaces`), `world_size`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_DEFAULT_TARGETS

from .quantization import dequantized_weight, is_conv1d, layer_features
from .wrapper import BaseAdapterLayer, BaseAdapterModel, modules_to_save_names  # noqa: F401

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
HYPERNET_WEIGHTS_NAME = "hypernetworks.safetensors"
OUTPUT_LAYER_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out", "output_layer")


# model types that peft's mappings do not name, whose attention projections are the usual targets (mixture-of-experts
# decoders: their experts are fused 3-D parameters, no linear layer; the router is never a default target)
EXTRA_DEFAULT_TARGETS = {"qwen2_moe": ["q_proj", "v_proj"], "qwen3_moe": ["q_proj", "v_proj"],
                         "olmoe": ["q_proj", "v_proj"], "granitemoe": ["q_proj", "v_proj"]}
ADAPTABLE = "nn.Linear or Conv1D"


def is_adaptable(module: nn.Module) -> bool:
    """Whether the adapters of this package wrap ``module``: an ``nn.Linear`` (bitsandbytes 4-bit / 8-bit layers
    included) or transformers' ``Conv1D`` (GPT-2's transposed linear layer, peft's ``fan_in_fan_out``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def default_targets(model: nn.Module) -> list[str]:
    """peft's default ``target_modules`` of the model's ``model_type``: its AdaLoRA mapping, then its LoRA mapping
    (then the few mixture-of-experts types neither names, `EXTRA_DEFAULT_TARGETS`); a ValueError listing the layer
    names that could be targeted for any other model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for mapping in (DEFAULT_TARGETS, LORA_DEFAULT_TARGETS, EXTRA_DEFAULT_TARGETS):
        if model_type in mapping:
            return list(mapping[model_type])
    raise ValueError(f"No default target_modules for model_type={model_type!r} (peft's AdaLoRA and LoRA mappings do "
                     f"not name it): set target_modules to some of the model's layer names (suffix match), e.g. "
                     f"{candidate_names(model)}, to a regex (full match), or to 'all-linear'.")


def candidate_names(model: nn.Module, limit: int = 12) -> list[str]:
    """The distinct last parts of the names of the layers that could be adapted (output layers left out), in model
    order: what ``target_modules`` may name."""
    names: list[str] = []
    for name, module in model.named_modules():
        if is_adaptable(module) and not any(p in OUTPUT_LAYER_NAMES for p in name.split(".")):
            last = name.rsplit(".", 1)[-1]
            if last not in names:
                names.append(last)
    return names[:limit]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper (``.module``), or ``model`` itself."""
    return getattr(model, "module", model)


def _moe_router(model: nn.Module, name: str) -> bool:
    """A linear layer beside an ``experts`` module (a mixture-of-experts block's router or gate: Qwen2-MoE's
    ``shared_expert_gate``, the ``gate`` of older implementations): never adapted by ``"all-linear"``."""
    parent, _, child = name.rpartition(".")
    if child in ("experts", "shared_expert") or not parent:
        return False
    return "experts" in dict(model.get_submodule(parent).named_children())


def _fused_parameters(model: nn.Module, targets: list[str]) -> list[str]:
    """The >= 3-D parameters (fused mixture-of-experts weights) that ``targets`` name (or their module's name)."""
    found = []
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if p.dim() >= 3 and any(name == t or name.endswith("." + t) or module == t or module.endswith("." + t)
                                for t in targets):
            found.append(f"{name} is a fused {tuple(p.shape)} parameter")
    return found


def _output_layer(model: nn.Module) -> Optional[str]:
    """The name of the model's output layer (transformers' ``get_output_embeddings``), if any."""
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        out = get_output() if callable(get_output) else None
    except (AttributeError, NotImplementedError):
        out = None
    return next((n for n, m in model.named_modules() if m is out), None) if out is not None else None


def find_target_modules(model: nn.Module, config) -> list[str]:
    """Names of the linear layers (nn.Linear or Conv1D, `is_adaptable`) to adapt, as peft matches them: suffix for a
    list, full regex for a str, `default_targets` for None; ``"all-linear"``: every linear layer but the output layer,
    the task heads and the mixture-of-experts routers (as peft defines it). A layer inside a module to save
    (``modules_to_save``: RoBERTa's ``classifier.dense``) is never adapted: the module is trained, saved and merged
    whole. ``config`` has ``target_modules`` and ``modules_to_save``."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    saved = modules_to_save_names(model, config.modules_to_save)
    linear = [(n, m) for n, m in model.named_modules() if is_adaptable(m)]
    output = _output_layer(model)

    def in_saved(name):  # a layer that *is* a module to save and is targeted gets the adapter (as before)
        return any(name.startswith(s + ".") for s in saved)

    if targets == "all-linear":
        names = [n for n, _ in linear if not (any(p in OUTPUT_LAYER_NAMES for p in n.split(".")) or n == output
                                              or n in saved or _moe_router(model, n))]
    elif isinstance(targets, str):
        names = [n for n, _ in linear if re.fullmatch(targets, n)]
    else:
        names = [n for n, _ in linear if any(n == t or n.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in linear)]
        if unmatched:
            fused = _fused_parameters(model, unmatched)
            others = [n for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in unmatched)]
            if fused:
                hint = (f" ({fused[0]}: mixture-of-experts weights fused into one 3-D parameter are not adapted "
                        f"(peft's LoRA reaches them with target_parameters); target the attention projections or "
                        f"another linear layer instead)")
            elif others:
                hint = f" ({others[0]} is a {type(model.get_submodule(others[0])).__name__}, not {ADAPTABLE})"
            else:
                hint = ""
            raise ValueError(f"target_modules {unmatched} match no nn.Linear module (nor Conv1D) of the model{hint}. "
                             f"The layers that can be targeted are named like: {candidate_names(model)}.")
    names = [n for n in names if not in_saved(n)]  # trained whole with their module to save
    if not names:
        raise ValueError(f"target_modules={targets!r} matches no nn.Linear module (nor Conv1D) of the model"
                         + (f" outside the modules to save {saved}" if saved else "")
                         + f". The layers that can be targeted are named like: {candidate_names(model)}.")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapter_types() -> tuple:
    """The module types that mean a model already carries adapters: this package's adapter models and layers, and
    peft's tuners and tuner layers."""
    return (BaseAdapterModel, BaseAdapterLayer, PeftModel, BaseTuner, BaseTunerLayer)


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
    kind = cls.__name__ if cls.__module__.startswith(__package__ or "hyperadalora") else f"{cls.__module__}.{cls.__qualname__}"
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
        in_features, out_features = layer_features(model.get_submodule(name))
        smaller = min(in_features, out_features)
        if smaller < r:
            raise ValueError(
                f"Target layer {name!r} (in_features={in_features}, out_features={out_features}) is "
                f"narrower than {rank_field}={r}: {reason} (here {smaller}). Lower {rank_field} to <= {smaller}, leave "
                f"{name!r} out of target_modules (train it in full with modules_to_save instead), or {fix}.")


class Injection:
    """Undo an adapter injection that failed half-way: put the base layers back and restore requires_grad, so that
    a model refused by `get_peft_model` / `load_adapter` stays the unmodified base model it was."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.replaced: list[tuple[str, nn.Module]] = []

    def replace(self, name: str, layer: nn.Module) -> None:
        original = self.model.get_submodule(name)
        replace_module(self.model, name, layer)
        self.replaced.append((name, original))

    def took(self, names: list[str], layers: list[nn.Module]) -> None:
        """The adapter ``layers`` (each with its ``base_layer``) were injected at ``names`` (by a wrapper)."""
        self.replaced = [(name, layer.base_layer) for name, layer in zip(names, layers)]

    def undo(self) -> None:
        for name, original in reversed(self.replaced):
            replace_module(self.model, name, original)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        self.replaced = []


def saved_layers_missing(model: nn.Module, names: list[str]) -> list[str]:
    """Descriptions of the saved target layers ``names`` that have no linear layer (nn.Linear or Conv1D) of that name
    in ``model``."""
    modules = dict(model.named_modules())
    missing = []
    for name in names:
        module = modules.get(name)
        if module is None:
            missing.append(name)
        elif not is_adaptable(module):
            missing.append(f"{name} (a {type(module).__name__}, not {ADAPTABLE})")
    return missing


def saved_heads_missing(model: nn.Module, tensors: dict, modules_to_save, target_names) -> list[str]:
    """The saved ``modules_to_save.*`` tensors that no module to save of ``model`` takes (what load_adapter would
    otherwise drop silently)."""
    targets = set(target_names)
    heads = [n for n in modules_to_save_names(model, modules_to_save) if n not in targets]
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
        parts.append(f"{len(missing)} of its {len(target_names)} adapted layers have no matching {ADAPTABLE} in the "
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
    injection = Injection(model)
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


DIGEST_KEY = "hyperadalora_sha256"                # metadata: the tensors' digest (`tensors_digest`)
CONFIG_DIGEST_KEY = "hyperadalora_config_sha256"  # metadata: the SHA-256 of the config file written beside it


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None,
                      config_path: Optional[str] = None) -> None:
    """Write ``tensors`` atomically (a temporary file, fsynced, renamed), with the digest of the tensors and, given
    ``config_path``, of that (already written) config file in the metadata: `load_safetensors_checked` refuses a
    file or config altered since."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    if config_path is not None:
        metadata[CONFIG_DIGEST_KEY] = file_sha256(config_path)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_safetensors_checked(path: str, config_path: Optional[str] = None) -> dict:
    """The tensors of a file written by `save_safetensors`; ValueError naming the file when it is unreadable
    (truncated...) or when it, or the config file beside it, no longer matches the digests it recorded (a flipped
    byte). Files written before the digests were recorded load unchecked."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted.") from e
    if DIGEST_KEY in metadata and tensors_digest(tensors) != metadata[DIGEST_KEY]:
        raise ValueError(f"{path} is corrupted: its tensors do not match the digest recorded in it. Not loaded.")
    if config_path is not None and CONFIG_DIGEST_KEY in metadata and \
            file_sha256(config_path) != metadata[CONFIG_DIGEST_KEY]:
        raise ValueError(f"{config_path} is corrupted or was changed after {os.path.basename(path)} was written "
                         f"beside it (its SHA-256 differs from the one recorded there). Not loaded.")
    return tensors


def full_precision(device: torch.device):
    """Autocast off for the hypernetworks: under bf16 autocast (mixed precision) they, their state and the
    generated tensors stay in their own precision (fp32); only the adapted layers run in bf16."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def world_size() -> int:
    """Processes of the default torch.distributed group (1 when not distributed)."""
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



# ---------------------------------------------------------------------------------------------- kernels
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


def tensors_digest(tensors: dict) -> str:
    """SHA-256 of a dict of tensors (names, dtypes, shapes and bytes, in name order): what a safetensors file's own
    header cannot vouch for (a flipped byte in the data loads silently)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
