"""The public entry points: `get_peft_model` (wrap a transformers model with any method's adapter) and
`load_adapter` (load a saved adapter of any method of this package for inference)."""

from __future__ import annotations

import os

import peft
from torch import nn

from .methods import METHODS, AdapterModel, HyperAdaLoraModel
from .methods.base import METHOD_CONFIG_NAME


def get_peft_model(model: nn.Module, config):
    """The adapter model for ``config``: this package's `AdapterModel` (HyperAdaLoRA's `HyperAdaLoraModel`) for the
    config of one of its methods (`HyperAdaLoraConfig`, `HyperLoraConfig`, ...), peft's own model for a peft config."""
    name = getattr(config, "method", None)
    if isinstance(name, str) and name in METHODS and isinstance(config, METHODS[name].config_cls):
        return (METHODS[name].model_cls or AdapterModel)(model, config)
    return peft.get_peft_model(model, config)


def load_adapter(model: nn.Module, directory: str) -> AdapterModel:
    """Load an adapter saved by ``save_pretrained`` of any method of this package onto ``model`` (inference: fixed
    tensors, no hypernetwork). A directory with a ``method_config.json`` holds a generated method's adapter,
    otherwise HyperAdaLoRA's (``hyperadalora_config.json``)."""
    if os.path.isfile(os.path.join(directory, METHOD_CONFIG_NAME)):
        return AdapterModel.from_pretrained(model, directory)
    return HyperAdaLoraModel.from_pretrained(model, directory)
