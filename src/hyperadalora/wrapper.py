"""What every adapter model of this package shares with transformers' and peft's models (the wrapper layer).

`BaseAdapterModel` holds the transformers model as ``base_model`` with some of its linear layers replaced by
adapter layers (`BaseAdapterLayer`), forwards unknown attributes to it (as peft's models do), trains the
``modules_to_save`` (the task head of ``SEQ_CLS``) in full, and offers what `transformers.Trainer`, TRL and
``generate`` expect of a peft model. `with_signature_of` shows the base model's ``forward`` signature to Trainer.
"""

from __future__ import annotations

import functools
import inspect
from typing import ClassVar

from torch import nn

from .quantization import enable_gradient_checkpointing, quantization_kind


class BaseAdapterLayer(nn.Module):
    """Base class of every adapter layer of this package (an ``nn.Linear`` with an adapter, the base layer kept as
    ``base_layer``): what `tuner_utils.refuse_adapted_model` recognises, never marked as a module to save."""

    @property
    def weight(self):  # code that inspects `.weight` of a linear layer keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias


class BaseAdapterModel(nn.Module):
    """Base class of the adapter model (`methods.adapter_model.AdapterModel`). Subclasses set ``base_model``,
    ``peft_config``, ``saved_module_names``, ``_cache_key`` (None = regenerate) and ``materialize``."""

    OWN_ATTRIBUTES: ClassVar[tuple] = ("base_model",)  # never looked up on the base model
    # transformers' mark of a model with trainable adapters attached: its Trainer refuses a quantized base model
    # ("purely quantized models") unless the model is a peft model or carries this mark
    _hf_peft_config_loaded = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.OWN_ATTRIBUTES:
                raise
            return getattr(self.base_model, name)

    def _mark_modules_to_save(self) -> list[str]:
        """Make the ``modules_to_save`` (matched as peft matches them, `modules_to_save_names`) trainable, whole:
        every parameter of the module, sub-layers included (RoBERTa's ``classifier.dense`` / ``out_proj``); returns
        their names."""
        names = modules_to_save_names(self.base_model, self.peft_config.modules_to_save)
        for name in names:  # all checked first: a refused model stays as it was
            module = self.base_model.get_submodule(name)
            packed = next((n for n, m in module.named_modules() if quantization_kind(m) is not None), None)
            if packed is not None:
                where = f"{name}.{packed}" if packed else name
                raise ValueError(
                    f"The module to save {name!r} holds a {quantization_kind(module.get_submodule(packed))} quantized "
                    f"layer ({where!r}): a module to save is trained in full, and packed 4-bit / 8-bit weights take no "
                    f"gradient. Load the base with that module left unquantized (BitsAndBytesConfig("
                    f"llm_int8_skip_modules=[{name.rsplit('.', 1)[-1]!r}, ...])), or leave it out of modules_to_save.")
        for name in names:
            self.base_model.get_submodule(name).requires_grad_(True)
        return names

    def _modules_to_save_state(self) -> dict:
        return {f"modules_to_save.{name}.{k}": v for name in self.saved_module_names
                for k, v in self.base_model.get_submodule(name).state_dict().items()}

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() invalidate the cache of generated tensors
        self._cache_key = None
        return super()._apply(fn, *args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / max(a, 1):.4f}")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **options) -> None:
        """Gradient checkpointing of the base model, non-reentrant unless asked otherwise (what `Trainer` calls for
        ``gradient_checkpointing=True``); see `quantization.enable_gradient_checkpointing`."""
        enable_gradient_checkpointing(self, activation_checkpointing_kwargs, **options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **options) -> None:
        """The older name of `activation_checkpointing_enable` (transformers < 5.2x, peft)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def generate(self, *args, **kwargs):
        """Text generation with the current adapter (generated once, cached)."""
        self.materialize(training_pass=False)
        return self.base_model.generate(*args, **kwargs)


def modules_to_save_names(model: nn.Module, modules_to_save) -> list[str]:
    """The modules of ``model`` that ``modules_to_save`` names, matched as peft matches them (a module whose name
    ends with an entry: ``classifier`` also takes DistilBERT's ``pre_classifier``), outermost only (a module inside
    another one to save is saved with it), never an adapter layer."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, BaseAdapterLayer):
            continue
        if any(name.endswith(t) for t in modules_to_save or ()) and \
                not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


@functools.lru_cache(maxsize=None)
def with_signature_of(wrapper_cls: type, base_cls: type) -> type:
    """A subclass of ``wrapper_cls`` whose ``forward`` has the signature of ``base_cls.forward`` (like peft's task
    classes), so that `transformers.Trainer` keeps the right dataset columns and finds the labels."""
    try:
        signature = inspect.signature(base_cls.forward)
    except (TypeError, ValueError):
        return wrapper_cls

    def forward(self, *args, **kwargs):
        return wrapper_cls.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = wrapper_cls.forward.__doc__
    name = f"{wrapper_cls.__name__}For{base_cls.__name__}"
    return type(name, (wrapper_cls,), {"forward": forward, "__module__": wrapper_cls.__module__, "__qualname__": name})
