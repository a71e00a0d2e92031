"""What every adapter method of this package shares: configs, the adapter layer, the generated-adapter model.

A method is one small module (see `hyperlora.py`) that declares:

- a **config** dataclass (a `MethodConfig`; with the hypernetwork options of `HypernetOptions` when some of its
  tensors are generated),
- an **adapter layer** (an `AdapterLayer` subclass): which tensors it has per *role* (``A``, ``B``, ...) and their
  shapes, and how they change the output of the wrapped ``nn.Linear``,
- a `Method` record: its name, those two classes, and which roles the hypernetworks generate.

`GeneratedAdapterModel` does the rest for every method: injection into a transformers model, one
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
from ..generator import RoleGenerator, hypernetwork_param_groups
from ..layer import flat_base_forward
from ..quantization import (dense_dtype, dense_linear, dequantized_weight, keep_trainable_layout, quantization_kind,
                            refuse_quantized_merge)
from ..model import (ADAPTER_WEIGHTS_NAME, _full_precision, _Injection, _replace, _save_safetensors, check_rank_fits,
                     find_target_modules, load_onto, load_safetensors_checked, phi_changed, phi_fingerprint,
                     refuse_adapted_model, saved_head_states)
from ..wrapper import AdapterWrapper, with_signature_of

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
        unknown = sorted(set(data) - names - {"target_names", "peft_type", "hyperadalora_version"})
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
                                    f"GeneratedAdapterModel.save_pretrained?")
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

    def __post_init__(self):
        unknown = set(self.generated) - set(self.layer_cls.ROLES)
        if unknown:
            raise ValueError(f"Method {self.name!r} generates roles {sorted(unknown)} that {self.layer_cls.__name__} "
                             f"does not have (it has {sorted(self.layer_cls.ROLES)}).")
        if self.config_cls.method != self.name:
            raise ValueError(f"{self.config_cls.__name__}.method={self.config_cls.method!r} but the method is "
                             f"registered as {self.name!r}.")
        if self.generated and not issubclass(self.config_cls, HypernetOptions):
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
class AdapterLayer(nn.Module):
    """An ``nn.Linear`` with an adapter. Subclasses define `ROLES`, `shapes`, `adapt` and (if defined) `merged_weight`,
    and may add trained parameters in `setup` (DoRA's magnitude, HydraLoRA's router).

    A role that is *trained* is an ``nn.ParameterList`` ``lora_<role>`` of this layer; a role that is *generated*
    has no parameter: the model installs this step's tensors (`install`) before every forward.
    """

    ROLES: ClassVar[dict[str, RoleSpec]] = {}

    def __init__(self, base_layer: nn.Linear, config: MethodConfig, index: int, generated: tuple = ()):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear layers, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.index = index
        self.r = config.r
        self.scaling = config.lora_alpha / config.r
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
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

    def init_trained(self, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """Initialisation of a trained role's tensor: zeros for ``zero_start`` roles, else nn.Linear's (Kaiming
        uniform, as peft's LoRA initialises A)."""
        if self.ROLES[role].zero_start:
            return nn.init.zeros_(tensor)
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    # ---- tensors ----
    @property
    def weight(self) -> torch.Tensor:  # code that inspects `.weight` of a linear layer keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W0 ``(d_out, d_in)`` as a dense tensor without a gradient (dequantized for a 4-bit / 8-bit base), in
        ``dtype`` (default: the weight's own, or the quantized layer's compute dtype)."""
        if quantization_kind(self.base_layer) is None:
            w = self.base_layer.weight.detach()
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


# ---------------------------------------------------------------------------------------------- the model
class _Buffers(nn.Module):
    """A list of tensors kept as buffers (``t0``, ``t1``, ...): moved by ``.to()``, saved in ``state_dict``."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.n = len(tensors)
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t.detach().clone())

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f"t{i}") for i in range(self.n)]


class GeneratedAdapterModel(AdapterWrapper):
    """A transformers model with the adapters of a `Method`, some of whose tensors may be generated.

    Training step (as for any peft model; `after_optimizer_step` is optional: without it the next training
    forward commits the recurrent state itself)::

        out = model(**batch)                 # generates this step's tensors (with a graph into the hypernetworks)
        out.loss.backward()
        optimizer.step()
        model.after_optimizer_step(step)     # recurrent generation: the generated tensors become the new state
        optimizer.zero_grad()

    Attributes:
        base_model: the wrapped transformers model (its target nn.Linear replaced by the method's layers).
        adapters: the layers, in the order of ``target_names``.
        generators: role -> `RoleGenerator` (one hypernetwork shared by all layers), for the generated roles.
        seeds: role -> the seed states of the ``zero_start`` generated roles (the layer gets ``G - G_0``).
    """

    ADAPTER_LAYER = AdapterLayer
    OWN_ATTRIBUTES = ("base_model", "generators", "seeds", "adapters")

    def __init__(self, model: nn.Module, config: MethodConfig, *, trained_only: bool = False):
        super().__init__()
        if not isinstance(config, MethodConfig):
            raise TypeError(f"config must be a MethodConfig (e.g. HyperLoraConfig), got {type(config).__name__}.")
        self.method = get_method(config.method)
        refuse_adapted_model(model, "load_adapter" if trained_only else "get_peft_model")
        self.peft_config = config
        self.base_model = model
        self.target_names = find_target_modules(model, config)
        generated = () if trained_only else self.method.generated
        if generated and config.init == "principal":  # checked before the model is touched
            check_rank_fits(model, self.target_names, config.r, "r",
                            "init='principal' seeds the generated tensors with the top r singular vectors of the "
                            "layer's weight, and it has min(in_features, out_features) of them",
                            "use init='orthonormal'")
        device = next(model.parameters()).device
        injection = _Injection(model)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)  # initialisation independent of the caller's RNG
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            keep_trainable_layout(model)  # 4-bit layers: bitsandbytes' CPU inference repacking has no backward
            self.adapters: list[AdapterLayer] = []
            for i, name in enumerate(self.target_names):
                layer = self.method.layer_cls(model.get_submodule(name), config, i, generated)
                injection.replace(name, layer.to(device))
                self.adapters.append(layer)
            self.saved_module_names = self._mark_modules_to_save()
            if generated:
                self._build_generators(config, generated)
        except BaseException:
            injection.undo()  # a refused model stays the base model it was
            raise
        finally:
            torch.random.set_rng_state(torch_state)
        if generated:
            self.generators.to(device)
            self.seeds.to(device)
        self._pending: Optional[dict] = None       # last training generation: role -> [group tensors]
        self._pending_version: Optional[int] = None
        self._pending_fingerprint: Optional[torch.Tensor] = None
        self._pending_committed = False
        self._cache_key = None
        self._cache_fingerprint: Optional[torch.Tensor] = None
        self.last_task_loss: Optional[torch.Tensor] = None
        self.__class__ = with_signature_of(GeneratedAdapterModel, type(model))

    def _build_generators(self, config, generated) -> None:
        hcfg = config.hypernet_config()
        seed = "normal" if hcfg.init == "normal" else "orthonormal"
        principal = None
        if hcfg.init == "principal":  # seeds: W0's top-r left (for (d_out, r) roles) / right ((r, d_in)) singular vectors
            from ..model import principal_subspaces

            principal = principal_subspaces(self.adapters, config.r)
        gen = torch.Generator().manual_seed(config.seed)
        self.slots: dict[str, list[tuple[int, int]]] = {}  # role -> [(layer, k)] in the generator's entry order
        generators, seeds = {}, {}
        for role in generated:
            spec = self.method.layer_cls.ROLES[role]
            lengths, widths, slots = [], set(), []
            for i, layer in enumerate(self.adapters):
                for k, shape in enumerate(layer.shapes()[role]):
                    lengths.append(shape[1 - spec.rank_axis])
                    widths.add(shape[spec.rank_axis])
                    slots.append((i, k))
            if len(widths) != 1:
                raise ValueError(f"Role {role!r} has tensors of different ranks {sorted(widths)}: one hypernetwork "
                                 f"generates tokens of one width.")
            initial = None
            if principal is not None:
                initial = [principal[1 if spec.rank_axis == 0 else 0][i] for i, _ in slots]
                if any(t.shape[0] != length for t, length in zip(initial, lengths)):
                    raise ValueError(f"init='principal' seeds a role from W0's singular vectors, but role {role!r} "
                                     f"of {self.method.name} is not (r, d_in) or (d_out, r): use init='orthonormal'.")
            generators[role] = RoleGenerator(role, lengths, widths.pop(), 1, seed, hcfg, gen, initial)
            self.slots[role] = slots
            if spec.zero_start:
                seeds[role] = _Buffers(generators[role].states())
        self.generators = nn.ModuleDict(generators)
        self.seeds = nn.ModuleDict(seeds)

    @property
    def generated(self) -> tuple:
        """The roles generated by hypernetworks (empty for a trained-only method, or once loaded / dropped)."""
        return tuple(self.generators) if "generators" in self._modules else ()

    @property
    def n_layers(self) -> int:
        return len(self.adapters)

    @property
    def rank_pattern(self) -> dict:
        return {name: layer.r for name, layer in zip(self.target_names, self.adapters)}

    @property
    def total_rank(self) -> int:
        return sum(self.rank_pattern.values())

    # ------------------------------------------------------------------ parameters
    def hypernetwork_parameters(self) -> list[nn.Parameter]:
        return list(self.generators.parameters()) if self.generated else []

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trained parameters of the layers (trained roles, DoRA's magnitude, HydraLoRA's router)."""
        return [p for layer in self.adapters for n, p in layer.named_parameters()
                if not n.startswith("base_layer.") and p.requires_grad]

    def optimizer_param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """The hypernetworks at ``lr * hypernet_lr_ratio`` (their row embeddings at ``lr * feature_lr_ratio``, see
        `generator.hypernetwork_param_groups`); the layers' trained parameters and the heads at ``lr``."""
        groups = hypernetwork_param_groups(self.generators, self.peft_config, lr, weight_decay) if self.generated else []
        adapter = self.adapter_parameters()
        groups.append({"params": adapter, "lr": lr, "weight_decay": weight_decay, "name": "adapters"})
        in_adapters = {id(p) for p in adapter}
        heads = [p for p in self.base_model.parameters() if p.requires_grad and id(p) not in in_adapters]
        groups.append({"params": heads, "lr": lr, "weight_decay": weight_decay, "name": "modules_to_save"})
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ generation
    def _phi_version(self) -> int:
        return sum(p._version for p in self.generators.parameters())

    def _phi_changed(self, version: Optional[int], fingerprint: Optional[torch.Tensor]) -> bool:
        """Updated since ``version`` / ``fingerprint`` (see `model.phi_changed`: fused optimizers included)."""
        return phi_changed(self.generators, version, fingerprint)

    def _generate(self, track: bool) -> dict:
        """Every role's tensors, with autocast off: under bf16 autocast the hypernetworks, their state and the
        generated tensors stay fp32, as HyperAdaLoRA's (`model._full_precision`); only the adapted layers run in
        bf16."""
        device = next(iter(self.generators.values())).states()[0].device
        with _full_precision(device):
            return {role: g.generate(track=track) for role, g in self.generators.items()}

    def _install(self, outs: dict) -> None:
        for role, groups in outs.items():
            if role in self.seeds:  # zero_start: G - G_0
                groups = [g - s.to(g.dtype) for g, s in zip(groups, self.seeds[role].tensors())]
            transpose = self.method.layer_cls.ROLES[role].rank_axis == 0
            per_layer: list[list] = [[] for _ in self.adapters]
            for (i, _), t in zip(self.slots[role], self.generators[role].per_layer(groups)):
                per_layer[i].append(t.t() if transpose else t)
            for layer, tensors in zip(self.adapters, per_layer):
                layer.install(role, tensors)

    @torch.no_grad()
    def _commit(self) -> None:
        """Once the hypernetworks were updated, the last training generation becomes the recurrent state."""
        if (self._pending is None or self._pending_committed
                or not self._phi_changed(self._pending_version, self._pending_fingerprint)):
            return
        for role, g in self.generators.items():
            g.commit(self._pending[role], self.peft_config.momentum)
        self._pending = {role: [t.detach() for t in ts] for role, ts in self._pending.items()}
        self._pending_committed = True
        self._cache_key = None

    def after_optimizer_step(self, global_step: Optional[int] = None) -> None:
        """After ``optimizer.step()``: commit the recurrent state (a no-op when nothing is generated)."""
        if self.generated:
            self._commit()

    update_and_allocate = after_optimizer_step  # the HyperAdaLoRA / peft AdaLoRA contract (no rank allocation here)

    def materialize(self, training_pass: Optional[bool] = None) -> Optional[dict]:
        """Generate this step's tensors and install them in the layers.

        A training pass (training mode, autograd on) generates with a graph into the hypernetworks; otherwise the
        tensors are generated once under no_grad and cached until the hypernetworks or their state change.
        """
        if not self.generated:
            return None
        if training_pass is None:
            training_pass = self.training and torch.is_grad_enabled()
        self._commit()
        if training_pass:
            outs = self._generate(track=True)
            self._pending, self._pending_version = outs, self._phi_version()
            self._pending_fingerprint = phi_fingerprint(self.generators)
            self._pending_committed = False
            self._cache_key = None
        else:
            states = [s for g in self.generators.values() for s in g.states()]
            version = self._phi_version()
            key = (version, tuple(s.data_ptr() for s in states), tuple(s._version for s in states))
            if key == self._cache_key and not self._phi_changed(version, self._cache_fingerprint):
                return None
            with torch.no_grad():
                outs = self._generate(track=False)
            self._cache_key, self._cache_fingerprint = key, phi_fingerprint(self.generators)
        self._install(outs)
        return outs

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        self.materialize()
        output = self.base_model(*args, **kwargs)
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self.last_task_loss = loss.detach()
        return output

    # ------------------------------------------------------------------ training state (checkpoints)
    def _trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict:
        """Everything training changes, for an exact resume: the trained parameters (adapters, heads, hypernetworks)
        and the hypernetworks' buffers (recurrent state, anchors, seeds)."""
        state = self.state_dict()
        keys = set(self._trainable_names())
        keys |= {k for k in state if k.startswith(("generators.", "seeds."))}
        return {"tensors": {k: state[k].detach().clone() for k in sorted(keys)}, "meta": {}}

    def load_trainable_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        expected = set(self.trainable_state_dict()["tensors"])
        if set(tensors) != expected:
            raise ValueError(f"The state does not fit this model: missing {sorted(expected - set(tensors))[:5]}, "
                             f"unexpected {sorted(set(tensors) - expected)[:5]}.")
        self.load_state_dict(tensors, strict=False)
        self._pending, self._pending_version, self._cache_key = None, None, None
        self._pending_fingerprint = self._cache_fingerprint = None
        self._pending_committed = False

    # ------------------------------------------------------------------ the final adapter
    @torch.no_grad()
    def _materialized(self) -> None:
        was_training = self.training
        self.eval()
        self.materialize(training_pass=False)
        self.train(was_training)

    def drop_hypernetworks(self) -> "GeneratedAdapterModel":
        """Freeze the generated tensors into the layers (as fixed, non-trained tensors) and delete the hypernetworks:
        inference then costs what the plain method costs."""
        if not self.generated:
            return self
        self._materialized()
        for layer in self.adapters:
            for role in self.generators:
                layer.set_trained(role, layer.tensors(role), requires_grad=False)
        del self.generators
        del self.seeds
        self._pending = None
        return self

    def save_pretrained(self, directory: str) -> None:
        """Write ``adapter_model.safetensors`` (every layer's tensors, generated ones as they are now, its other
        parameters, and the trained heads) and ``method_config.json``. `load_adapter` reads them back."""
        os.makedirs(directory, exist_ok=True)
        self._materialized()
        tensors = {f"{name}.{k}": v for name, layer in zip(self.target_names, self.adapters)
                   for k, v in layer.adapter_state().items()}
        tensors.update(self._modules_to_save_state())
        # the config first: the tensors' file records its digest (load_adapter refuses an altered one)
        self.peft_config.save_pretrained(directory, target_names=self.target_names)
        _save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), {"format": "pt"},
                          config_path=os.path.join(directory, METHOD_CONFIG_NAME))

    @torch.no_grad()
    def merge_and_unload(self, dequantize: bool = False) -> nn.Module:
        """Fold the adapters into the base weights and return the plain transformers model. Raises ValueError
        (leaving the model unchanged) for a method whose update depends on the input (HydraLoRA with a router), and
        for a quantized (bitsandbytes 4-bit / 8-bit) base unless ``dequantize=True``: then each adapted quantized
        layer becomes a dense ``nn.Linear`` holding the dequantized weight plus the update."""
        if not dequantize:
            refuse_quantized_merge(self.adapters, self.target_names)
        self._materialized()
        merged = [layer.merged_weight() for layer in self.adapters]  # all first: fail before changing anything
        for name, layer, weight in zip(self.target_names, self.adapters, merged):
            base = layer.base_layer
            if quantization_kind(base) is not None:
                _replace(self.base_model, name, dense_linear(base, weight))
                continue
            base.weight.data.copy_(weight.to(base.weight.dtype))
            _replace(self.base_model, name, base)
        return self.base_model


# ---------------------------------------------------------------------------------------------- loading
def load_adapter(model: nn.Module, directory: str) -> GeneratedAdapterModel:
    """Load an adapter written by `GeneratedAdapterModel.save_pretrained` onto ``model`` (inference: every tensor
    fixed, no hypernetwork)."""
    import re

    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        MethodConfig.from_pretrained(directory)  # the clearer error for a directory that holds no adapter
        raise FileNotFoundError(f"No {ADAPTER_WEIGHTS_NAME} in {directory!r}.")
    config_path = os.path.join(directory, METHOD_CONFIG_NAME)
    # the tensors and the config checked against their digests before either is read
    tensors = load_safetensors_checked(path, config_path if os.path.isfile(config_path) else None)
    config = MethodConfig.from_pretrained(directory)
    with open(config_path) as f:
        names = json.load(f).get("target_names")
    if not names:  # the layers the file has tensors for
        names = sorted({k.split(".lora_", 1)[0] for k in tensors
                        if ".lora_" in k and not k.startswith("modules_to_save.")})
    if names:
        config.target_modules = "|".join(re.escape(n) for n in names)
    return load_onto(model, directory, names, tensors, config.modules_to_save,
                     build=lambda: GeneratedAdapterModel(model, config, trained_only=True),
                     load=lambda w: _load_layer_tensors(w, tensors, path))


def _load_layer_tensors(wrapped: GeneratedAdapterModel, tensors: dict, path: str) -> None:
    """Check every saved tensor against the model first, then load them (a misfit changes nothing)."""
    layers = []
    for name, layer in zip(wrapped.target_names, wrapped.adapters):
        state = {}
        for key, ref in layer.adapter_state().items():
            full = f"{name}.{key}"
            if full not in tensors:
                raise ValueError(f"{path} has no tensor {full!r}: the adapter was saved for another model.")
            if tensors[full].shape != ref.shape:
                raise ValueError(f"Adapter tensor {full!r} has shape {tuple(tensors[full].shape)} but the model's "
                                 f"layer needs {tuple(ref.shape)}: this adapter was trained on another base model.")
            state[key] = tensors[full]
        layers.append((layer, state))
    heads = saved_head_states(wrapped, tensors)
    for layer, state in layers:
        layer.load_state_dict(state, strict=False)  # every key was checked above; the base layer is not in the file
    for module, sub in heads:
        module.load_state_dict(sub)
