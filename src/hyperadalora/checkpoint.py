"""Training checkpoints: atomic, checksummed, and exact enough to resume a run bit for bit.

A checkpoint is a directory ``<output_dir>/checkpoints/step-0000042/`` holding

- ``model.safetensors``: the trainable state. HyperAdaLoRA: `HyperAdaLoraModel.trainable_state_dict` (the
  hypernetworks with their recurrent state and anchors, the heads, the rank masks and importance EMAs);
  the methods of `hyperadalora.methods`: `AdapterModel.trainable_state_dict` (trained parameters,
  hypernetworks with their recurrent state, anchors and seeds);
  peft LoRA / AdaLoRA: every parameter with ``requires_grad`` (AdaLoRA's ``lora_E`` carries its masking)
  plus AdaLoRA's rank-allocator EMAs (``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``);
- ``rng.safetensors``: the torch CPU and CUDA generator states;
- ``optimizer.pt``: the optimizer's ``state_dict`` (``torch.save``, loaded with ``weights_only=True``);
- ``state.json``: the loop position (step, epoch, batches consumed in the epoch, counters), the Python and
  NumPy RNG states, the run's arguments, every hypernetwork option it used (library defaults included) and the
  non-tensor model state (e.g. AdaLoRA's ``rank_pattern``);
- ``manifest.json``: size and SHA-256 of every other file, checked before anything is loaded.

It is written into a temporary directory, fsynced and renamed into place, so a crash leaves either the
whole checkpoint or none. The training loop (`hyperadalora.training`) decides when to save and how to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .methods import AdapterModel

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
ADALORA_EMAS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, or does not fit the run."""


# ---------------------------------------------------------------------------------------------- model state
def _kind(model) -> str:
    if isinstance(model, AdapterModel):
        return model.method_name
    return {"AdaLoraModel": "adalora", "LoraModel": "lora"}.get(type(getattr(model, "base_model", None)).__name__,
                                                                type(model).__name__)


def model_state(model) -> tuple[dict, dict]:
    """(tensors, JSON metadata) of everything training changes in ``model`` (an unwrapped adapter model)."""
    kind = _kind(model)
    if isinstance(model, AdapterModel):
        tensors, meta = model.checkpoint_state()
    else:
        tensors = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
        meta = {}
        allocator = getattr(getattr(model, "base_model", None), "rankallocator", None)
        if allocator is not None:
            for ema in ADALORA_EMAS:
                tensors.update({f"{ema}.{n}": t for n, t in getattr(allocator, ema).items()})
            meta["rank_pattern"] = model.peft_config["default"].rank_pattern
    meta["kind"] = kind
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, meta


def load_model_state(model, tensors: dict, meta: dict, where: str, hint: str = "") -> None:
    """Put a `model_state` back into ``model``; a checkpoint of another method or shape -> CheckpointError.
    ``hint`` (from `training.check_resume_args`: the options to set) is appended to that error's message."""
    kind = _kind(model)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{where} was written by a {meta.get('kind')!r} run; this run's method is {kind!r}.")
    checked = lambda k: k.startswith("model.") or k == "allocator.mask"  # noqa: E731 (EMAs come and go)
    expected = {k: tuple(v.shape) for k, v in model_state(model)[0].items() if checked(k)}
    saved = {k: tuple(v.shape) for k, v in tensors.items() if checked(k)}
    problems = [f"{k}: checkpoint {saved[k]} vs model {expected[k]}" for k in expected.keys() & saved.keys()
                if saved[k] != expected[k]]
    problems += [f"missing {k}" for k in sorted(expected.keys() - saved.keys())]
    problems += [f"unexpected {k}" for k in sorted(saved.keys() - expected.keys())]
    if problems:
        if not hint and any(".generators.lambda.feature_embeddings." in p for p in problems):
            # a checkpoint that does not record its hypernetwork options (written before they were recorded)
            hint = (". Lambda's per-layer codes differ: resume with the lambda_codes setting of the run that wrote "
                    "it (--lambda-codes false for a checkpoint written before they became the default)")
        raise CheckpointError(f"{where} does not fit this model (another base model or adapter configuration?): "
                              + "; ".join(sorted(problems)[:5]) + (" ..." if len(problems) > 5 else "") + hint)
    device = next(model.parameters()).device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    if isinstance(model, AdapterModel):
        model.load_checkpoint_state(tensors, meta)
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("model."):
                params[key[6:]].copy_(value)
    allocator = getattr(getattr(model, "base_model", None), "rankallocator", None)
    if allocator is not None:
        for ema in ADALORA_EMAS:  # keyed by the transformers model's parameter names, as peft keys them
            setattr(allocator, ema, {k[len(ema) + 1:]: v for k, v in tensors.items() if k.startswith(ema + ".")})
        model.peft_config["default"].rank_pattern = meta.get("rank_pattern")


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- files
def _file_info(path: str, fsync: bool = False) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": os.path.getsize(path)}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the checkpoint directories of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted((int(m.group(1)), os.path.join(root, n)) for n in names if (m := STEP_DIR.match(n)))


def save_checkpoint(run_dir: str, step: int, model, optimizer, loop: dict, rng: dict, args: dict, keep: int,
                    hypernetwork_options: dict | None = None) -> str:
    """Write ``run_dir/checkpoints/step-<step>/`` atomically, then delete all but the newest ``keep``.
    ``hypernetwork_options``: every hypernetwork option the run used, defaults included
    (`training.hypernetwork_options`), so that a resume under changed library defaults can say what changed."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:07d}")
    for stale in (n for n in os.listdir(root) if n.startswith(".tmp-") or ".old-" in n):  # left by a crash
        shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    if os.path.exists(final):  # the same step saved again (e.g. a non-finite stop at a step just saved): a step's
        try:                     # checkpoint holds that step's state; a complete one stays (replacing it would
            verify(final)        # leave a moment with none)
            return final
        except CheckpointError:
            pass
    tmp = os.path.join(root, f".tmp-step-{step:07d}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        _write_checkpoint(tmp, step, model, optimizer, loop, rng, args, hypernetwork_options)
    except BaseException:  # e.g. a full disk: give the space back; the checkpoints in place are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):  # a damaged checkpoint of the same step: replaced
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    others = [p for _, p in list_checkpoints(run_dir) if p != final]
    for path in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _write_checkpoint(tmp: str, step: int, model, optimizer, loop: dict, rng: dict, args: dict,
                      hypernetwork_options: dict | None) -> None:
    """Every file of a checkpoint into the directory ``tmp``, each fsynced, the manifest last."""
    tensors, meta = model_state(model)
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    rng_tensors = {"torch": rng["torch"], **{f"cuda.{i}": t for i, t in enumerate(rng.get("cuda", []))}}
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, os.path.join(tmp, "rng.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    state = {"step": step, "loop": loop, "model": meta, "args": args, "hypernetwork_options": hypernetwork_options or {},
             "rng": {"python": rng["python"], "numpy": rng["numpy"], "n_cuda": len(rng.get("cuda", []))}}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, default=str)
    files = {name: _file_info(os.path.join(tmp, name), fsync=True) for name in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, MANIFEST), "w") as f:  # with its own digest: a damaged manifest blames itself
        json.dump({"format": 1, "step": step, "files": files, "files_sha256": _manifest_digest(files)}, f, indent=1)
    _file_info(os.path.join(tmp, MANIFEST), fsync=True)
    _fsync_dir(tmp)


def _manifest_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify(path: str) -> dict:
    """Check every file of a checkpoint against its manifest; returns the manifest."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: it has no {MANIFEST} (unfinished or foreign).") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupted ({e}).") from None
    if "files_sha256" in manifest and (not isinstance(files, dict) or _manifest_digest(files) !=
                                       manifest["files_sha256"]):  # (manifests written before the digest: none)
        raise CheckpointError(f"{manifest_path} is corrupted: its content does not match its own digest.")
    for name, expected in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"Checkpoint file {file} is missing.")
        got = _file_info(file)
        if got["bytes"] != expected["bytes"]:
            raise CheckpointError(f"Checkpoint file {file} is truncated or altered: {got['bytes']} bytes, "
                                  f"expected {expected['bytes']}.")
        if got["sha256"] != expected["sha256"]:
            raise CheckpointError(f"Checkpoint file {file} is corrupted: its SHA-256 does not match {MANIFEST}.")
    return manifest


def find_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest checkpoint of the run ``path`` that verifies."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Resume path {path!r} does not exist.")
    if os.path.isfile(os.path.join(path, MANIFEST)) or STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        verify(path)
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"No checkpoint in {path!r} (expected {os.path.join(path, 'checkpoints', 'step-*')} "
                                f"or a checkpoint directory).")
    errors = []
    for _, candidate in reversed(found):
        try:
            verify(candidate)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            warnings.warn(f"Skipping damaged checkpoint(s): {' | '.join(errors)}. Resuming from {candidate}.")
        return candidate
    raise CheckpointError(f"No valid checkpoint in {path!r}: " + " | ".join(errors))


def load_checkpoint(path: str, verified: bool = False) -> dict:
    """Read a checkpoint (verified first unless ``verified``): {"path", "step", "state", "tensors", "rng",
    "optimizer"}."""
    if not verified:
        verify(path)
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        tensors = load_file(os.path.join(path, "model.safetensors"))
        rng_tensors = load_file(os.path.join(path, "rng.safetensors"))
        optimizer = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # checksums matched, so the writer was not this module or a different version
        raise CheckpointError(f"Cannot read checkpoint {path}: {e}") from e
    rng = {**state["rng"], "torch": rng_tensors["torch"],
           "cuda": [rng_tensors[f"cuda.{i}"] for i in range(state["rng"].get("n_cuda", 0))]}
    return {"path": path, "step": int(state["step"]), "state": state, "tensors": tensors, "rng": rng,
            "optimizer": optimizer}
