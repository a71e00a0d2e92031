"""What every adapter method of this package declares: its config, its adapter layer, its `Method` record.

A method is one small module (see `hyperlora.py`) that declares:

- a **config** dataclass (a `MethodConfig`; with the hypernetwork options of `HypernetOptions` when some of its
  tensors are generated),
- an **adapter layer** (an `AdapterLayer` subclass): which tensors it has per *role* (``A``, ``B``, ...) and their
  shapes, and how they change the output of the wrapped ``nn.Linear``,
- a `Method` record: its name, those two classes, and which roles the hypernetworks generate.

`adapter_model.AdapterModel` does the rest for every method: injection into a transformers model, one
`generator.RoleGenerator` (one shared hypernetwork) per generated role for all layers, generation with a graph at
every training forward and once (cached) in evaluation, the recurrent commit after each optimizer step, the
trainable state for checkpoints, save/load (safetensors + JSON) and merging.

A role's tensor is handed to its hypernetwork token-major, as HyperAdaLoRA's P and Q are: one token per row of a
``(n, r)`` tensor (LoRA's B) or per column of a ``(r, n)`` tensor (LoRA's A), of width r. A role with
``zero_start`` (LoRA's B) is installed as ``G - G_0``, the generated tensor minus the seed state it is generated
from: exactly zero at step 0 (the adapter starts as the identity) while the hypernetwork still sees distinct,
non-zero tokens (an all-zero seed would give every row the same token, and so the same generated row, forever).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from ..config import (ADALORA_ONLY_FIELDS, ADAPTER_FIELDS, DEFAULT_MODULES_TO_SAVE, HYPERNET_FIELDS,  # noqa: F401
                      TASK_TYPES, HyperAdaLoraConfig)
from ..quantization import dense_dtype, dequantized_weight, is_conv1d, layer_features, quantization_kind
from ..tuner_utils import ADAPTABLE, flat_base_forward, is_adaptable
from ..wrapper import BaseAdapterLayer

METHOD_CONFIG_NAME = "method_config.json"
METHODS: dict[str, "Method"] = {}


# ---------------------------------------------------------------------------------------------- configs
@dataclass
class MethodConfig:
    """Fields every method has. Subclasses set ``method`` (the name used by ``--method``) and add their own."""

    method: ClassVar[str] = ""

    r: int = field(default=3, metadata={"help": "Rank of the adapter: A is (r x d_in), B is (d_out x r)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scale: the update is multiplied by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match), a regex (full match), 'all-linear', or None for the "
                          "architecture's defaults."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (SEQ_CLS: the head)."})
    task_type: Optional[str] = field(default=None, metadata={"help": "peft task type, e.g. SEQ_CLS or CAUSAL_LM."})
    seed: int = field(default=0, metadata={"help": "Seed of the adapter's (and hypernetworks') initialisation."})

    def __post_init__(self):
        for name in ("r", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
        for name in ("lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
            setattr(self, name, float(value))
        if self.r < 1:
            raise ValueError(f"r={self.r} must be >= 1 (the rank of the adapter): set r to a positive rank, e.g. 8.")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0: the update is scaled by lora_alpha / r, so 0 "
                             f"switches the adapter off and a negative value flips its sign. Use a positive value "
                             f"(e.g. 16, the default).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1): it is the probability of zeroing "
                             f"an input feature of the adapter (0: no dropout; 0.05-0.1 is usual).")
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
            if self.task_type not in TASK_TYPES:
                raise ValueError(f"task_type={self.task_type!r} is not supported: choose one of {TASK_TYPES}.")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if self.modules_to_save is None and self.task_type in DEFAULT_MODULES_TO_SAVE:
            self.modules_to_save = list(DEFAULT_MODULES_TO_SAVE[self.task_type])

    # ---- (de)serialisation ----
    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        """The config of ``data["method"]`` (or of ``cls``) from a dict; unknown fields are an error."""
        data = dict(data)
        name = data.pop("method", None) or cls.method
        target = get_method(name).config_cls if name else cls
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - names - {"target_names", "peft_type", "hyperadalora_version", "fan_in_fan_out"})
        if unknown:
            raise ValueError(f"Unknown {target.__name__} field(s) {unknown}; valid fields: {sorted(names)}.")
        return target(**{k: v for k, v in data.items() if k in names})

    def save_pretrained(self, directory: str, **extra) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, METHOD_CONFIG_NAME), "w") as f:
            json.dump({**self.to_dict(), **extra}, f, indent=2, sort_keys=True)

    @staticmethod
    def from_pretrained(directory: str) -> "MethodConfig":
        path = os.path.join(directory, METHOD_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {METHOD_CONFIG_NAME} in {directory!r}: is this a directory written by "
                                    f"an adapter model's save_pretrained?")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}).") from e
        if data.get("method") not in METHODS:
            raise ValueError(f"{path}: unknown method {data.get('method')!r}; known: {sorted(METHODS)}.")
        return MethodConfig.from_dict(data)


# HyperAdaLoRA's fields that belong to its adapter (AdaLoRA's rank allocation and SVD form, or the fields every
# MethodConfig has); every other field of HyperAdaLoraConfig is a hypernetwork option, shared by all methods:
# ADALORA_ONLY_FIELDS, ADAPTER_FIELDS, HYPERNET_FIELDS, from the config fields' metadata (config.fields_of).


# Where the generated methods' defaults differ from HyperAdaLoRA's. init: HyperAdaLoRA seeds P and Q with W0's top
# singular vectors; seeding LoRA's A that way made the generated LoRA / DoRA learn far slower than random orthonormal
# seeds, as LoRA's own random A (SST-2, 80 steps at lr 1e-3: HyperLoRA's final smoothed loss 0.685 / 0.533 on seeds
# 0 / 1 with principal seeds, 0.449 / 0.458 with orthonormal ones; peft's LoRA 0.475 / 0.424;
# docs/results/archive/extension/, docs/results/extension-orthonormal/).
METHOD_DEFAULTS = {"init": "orthonormal"}


def _copy_field(f: dataclasses.Field):
    kw = {"metadata": f.metadata}
    if f.name in METHOD_DEFAULTS:
        kw["default"] = METHOD_DEFAULTS[f.name]
    elif f.default is not MISSING:
        kw["default"] = f.default
    elif f.default_factory is not MISSING:
        kw["default_factory"] = f.default_factory
    return f.name, f.type, field(**kw)


class _HypernetValidation:
    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the adapter fields (MethodConfig)
            parent()
        if self.basis != "free":  # HyperAdaLoRA's P and Q only: a generated method would silently ignore it
            raise ValueError(f"{type(self).__name__}: basis={self.basis!r} applies to HyperAdaLoRA's P and Q only; "
                             f"leave basis='free' (the default) for {getattr(self, 'method', 'this method')}.")
        try:
            cfg = self.hypernet_config()
        except (TypeError, ValueError) as e:
            raise type(e)(f"{type(self).__name__}: {e}") from None
        for name in HYPERNET_FIELDS:  # normalised values (e.g. ints given for floats)
            setattr(self, name, getattr(cfg, name))

    def hypernet_config(self) -> HyperAdaLoraConfig:
        """A `HyperAdaLoraConfig` holding this config's hypernetwork options (and seed): what every `RoleGenerator`
        reads. Built, and so validated, by HyperAdaLoRA's own config class."""
        return HyperAdaLoraConfig(**{name: getattr(self, name) for name in HYPERNET_FIELDS},
                                  seed=getattr(self, "seed", 0))


# The hypernetwork options: every HyperAdaLoraConfig field that is not AdaLoRA's (hypernet, attention, generation,
# tokens, context, hypernet_dim, output_scale, momentum, hypernet_lr_ratio, init, ..., and any field added there
# later), with the same defaults and help, validated by HyperAdaLoraConfig itself.
HypernetOptions = dataclasses.make_dataclass("HypernetOptions", [_copy_field(f) for f in dataclasses.fields(
    HyperAdaLoraConfig) if f.name in HYPERNET_FIELDS], bases=(_HypernetValidation,))
HypernetOptions.__module__ = __name__
HypernetOptions.__doc__ = ("The hypernetwork options of HyperAdaLoraConfig (same names, defaults and validation); "
                           "a generated method's config inherits them.")


# ---------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class RoleSpec:
    """How a role's tensors are laid out and initialised.

    Args:
        rank_axis: the axis of the role's tensors that is the rank: 0 for ``(r, n)`` tensors (LoRA's A, one token per
            column), 1 for ``(n, r)`` tensors (LoRA's B, one token per row).
        zero_start: the tensor is zero at step 0: trained, it is zero-initialised; generated, the layer gets
            ``G - G_0`` (the generated tensor minus its seed state).
    """

    rank_axis: int
    zero_start: bool = False


@dataclass(frozen=True)
class Method:
    """A method: its ``--method`` name, config class, adapter layer class and the roles its hypernetworks generate."""

    name: str
    config_cls: type
    layer_cls: type
    generated: tuple = ()
    description: str = ""
    model_cls: Optional[type] = None  # the method's own `adapter_model.AdapterModel` subclass (HyperAdaLoRA's), if any

    def __post_init__(self):
        unknown = set(self.generated) - set(self.layer_cls.ROLES)
        if unknown:
            raise ValueError(f"Method {self.name!r} generates roles {sorted(unknown)} that {self.layer_cls.__name__} "
                             f"does not have (it has {sorted(self.layer_cls.ROLES)}).")
        if self.config_cls.method != self.name:
            raise ValueError(f"{self.config_cls.__name__}.method={self.config_cls.method!r} but the method is "
                             f"registered as {self.name!r}.")
        if self.generated and not hasattr(self.config_cls, "hypernet_config"):
            raise ValueError(f"Method {self.name!r} generates tensors: its config must inherit HypernetOptions.")


def register(method: Method) -> Method:
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"Method {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------- the layer
class AdapterLayer(BaseAdapterLayer):
    """A linear layer (``nn.Linear``, or transformers' ``Conv1D`` whose weight is stored transposed: peft's
    ``fan_in_fan_out``) with an adapter. Subclasses define `ROLES`, `shapes`, `adapt` and (if defined) `merged_weight`,
    and may add trained parameters in `setup` (DoRA's magnitude, HydraLoRA's router).

    A role that is *trained* is an ``nn.ParameterList`` ``lora_<role>`` of this layer; a role that is *generated*
    has no parameter: the model installs this step's tensors (`install`) before every forward.
    """

    ROLES: ClassVar[dict[str, RoleSpec]] = {}

    def __init__(self, base_layer: nn.Module, config: MethodConfig, index: int, generated: tuple = ()):
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"{type(self).__name__} wraps {ADAPTABLE} layers, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)  # W0 stored (in, out): base_weight() gives it (out, in)
        self.index = index
        self.r = config.r
        self.scaling = config.lora_alpha / config.r
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.in_features, self.out_features = layer_features(base_layer)
        self.generated = tuple(generated)
        self.disabled = False
        self._installed: dict[str, Optional[list]] = {role: None for role in self.generated}
        self.setup(config)
        for role, shapes in self.shapes().items():
            if role not in self.generated:
                tensors = [self.init_trained(role, torch.empty(shape)) for shape in shapes]
                self.set_trained(role, tensors)

    # ---- what a method defines ----
    def setup(self, config: MethodConfig) -> None:
        """Extra attributes and trained parameters (called before the roles' tensors are created)."""

    def shapes(self) -> dict[str, list[tuple[int, int]]]:
        """{role: [shape of each of its tensors in this layer]}."""
        raise NotImplementedError

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output given its input ``x`` and the base layer's output ``out``."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The weight that gives the same outputs without the adapter (``ValueError`` where there is none)."""
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weight.")

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, in), B (out, r))`` with ``B @ A`` the update, the scale folded into B: the layer as a plain LoRA
        layer (the peft LoRA export). ``ValueError`` for a method whose update is not ``B @ A`` (`has_lora_form`)."""
        raise ValueError(f"{type(self).__name__} is not a plain LoRA update B @ A: it does not export as peft LoRA.")

    def has_lora_form(self) -> bool:
        """Whether `lora_factors` gives this layer's update."""
        return False

    def init_trained(self, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """Initialisation of a trained role's tensor: zeros for ``zero_start`` roles, else nn.Linear's (Kaiming
        uniform, as peft's LoRA initialises A)."""
        if self.ROLES[role].zero_start:
            return nn.init.zeros_(tensor)
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    # ---- tensors ----
    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W0 ``(d_out, d_in)`` as a dense tensor without a gradient (dequantized for a 4-bit / 8-bit base), in
        ``dtype`` (default: the weight's own, or the quantized layer's compute dtype)."""
        if quantization_kind(self.base_layer) is None:
            w = self.base_layer.weight.detach()
            w = w.t() if self.fan_in_fan_out else w
            return w if dtype is None else w.to(dtype)
        return dequantized_weight(self.base_layer, dtype or dense_dtype(self.base_layer))

    def set_trained(self, role: str, tensors: list[torch.Tensor], requires_grad: bool = True) -> None:
        """Make ``role`` a trained role of this layer with these tensors (``lora_<role>``, an nn.ParameterList)."""
        w = self.base_layer.weight
        # adapters train in fp32 (also on a quantized base, whose weight is uint8 / int8)
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        params = nn.ParameterList([nn.Parameter(t.detach().clone().to(device=w.device, dtype=dtype),
                                                requires_grad=requires_grad) for t in tensors])
        setattr(self, f"lora_{role}", params)
        self._installed.pop(role, None)
        self.generated = tuple(r for r in self.generated if r != role)

    def install(self, role: str, tensors: list[torch.Tensor]) -> None:
        """Hand the layer this step's generated tensors of ``role``."""
        self._installed[role] = tensors

    def tensors(self, role: str, dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
        ts = self._installed[role] if role in self._installed else list(getattr(self, f"lora_{role}"))
        if ts is None:
            raise RuntimeError(f"The generated {role} tensors of layer {self.index} were not installed: run the "
                               f"model (or its materialize()) first.")
        return [t.to(dtype) if dtype is not None and t.dtype != dtype else t for t in ts]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything of the adapter (not the base layer): ``lora_<role>.<k>`` for every role's tensors, generated
        or trained, and the layer's other parameters (e.g. ``magnitude``, ``router.weight``)."""
        state = {f"lora_{role}.{k}": t for role in self.ROLES for k, t in enumerate(self.tensors(role))}
        state.update({n: p for n, p in self.named_parameters()
                      if not n.startswith(("base_layer.", "lora_"))})
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or any(self._installed.get(role, ()) is None for role in self.generated):
            return self.base_layer(x)
        lead = x.shape[:-1]
        x, out = flat_base_forward(self.base_layer, x)   # 2-D, so that `add_product` can add in place
        out = self.adapt(x, out)
        return out.reshape(*lead, out.shape[-1])

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if torch.is_floating_point(x) else self.base_layer.weight.dtype

    def extra_repr(self) -> str:
        gen = f", generated={list(self.generated)}" if self.generated else ""
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, index={self.index}, "
                f"scaling={self.scaling:g}{gen}")
