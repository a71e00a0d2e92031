"""Export an adapter in the forms serving engines load: peft LoRA (per-layer ranks, or one rank padded with zeros)
and llama.cpp's GGUF LoRA adapter.

Every export goes through one neutral form, `LoraWeights`: per adapted module ``(A, B)`` with ``delta W = B @ A``
(the adapter's scale folded into B), A ``(r, in)``, B ``(out, r)``, r the module's rank (0 for a layer pruned to
rank 0). It is read from a live `HyperAdaLoraModel` (`lora_weights`) or from a saved adapter directory
(`read_adapter`: HyperAdaLoRA's ``save_pretrained`` or a peft LoRA adapter).

What the engines take (read in their sources; each claim names the file):

- peft (``PeftModel.from_pretrained``): per-layer ranks (``rank_pattern`` / ``alpha_pattern``). Tested here.
- vLLM: ``--max-lora-rank`` takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (``MaxLoRARanks`` in
  vllm/config/lora.py) and an adapter whose ``r`` exceeds it is refused (``PEFTHelper.validate_legal``,
  vllm/lora/peft_helper.py); ``PEFTHelper.from_dict`` keeps only ``r``, ``lora_alpha``, ``target_modules``, ...,
  not ``rank_pattern`` / ``alpha_pattern``, and scales every module by ``lora_alpha / r``; ``modules_to_save`` must
  be None. Not run here (vLLM needs a GPU build).
- LoRAX: reads ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora`` only, scales every layer by
  ``lora_alpha / r``, stacks one module type's A (and B) tensors over all layers (one rank per module type), and drops
  a module type for the adapter when any layer lacks its weights (server/lorax_server/adapters/lora.py,
  ``LoraWeights.load``). Not run here.
- llama.cpp: a GGUF with ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` and per base
  tensor ``<name>.lora_a`` (ne ``[in, r]``) / ``<name>.lora_b`` (ne ``[r, out]``); each tensor is scaled by
  ``alpha / r`` with r its own rank (``llama_adapter_lora_weight::get_scale``, src/llama-adapter.h), so per-layer
  ranks load; layout as llama.cpp's convert_lora_to_gguf.py writes it. Tested here with llama-cpp-python.

Hence the forms: ``peft`` (per-layer ranks; ``lora_alpha = r`` and ``alpha_pattern = rank_pattern``, so the scale is
1 at every layer, also for an engine that ignores the patterns), ``peft-uniform`` (one rank for every layer, zero rows
in A and zero columns in B, pruned layers as zero blocks, ``lora_alpha = r``: what vLLM and LoRAX take) and ``gguf``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoConfig

from .base_models import resolve_model_path, smollm2_gguf_path
from .config import CONFIG_NAME, HyperAdaLoraConfig
from .tuner_utils import ADAPTER_WEIGHTS_NAME, save_safetensors

# vLLM's allowed --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
FORMATS = ("peft", "peft-uniform", "gguf")


@dataclass
class LoraWeights:
    """A LoRA adapter as plain factors: per module name ``(A (r, in), B (out, r))`` with ``delta W = B @ A``."""

    layers: dict  # module name -> (A, B); r may be 0 (a pruned layer)
    heads: dict = field(default_factory=dict)  # trained heads (modules_to_save): "module.param" -> tensor
    head_modules: list = field(default_factory=list)  # their module names
    task_type: Optional[str] = None
    fan_in_fan_out: bool = False  # the adapted layers are transformers Conv1D (GPT-2): peft's fan_in_fan_out

    @property
    def ranks(self) -> dict:
        return {name: int(A.shape[0]) for name, (A, B) in self.layers.items()}

    def padded(self, rank: int) -> "LoraWeights":
        """Every layer at ``rank``: zero rows appended to A, zero columns to B (B @ A unchanged); a layer at rank 0
        becomes a zero block of that rank."""
        too_big = {n: r for n, r in self.ranks.items() if r > rank}
        if too_big:
            raise ValueError(f"rank {rank} is below the rank of {len(too_big)} layer(s) (e.g. {next(iter(too_big))!r} "
                             f"at {max(too_big.values())}): give a rank >= {max(too_big.values())}.")
        layers = {}
        for name, (A, B) in self.layers.items():
            pad = rank - A.shape[0]
            layers[name] = (torch.cat([A, A.new_zeros(pad, A.shape[1])], 0),
                            torch.cat([B, B.new_zeros(B.shape[0], pad)], 1))
        return LoraWeights(layers, dict(self.heads), list(self.head_modules), self.task_type, self.fan_in_fan_out)


# ---------------------------------------------------------------------------------------------- reading
@torch.no_grad()
def lora_weights(model) -> LoraWeights:
    """The adapter of a `HyperAdaLoraModel` (its kept ranks), or of another adapter model of this package whose
    update is ``B @ A`` (hyperlora, HydraLoRA with one head: its ``lora_factors``), as `LoraWeights`."""
    if getattr(model, "method_name", None) == "hyperadalora":
        scaling = model.peft_config.lora_alpha / model.peft_config.init_r
        layers = {name: (Q.detach().clone(), P * (lam * scaling))
                  for name, (P, lam, Q) in zip(model.target_names, model.final_tensors())}
    elif hasattr(model, "lora_factors") and hasattr(model, "method_name"):
        layers = model.lora_factors()  # ValueError for DoRA, a multi-head HydraLoRA
    else:
        raise TypeError(f"lora_weights takes an adapter model of this package, got {type(model).__name__}: a peft "
                        f"model exports with its own save_pretrained; a saved adapter directory with read_adapter.")
    heads = {k[len("modules_to_save."):]: v.detach().clone() for k, v in model._modules_to_save_state().items()}
    return LoraWeights(layers, heads, list(model.saved_module_names), model.peft_config.task_type,
                       any(getattr(a, "fan_in_fan_out", False) for a in model.adapters))


def read_adapter(directory: str) -> LoraWeights:
    """`LoraWeights` of a saved adapter: HyperAdaLoRA's ``save_pretrained`` (``hyperadalora_config.json``), another
    method's whose update is ``B @ A`` (``method_config.json`` of hyperlora, or of HydraLoRA with one head) or a peft
    LoRA adapter (``adapter_config.json``, e.g. written by ``export_lora`` or ``hyperadalora train --method lora``)."""
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return _read_hyperadalora(directory)
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        return _read_peft_lora(directory)
    if os.path.isfile(os.path.join(directory, "method_config.json")):
        return _read_method(directory)
    raise FileNotFoundError(f"{directory!r} is not an adapter directory: expected {CONFIG_NAME} (HyperAdaLoRA's "
                            f"save_pretrained, e.g. a run's adapter/) or adapter_config.json (a peft LoRA adapter).")


def _load_tensors(directory: str) -> dict:
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No adapter_model.safetensors in {directory!r}.")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted.") from e


def _head_modules(keys, spec) -> list:
    """Module names of saved head tensors ("module.param"): the shortest prefix that peft's rule (the name ends with
    an entry) matches to an entry of ``spec`` (modules_to_save), else the key without its last part."""
    names = []
    for key in keys:
        parts = key.split(".")
        found = next((".".join(parts[:i]) for i in range(1, len(parts))
                      if any(".".join(parts[:i]).endswith(t) for t in spec or ())),
                     key.rsplit(".", 1)[0])
        if found not in names:
            names.append(found)
    return names


def _read_hyperadalora(directory: str) -> LoraWeights:
    config = HyperAdaLoraConfig.from_pretrained(directory)
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        saved = json.load(f)
    tensors = _load_tensors(directory)
    names = saved.get("target_names") or sorted(k[:-len(".lora_P")] for k in tensors if k.endswith(".lora_P"))
    scaling = config.lora_alpha / config.init_r
    layers = {}
    for name in names:
        try:
            P, lam, Q = (tensors[f"{name}.lora_{k}"] for k in ("P", "lambda", "Q"))
        except KeyError as e:
            raise ValueError(f"{directory!r} has no tensor {e.args[0]!r}: the adapter file is incomplete.") from None
        layers[name] = (Q, P * (lam * scaling))
    heads = {k[len("modules_to_save."):]: v for k, v in tensors.items() if k.startswith("modules_to_save.")}
    return LoraWeights(layers, heads, _head_modules(heads, config.modules_to_save), config.task_type,
                       bool(saved.get("fan_in_fan_out", False)))


def _read_method(directory: str) -> LoraWeights:
    """`LoraWeights` of a saved adapter of another method of this package whose update is ``B @ A`` (hyperlora;
    hydralora / hyperhydralora with one head); ValueError for the others (DoRA, several heads)."""
    with open(os.path.join(directory, "method_config.json")) as f:
        saved = json.load(f)
    method, heads_n = saved.get("method"), saved.get("n_heads", 1)
    if method not in ("hyperlora", "hydralora", "hyperhydralora") or heads_n != 1:
        raise ValueError(f"{directory!r} holds a {method} adapter"
                         + (f" with n_heads={heads_n}" if heads_n != 1 else "")
                         + ", whose update is not a plain LoRA B @ A: it does not export to serving formats (hyperlora,"
                           " HydraLoRA with one head, HyperAdaLoRA and peft LoRA adapters do).")
    tensors = _load_tensors(directory)
    scaling = float(saved["lora_alpha"]) / int(saved["r"])
    names = saved.get("target_names") or sorted({k.split(".lora_", 1)[0] for k in tensors
                                                 if ".lora_" in k and not k.startswith("modules_to_save.")})
    layers = {}
    for name in names:
        try:
            layers[name] = (tensors[f"{name}.lora_A.0"], tensors[f"{name}.lora_B.0"] * scaling)
        except KeyError as e:
            raise ValueError(f"{directory!r} has no tensor {e.args[0]!r}: the adapter file is incomplete.") from None
    heads = {k[len("modules_to_save."):]: v for k, v in tensors.items() if k.startswith("modules_to_save.")}
    return LoraWeights(layers, heads, _head_modules(heads, saved.get("modules_to_save")), saved.get("task_type"),
                       bool(saved.get("fan_in_fan_out", False)))


def _read_peft_lora(directory: str) -> LoraWeights:
    with open(os.path.join(directory, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{directory!r} holds a peft {cfg.get('peft_type')} adapter; only LORA (or a HyperAdaLoRA "
                         f"adapter) exports to serving formats.")
    if cfg.get("use_dora"):  # fan_in_fan_out (Conv1D layers) keeps A (r, in) and B (out, r): a plain B @ A
        raise ValueError(f"{directory!r}: a LoRA adapter with use_dora is not a plain B @ A update; it does not "
                         f"export.")
    tensors = _load_tensors(directory)
    prefix, layers, heads = "base_model.model.", {}, {}
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def pattern(pat, name, default):  # peft: the longest key of the pattern that the module name ends with
        hits = [k for k in pat if name == k or name.endswith("." + k)]
        return pat[max(hits, key=len)] if hits else default

    for key, value in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name.endswith(".lora_A.weight"):
            module = name[:-len(".lora_A.weight")]
            try:
                B = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
            except KeyError:
                raise ValueError(f"{directory!r}: {key!r} has no lora_B partner.") from None
            r = pattern(rank_pattern, module, cfg["r"])
            alpha = pattern(alpha_pattern, module, cfg["lora_alpha"])
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            layers[module] = (value, B * scale)
        elif ".lora_" in name:
            if not name.endswith(".lora_B.weight"):
                raise ValueError(f"{directory!r}: tensor {key!r} is neither lora_A nor lora_B of a linear layer "
                                 f"(embedding LoRA does not export).")
        else:
            heads[name] = value
    if not layers:
        raise ValueError(f"{directory!r} holds no lora_A / lora_B tensors.")
    return LoraWeights(layers, heads, _head_modules(heads, cfg.get("modules_to_save")), cfg.get("task_type"),
                       bool(cfg.get("fan_in_fan_out")))


# ---------------------------------------------------------------------------------------------- the rank
def uniform_rank(ranks: Sequence[int], rank: Union[int, str, None] = "auto",
                 allowed: Optional[Sequence[int]] = None) -> int:
    """The one rank to pad to: ``rank`` itself, or ("auto") the smallest that holds every layer; with ``allowed``
    (e.g. `VLLM_MAX_LORA_RANKS`) rounded up to the smallest allowed value."""
    need = max([int(r) for r in ranks] + [1])
    if rank in (None, "auto"):
        rank = need
    elif not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer or 'auto', got {rank!r}.")
    elif rank < need:
        raise ValueError(f"rank {rank} is below the largest layer rank {need}: give a rank >= {need}, or 'auto'.")
    if allowed:
        fits = sorted(a for a in allowed if a >= rank)
        if not fits:
            raise ValueError(f"no allowed rank holds rank {rank} (allowed: {sorted(allowed)}).")
        rank = fits[0]
    return rank


# ---------------------------------------------------------------------------------------------- writing
def write_peft(weights: LoraWeights, directory: str, base_model_name_or_path: Optional[str] = None) -> None:
    """A peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) of ``weights``, with LoRA scale
    1 at every layer: ``lora_alpha = r``, and for layers of another rank ``rank_pattern`` with ``alpha_pattern``
    equal to it. Layers at rank 0 are left out (pad first, `LoraWeights.padded`, to keep them as zero blocks)."""
    ranks = {n: r for n, r in weights.ranks.items() if r > 0}
    if not ranks:
        raise ValueError("Every layer was pruned to rank 0: the adapter is empty; nothing to export as LoRA.")
    tensors = {}
    for name in ranks:
        A, B = weights.layers[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    for key, value in weights.heads.items():
        tensors["base_model.model." + key] = value
    max_r = max(ranks.values())
    others = {k: v for k, v in ranks.items() if v != max_r}
    os.makedirs(directory, exist_ok=True)
    cfg = LoraConfig(r=max_r, lora_alpha=max_r, target_modules=sorted(ranks), lora_dropout=0.0,
                     rank_pattern=others, alpha_pattern=dict(others), fan_in_fan_out=weights.fan_in_fan_out,
                     modules_to_save=list(weights.head_modules) or None, task_type=weights.task_type,
                     base_model_name_or_path=base_model_name_or_path)
    cfg.save_pretrained(directory)
    save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), {"format": "pt"})


# HF model_type -> (llama.cpp architecture, whether llama.cpp's converter permutes q_proj / k_proj rows for RoPE:
# LlamaModel.permute in convert_hf_to_gguf.py, used by its Llama/Mistral class; Qwen2/Qwen3 classes do not)
# GPT-2: llama.cpp's converter transposes its Conv1D weights to (out, in), so the LoRA tensors keep their layout)
GGUF_ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
               "qwen3": ("qwen3", False), "gpt2": ("gpt2", False)}
PERMUTED_ARCHES = {"llama"}


@dataclass
class GgufBase:
    """What the GGUF export needs of the base model: llama.cpp's architecture, block count, attention heads, and,
    when read from the base's GGUF file, its tensors' shapes (to check the adapter against)."""

    arch: str
    n_blocks: int
    n_head: int
    n_head_kv: int
    tensor_shapes: Optional[dict] = None  # GGUF name -> ne (in, out); None when read from an HF config

    @classmethod
    def from_gguf(cls, path: str) -> "GgufBase":
        import gguf

        reader = gguf.GGUFReader(path)

        def value(key):
            f = reader.fields.get(key)
            if f is None:
                raise ValueError(f"{path}: no {key!r} in the GGUF metadata; is this a llama.cpp model file?")
            return f.contents()

        arch = value("general.architecture")
        if arch not in {a for a, _ in GGUF_ARCHES.values()}:
            raise ValueError(f"{path}: architecture {arch!r} is not supported by the GGUF export (supported: "
                             f"{sorted({a for a, _ in GGUF_ARCHES.values()})}).")
        n_head = int(value(f"{arch}.attention.head_count"))
        kv = reader.fields.get(f"{arch}.attention.head_count_kv")
        shapes = {t.name: tuple(int(s) for s in t.shape) for t in reader.tensors}
        return cls(arch, int(value(f"{arch}.block_count")), n_head, int(kv.contents()) if kv else n_head, shapes)

    @classmethod
    def from_hf_config(cls, config) -> "GgufBase":
        model_type = getattr(config, "model_type", None)
        if model_type not in GGUF_ARCHES:
            raise ValueError(f"model_type {model_type!r} is not supported by the GGUF export (supported: "
                             f"{sorted(GGUF_ARCHES)}).")
        n_head = config.num_attention_heads
        return cls(GGUF_ARCHES[model_type][0], config.num_hidden_layers, n_head,
                   getattr(config, "num_key_value_heads", None) or n_head)

    @classmethod
    def load(cls, base: str) -> "GgufBase":
        """From a ``.gguf`` file, the alias ``smollm2`` (its GGUF file) or a transformers model directory."""
        if base == "smollm2":
            base = smollm2_gguf_path()
        if base.endswith(".gguf"):
            if not os.path.isfile(base):
                raise FileNotFoundError(f"Base model file {base!r} does not exist.")
            return cls.from_gguf(base)
        return cls.from_hf_config(AutoConfig.from_pretrained(resolve_model_path(base, "instruction")))


def _rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permutation: within each head, the two halves of the head dimension
    interleaved (GGUF row i = HF row order[i])."""
    if n_rows % (2 * n_head):
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of even size.")
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def gguf_tensor_name(module: str, base: GgufBase) -> str:
    """llama.cpp's name of the weight of HF module ``module`` (e.g. ``model.layers.0.self_attn.q_proj`` ->
    ``blk.0.attn_q.weight``), from gguf-py's tensor name map."""
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == base.arch)
    name = gguf.get_tensor_name_map(arch, base.n_blocks).get_name(module)
    if name is None:
        raise ValueError(f"module {module!r} has no llama.cpp tensor in architecture {base.arch!r}.")
    return name + ".weight"


def write_gguf(weights: LoraWeights, path: str, base: GgufBase, dtype: str = "f32") -> None:
    """llama.cpp's LoRA adapter GGUF of ``weights`` (layout of llama.cpp's convert_lora_to_gguf.py): per module
    ``<gguf name>.lora_a`` = A and ``.lora_b`` = B (q/k rows permuted as llama.cpp's converter permutes the base
    weights), ``adapter.lora.alpha`` = the largest rank, and each B multiplied by ``rank / alpha`` so that llama.cpp's
    per-tensor scale ``alpha / rank`` gives ``B @ A`` itself. Layers at rank 0 are left out."""
    import gguf
    import numpy as np

    if weights.heads:
        raise ValueError(f"The adapter trains whole modules ({', '.join(weights.head_modules)}: modules_to_save); a "
                         f"llama.cpp LoRA adapter holds only low-rank updates: train without them, or merge the "
                         f"adapter (merge_and_unload) and convert the merged model.")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be f32 or f16, got {dtype!r}.")
    ranks = {n: r for n, r in weights.ranks.items() if r > 0}
    if not ranks:
        raise ValueError("Every layer was pruned to rank 0: the adapter is empty; nothing to export.")
    alpha = max(ranks.values())
    permute = base.arch in PERMUTED_ARCHES
    out = []
    for module in sorted(ranks):
        A, B = (t.detach().float().cpu() for t in weights.layers[module])
        name = gguf_tensor_name(module, base)
        if permute and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = base.n_head if ".attn_q." in name else base.n_head_kv
            B = B[_rope_rows(B.shape[0], heads)]
        if base.tensor_shapes is not None:
            shape = base.tensor_shapes.get(name)
            if shape is None:
                raise ValueError(f"{module!r} maps to {name!r}, which the base GGUF file does not have: the adapter "
                                 f"was trained on another model.")
            if tuple(shape) != (A.shape[1], B.shape[0]):
                raise ValueError(f"{name!r} is {tuple(shape)} (in, out) in the base GGUF file but the adapter's "
                                 f"{module!r} is ({A.shape[1]}, {B.shape[0]}): trained on another model.")
        B = B * (ranks[module] / alpha)
        np_dtype = np.float32 if dtype == "f32" else np.float16
        out.append((name + ".lora_a", A.numpy().astype(np_dtype)))
        out.append((name + ".lora_b", B.numpy().astype(np_dtype)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = gguf.GGUFWriter(path, base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, array in out:
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_gguf(src: str, dst: str) -> str:
    """A copy of the GGUF model ``src`` at ``dst`` with every tensor dequantized to F32: the weights the transformers
    model converted from ``src`` computes with. To check a GGUF adapter export in llama.cpp against the transformers
    model, use this copy as llama.cpp's base: on a quantized base (SmolLM2's shipped Q4_1) llama.cpp's own logits
    differ from the transformers model's by more than a small adapter changes them. Returns ``dst``."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if not key.startswith("GGUF.") and key not in ("general.architecture", "general.file_type"):
            writer.add_key_value(key, f.contents(), f.types[0],
                                 sub_type=f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def export(weights: LoraWeights, output: str, format: str = "peft", rank: Union[int, str, None] = None,
           allowed_ranks: Optional[Sequence[int]] = None, base: Optional[str] = None,
           dtype: Optional[str] = None) -> str:
    """Write ``weights`` as ``format`` (`FORMATS`) to ``output`` (a directory; a ``.gguf`` file for gguf) and
    return the path. ``rank`` / ``allowed_ranks``: peft-uniform's rank (`uniform_rank`; default: the smallest that
    holds every layer). ``base``: the base model (gguf: required, a .gguf file, ``smollm2`` or a transformers
    directory; peft: recorded as ``base_model_name_or_path``). ``dtype``: gguf's tensor type, f32 (default) or
    f16."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if format != "peft-uniform" and (rank is not None or allowed_ranks):
        raise ValueError(f"rank / allowed ranks apply to --format peft-uniform, not {format} (which keeps each "
                         f"layer's own rank).")
    if format == "gguf":
        if not base:
            raise ValueError("The GGUF export needs the base model (--base: its .gguf file, 'smollm2', or a "
                             "transformers model directory): llama.cpp's tensor names and q/k row order depend on it.")
        write_gguf(weights, output, GgufBase.load(base), dtype=dtype or "f32")
        return output
    if dtype is not None:
        raise ValueError(f"dtype applies to --format gguf; the peft forms keep the adapter's dtype (got {dtype!r}).")
    if format == "peft-uniform":
        weights = weights.padded(uniform_rank(list(weights.ranks.values()), rank if rank is not None else "auto",
                                              allowed_ranks))
    write_peft(weights, output, base_model_name_or_path=base)
    return output
