"""Files and merging of an `adapter_model.AdapterModel`: `AdapterFiles` writes the adapter
(``adapter_model.safetensors`` with its digest, and the config), checks and loads a saved one onto the model's
layers and trained heads (every tensor checked before any is loaded), and folds the adapters into the base weights
(`merge_and_unload`); `refuse_misfit` checks a trainable state before it is loaded.

`AdapterFiles` is a base class of `AdapterModel` only: it uses its ``adapters``, ``target_names``,
``saved_module_names``, ``peft_config`` and its hooks ``_adapter_tensors`` / ``_config_extra`` (what a method saves)
and ``_materialized`` (the current generated tensors installed). ``from_pretrained`` stays on `AdapterModel`, which
builds the model class of the saved method.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..quantization import dense_linear, quantization_kind, refuse_quantized_merge, write_dense_weight
from ..tuner_utils import ADAPTER_WEIGHTS_NAME, replace_module, save_safetensors


class AdapterFiles:
    """Saving, loading and merging of `AdapterModel` (see the module's docstring)."""

    def save_pretrained(self, directory: str) -> None:
        """Write ``adapter_model.safetensors`` (every layer's adapter, generated tensors as they are now, and the
        trained heads) and the config (`CONFIG_NAME`). `load_adapter` reads them back."""
        os.makedirs(directory, exist_ok=True)
        tensors = self._adapter_tensors()
        tensors.update(self._modules_to_save_state())
        # the config first: the tensors' file records its digest (load_adapter refuses an altered one)
        self.peft_config.save_pretrained(directory, **self._config_extra())
        save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), {"format": "pt"},
                         config_path=os.path.join(directory, self.CONFIG_NAME))

    def _merged_weights(self) -> list[torch.Tensor]:
        """Per layer, the weight that gives the same outputs without the adapter (dequantized for a quantized base)."""
        self._materialized()
        return [layer.merged_weight() for layer in self.adapters]

    @torch.no_grad()
    def merge_and_unload(self, dequantize: bool = False) -> nn.Module:
        """Fold the adapters into the base weights and return the plain transformers model. Raises ValueError
        (leaving the model unchanged) for a method whose update depends on the input (HydraLoRA with a router), and
        for a quantized (bitsandbytes 4-bit / 8-bit) base unless ``dequantize=True``: then each adapted quantized
        layer becomes a dense ``nn.Linear`` holding the dequantized weight plus the update."""
        if not dequantize:
            refuse_quantized_merge(self.adapters, self.target_names)
        merged = self._merged_weights()  # all first: fail before changing anything
        for name, layer, weight in zip(self.target_names, self.adapters, merged):
            base = layer.base_layer
            if quantization_kind(base) is not None:
                replace_module(self.base_model, name, dense_linear(base, weight))
                continue
            write_dense_weight(base, weight)  # transposed back for a Conv1D
            replace_module(self.base_model, name, base)
        return self.base_model

    def _load_saved_tensors(self, tensors: dict, path: str) -> None:
        """Check every saved tensor against the model first, then load them (a misfit changes nothing)."""
        layers = []
        for name, layer in zip(self.target_names, self.adapters):
            state = {}
            for key, ref in layer.adapter_state().items():
                full = f"{name}.{key}"
                if full not in tensors:
                    raise ValueError(f"{path} has no tensor {full!r}: the adapter was saved for another model.")
                if tensors[full].shape != ref.shape:
                    raise ValueError(f"Adapter tensor {full!r} has shape {tuple(tensors[full].shape)} but the "
                                     f"model's layer needs {tuple(ref.shape)}: this adapter was trained on another "
                                     f"base model.")
                state[key] = tensors[full]
            layers.append((layer, state))
        heads = self._saved_head_states(tensors)
        for layer, state in layers:
            layer.load_state_dict(state, strict=False)  # every key was checked above; the base layer is not in it
        for module, state in heads:
            module.load_state_dict(state)

    def _saved_head_states(self, tensors: dict) -> list:
        """[(module, state)] of the saved ``modules_to_save.*`` weights of the modules to save, each checked against
        the module (keys and shapes) before anything is loaded."""
        heads = []
        for name in self.saved_module_names:
            module = self.base_model.get_submodule(name)
            prefix = f"modules_to_save.{name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                own = module.state_dict()
                misfit = sorted(set(own) ^ set(state)) + [k for k in state if k in own and own[k].shape != state[k].shape]
                if misfit:
                    raise ValueError(f"Saved weights of {name!r} do not fit the model (keys missing, unexpected or "
                                     f"of another shape: {misfit[:5]}): this adapter was trained on another base "
                                     f"model.")
                heads.append((module, state))
        return heads


def refuse_misfit(expected: dict, tensors: dict) -> None:
    """ValueError unless ``tensors`` has exactly the keys of ``expected`` with the same shapes (checked before anything
    is loaded: a state of another model changes nothing)."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    shapes = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & tensors.keys()) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"The state does not fit this model (another base model or adapter configuration?): missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, other shapes {shapes[:5]}.")
