"""Quantized base layers (bitsandbytes 4-bit nf4 / fp4 and 8-bit) and gradient checkpointing.

A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` is an ``nn.Linear`` whose ``weight`` is packed (4-bit: a
``(in * out / 2, 1)`` uint8 tensor; 8-bit: int8 with row scales), so nothing that needs the real matrix may read
``weight`` directly. The adapter layers wrap such a layer as they wrap any ``nn.Linear`` (the adapter's output is
added to the quantized layer's output, in/out features read from the layer), and what needs ``W0`` itself (the
principal seeds, DoRA's magnitude and weight norm, merging) asks `dequantized_weight`.

Merging into a quantized layer would round the update away (or re-quantize the sum, changing the base too), so
``merge_and_unload`` refuses a quantized base unless called with ``dequantize=True``, which replaces each adapted
quantized layer by a dense ``nn.Linear`` holding ``dequantized W0 + update`` (`dense_linear`).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")


def quantization_kind(layer: nn.Module) -> Optional[str]:
    """``"4bit"`` / ``"8bit"`` for a bitsandbytes quantized linear layer, None for anything else (a model that holds
    one has imported bitsandbytes, so this never imports it)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer`` is transformers' ``Conv1D`` (GPT-2 and the families built on it): a linear layer whose weight
    is stored ``(in_features, out_features)``, transposed (peft's ``fan_in_fan_out``). A model that holds one has
    imported transformers, so this never imports it."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(layer, utils.Conv1D)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer: an ``nn.Linear`` (bitsandbytes layers included) or a
    transformers ``Conv1D`` (``nx``, ``nf``)."""
    if is_conv1d(layer):
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    return layer.in_features, layer.out_features


def write_dense_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight`` ``(out_features, in_features)`` into a dense linear layer's weight (transposed for a
    ``Conv1D``), in the layer's dtype."""
    target = layer.weight.data
    target.copy_((weight.t() if is_conv1d(layer) else weight).to(target.dtype))


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is, or holds, a bitsandbytes quantized linear layer."""
    return any(quantization_kind(m) is not None for m in module.modules())


def dequantized_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of a linear layer as a dense ``dtype`` tensor, without a gradient:
    ``layer.weight`` for a plain ``nn.Linear`` (transposed for a transformers ``Conv1D``), the dequantized matrix for a
    bitsandbytes 4-bit or 8-bit layer. For a dense layer in its own dtype this is a view of the weight: clone it before
    changing it in place."""
    if is_conv1d(layer):
        return layer.weight.detach().t().to(dtype)
    kind = quantization_kind(layer)
    if kind is None or layer.weight.is_floating_point():  # an 8-bit layer with has_fp16_weights keeps a float weight
        return layer.weight.detach().to(dtype)
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    with torch.no_grad():
        if kind == "4bit":
            _unpack_for_cpu(layer)  # a weight repacked for bitsandbytes' CPU inference kernel: see keep_trainable_layout
            dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        else:
            scales = getattr(weight, "SCB", None)
            if scales is None:
                scales = layer.state.SCB  # moved to the layer's state at its first forward
            if scales is None:
                raise ValueError(f"The 8-bit layer {layer} has an int8 weight but no row scales (SCB): it was not "
                                 f"quantized by bitsandbytes; load it with a BitsAndBytesConfig, or move it to its "
                                 f"device (which quantizes it), before adding adapters.")
            dense = bnbf.int8_vectorwise_dequant(weight.data, scales)
    shape = (layer.out_features, layer.in_features)
    if tuple(dense.shape) != shape:
        raise RuntimeError(f"Dequantizing {type(layer).__name__} gave a {tuple(dense.shape)} weight, expected {shape}.")
    return dense.to(dtype)


def keep_trainable_layout(model: nn.Module) -> int:
    """Keep every 4-bit layer of ``model`` in the layout its backward needs; returns how many were repacked.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weight for a faster inference kernel at
    its first forward in eval mode under no_grad, and keeps it so: a later training forward then takes that kernel,
    which has no backward (it fails, "a view of a leaf Variable ... in-place", or passes no gradient to the layers
    before it). An adapter model trains after evaluations, so its 4-bit layers stay unpacked (the repacking is
    undone if it happened already); inference then runs bitsandbytes' generic 4-bit kernel."""
    repacked = 0
    for module in model.modules():
        if quantization_kind(module) != "4bit":
            continue
        module.support_avx512bf16_for_cpu = False
        repacked += _unpack_for_cpu(module)
    return repacked


def _unpack_for_cpu(layer: nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit layer's weight, in place (bitsandbytes' own inverse;
    its block scales were rounded to bf16 by the repacking and stay so). Returns whether it was repacked."""
    weight = layer.weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = weight.quant_state
    return True


def dense_dtype(layer: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in (its ``compute_dtype``, else its bias's, else fp32)."""
    dtype = getattr(layer, "compute_dtype", None)
    if dtype is None and getattr(layer, "bias", None) is not None:
        dtype = layer.bias.dtype
    return dtype if dtype is not None and dtype.is_floating_point else torch.float32


def dense_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (out, in) and ``layer``'s bias, in `dense_dtype` on its device."""
    dtype = dense_dtype(layer)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dtype))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.to(dtype))
    dense.requires_grad_(False)
    return dense


def refuse_quantized_merge(layers, names) -> None:
    """The error of ``merge_and_unload()`` on a quantized base (``dequantize=True`` merges into dense layers)."""
    quantized = [(n, quantization_kind(layer.base_layer)) for n, layer in zip(names, layers)
                 if quantization_kind(layer.base_layer) is not None]
    if quantized:
        name, kind = quantized[0]
        raise ValueError(
            f"merge_and_unload: {len(quantized)} adapted layer(s) have a quantized ({kind}) base, e.g. {name!r}. Adding "
            f"the update into a {kind} weight would round most of it away (or re-quantize W0 + update, changing the "
            f"base as well). Call merge_and_unload(dequantize=True) to replace those layers by dense nn.Linear layers "
            f"holding the dequantized W0 plus the update (same outputs, full-size weights), or keep the adapter "
            f"unmerged: save_pretrained / load_adapter onto the quantized base.")


# ---------------------------------------------------------------------------------------------- loading
def bnb_config(load_in_4bit: bool = False, load_in_8bit: bool = False, quant_type: str = "nf4",
               compute_dtype: torch.dtype = torch.float32, skip_modules=None):
    """A ``transformers.BitsAndBytesConfig`` for ``from_pretrained`` (None when neither is set). ``skip_modules``:
    modules left unquantized (the task heads: the classifier and the pooler of an encoder, the LM head)."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are exclusive: choose one.")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: choose one of {QUANT_TYPES} (4-bit NormalFloat or FloatPoint).")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        from .extras import missing

        raise missing("bitsandbytes", "A 4-bit / 8-bit base (bitsandbytes 0.50.2 runs on CPUs and GPUs)") from e
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def prepare_quantized_base(model: nn.Module) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` without its gradient checkpointing (a flag of its own here,
    `enable_gradient_checkpointing`), after `keep_trainable_layout`: freezes the base and casts its fp16 / bf16 non-quantized parameters (layer
    norms, embeddings, heads) to fp32 for stable training."""
    from peft import prepare_model_for_kbit_training

    keep_trainable_layout(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# ---------------------------------------------------------------------------------------------- checkpointing
def enable_gradient_checkpointing(model: nn.Module, checkpoint_kwargs: Optional[dict] = None, **options) -> None:
    """Gradient (activation) checkpointing of the transformers model inside ``model`` (one of this package's
    wrappers, a peft model or the transformers model itself): each layer's activations are recomputed in backward.

    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint``; ``use_reentrant`` defaults to False here
    (whatever the transformers version's default), which needs no input that requires grad. With
    ``use_reentrant=True`` the input embeddings' output is made to require grad (else no gradient would reach the
    adapters inside a checkpointed layer of a frozen base), as peft and transformers do. ``options``
    (``every_n_layers``, ``offload``) go to transformers' ``activation_checkpointing_enable``. Generated adapters
    (HyperAdaLoRA and the hyper* methods) need the non-reentrant form: ``use_reentrant=True`` is refused for them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    if kwargs["use_reentrant"] and hasattr(model, "hypernetwork_parameters") and model.hypernetwork_parameters():
        raise ValueError(
            f"use_reentrant=True cannot checkpoint a model whose adapter tensors are generated by hypernetworks "
            f"({type(model).__name__}): reentrant checkpointing runs a separate backward per layer, and the first one "
            f"frees the generation graph that every layer's tensors share. Use the default use_reentrant=False "
            f"(the same losses, bit for bit).")
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing (transformers' "
                         f"supports_gradient_checkpointing is False): train without it.")
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
    if kwargs["use_reentrant"] and hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
