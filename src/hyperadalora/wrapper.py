"""What every adapter wrapper of this package shares (HyperAdaLoRA's model and the generated-adapter methods).

A wrapper holds the transformers model as ``base_model`` with some of its linear layers replaced by adapter
layers, forwards unknown attributes to it (as peft's models do), trains the ``modules_to_save`` (the task head
of ``SEQ_CLS``) in full, and caches generated tensors that ``.to()`` / ``.cuda()`` must invalidate.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


class AdapterWrapper(nn.Module):
    """Mixin of `HyperAdaLoraModel` and `methods.base.GeneratedAdapterModel`.

    Subclasses set ``ADAPTER_LAYER`` (the adapter layer class, never marked as a module to save) and
    ``OWN_ATTRIBUTES`` (attributes that must never be looked up on the base model), and keep
    ``self._cache_key`` (None = regenerate) and ``self.saved_module_names``.
    """

    ADAPTER_LAYER: type = nn.Module
    OWN_ATTRIBUTES: tuple = ("base_model", "generators")
    # transformers' flag for "trainable adapters are attached": `Trainer` refuses to train a quantized base model (a
    # bitsandbytes one, or SmolLM2 converted from GGUF, whose config keeps its quantization_config) without it
    _hf_peft_config_loaded: bool = True

    def _mark_modules_to_save(self) -> list[str]:
        """Make the ``modules_to_save`` (matched by name or dotted suffix) trainable; returns their names."""
        names = []
        for target in self.peft_config.modules_to_save or ():
            for name, module in self.base_model.named_modules():
                if (name == target or name.endswith("." + target)) and not isinstance(module, self.ADAPTER_LAYER):
                    module.requires_grad_(True)
                    names.append(name)
        return names

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.OWN_ATTRIBUTES:
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / max(a, 1):.4f}")

    def _modules_to_save_state(self) -> dict:
        return {f"modules_to_save.{name}.{k}": v for name in self.saved_module_names
                for k, v in self.base_model.get_submodule(name).state_dict().items()}

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() invalidate the cache of generated tensors
        self._cache_key = None
        return super()._apply(fn, *args, **kwargs)

    def generate(self, *args, **kwargs):
        """Text generation with the current adapter (generated once, cached)."""
        self.materialize(training_pass=False)
        return self.base_model.generate(*args, **kwargs)


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
