"""`transformers.Trainer` integration: `RankAllocationCallback`, `HypernetworkLrCallback`, `HyperAdaLoraTrainer`.

Trainer calls `on_optimizer_step` right after ``optimizer.step()`` and before ``zero_grad()``, which is
where AdaLoRA-style allocation must run (it may read gradients). ``state.global_step`` counts optimizer
steps (not micro-batches, peft #1801) and is incremented after this hook, hence ``+ 1``.
`RankAllocationCallback` works for HyperAdaLoRA models and for peft's own AdaLoRA (`PeftModel` with an
`AdaLoraModel` inside).

The hypernetworks train with learning rates of their own (``hypernet_lr_ratio``, ``feature_lr_ratio`` and the
row embeddings' schedule ``feature_lr_ratio_final``), which only an optimizer built from
``model.optimizer_param_groups(lr)`` applies: Trainer's default optimizer puts every parameter at one learning
rate. `HyperAdaLoraTrainer` builds its optimizer from those groups (with the optimizer class and settings of
``TrainingArguments``) and adds the callbacks the model needs; with a plain `Trainer`, `HypernetworkLrCallback`
(which `RankAllocationCallback` includes) warns when the optimizer lacks the groups and applies the schedule.

Saving: for this package's models, `HyperAdaLoraTrainer` writes into a checkpoint (``checkpoint-N/``) and into
``save_model(dir)`` the adapter as the model's own ``save_pretrained(dir)`` writes it (``adapter_model.safetensors``
and ``hyperadalora_config.json`` / ``method_config.json``: load it with `hyperadalora.load_adapter`) and, in
``training_state.safetensors``, what an exact resume needs (`checkpoint.model_state`: the hypernetworks with their
recurrent state and anchors, the trained heads and parameters, the rank masks and importance EMAs; the allocator's
bookkeeping in the file's metadata, with the adapter's options, the run-defining `RUN_TRAINING_ARGS` and a digest of
the tensors), never the frozen base model. ``resume_from_checkpoint`` and ``load_best_model_at_end`` read that file
back (``resume_from_checkpoint`` continues the run it records: other adapter options or run-defining arguments, or
tensors that fail the digest, are refused, naming them); a whole-model ``model.safetensors`` written by earlier versions is
still read by Trainer's own loading (it never held the rank allocator: such a resume restarts from full masks).
Any other model (peft's own, a plain transformers model), and DeepSpeed runs, are saved as `Trainer` saves them.

FSDP (FSDP2: ``accelerate launch --config_file <FSDP2 config> script.py``, or ``fsdp=True, fsdp_config={"fsdp_version":
2}`` in TrainingArguments under torchrun): for this package's models and peft's AdaLoRA, `HyperAdaLoraTrainer` shards
only the frozen base model (as the library's own loop does, `training.distributed.wrap_fsdp`) and keeps every adapter,
hypernetwork and trained head whole on every process, their gradients averaged over the processes once per optimizer
step. Rank allocation runs identically on every process; checkpoints and ``save_model`` are written by process 0 as in a
single-process run (the same files, no FSDP shards, no base model) and resume the same way. FSDP1, FSDP's activation
checkpointing, CPU offload, ``cpu_ram_efficient_loading`` and a quantized base are refused with the reason. Any other
model is sharded by accelerate as `Trainer` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer import TRAINING_ARGS_NAME, is_sagemaker_mp_enabled

from .checkpoint import CheckpointError, load_model_state, model_state
from .generator import FEATURE_GROUP, HYPERNET_GROUP, group_lr_factor
from .methods import AdapterModel
from .tracking import rank_logs
from .tuner_utils import tensors_digest, unwrap_model as _unwrap


def _allocating_model(model):
    """The object whose ``update_and_allocate`` must be called, or None."""
    model = _unwrap(model)
    if isinstance(model, AdapterModel):
        return model if model.ALLOCATES_RANK and not model.fixed else None
    base = getattr(model, "base_model", None)
    if base is not None and type(base).__name__ == "AdaLoraModel" and hasattr(base, "update_and_allocate"):
        return base
    return None


def _total_step(model):
    """The total_step the rank budget schedule of ``model`` was configured with, or None."""
    model = _unwrap(model)
    config = getattr(model, "peft_config", None)
    if isinstance(model, AdapterModel):
        return getattr(config, "total_step", None)
    if isinstance(config, dict):
        return getattr(config.get(getattr(model, "active_adapter", "default")), "total_step", None)
    return None


def _hypernetwork_model(model):
    """The adapter model of this package whose hypernetworks train (their own lr groups), or None."""
    model = _unwrap(model)
    return model if isinstance(model, AdapterModel) and model.generated else None


TRAINING_STATE_NAME = "training_state.safetensors"
STATE_METADATA_KEY = "hyperadalora_state"


def _adapter_model(model):
    """The adapter model of this package (saved with its own ``save_pretrained``), or None."""
    model = _unwrap(model)
    return model if isinstance(model, AdapterModel) else None


def _has_training_state(model) -> bool:
    """Whether ``model`` (an adapter model of this package) has a training state (a fixed HyperAdaLoRA adapter,
    loaded or with its hypernetworks dropped, has none: only its adapter is saved)."""
    return not (model.ALLOCATES_RANK and model.fixed)


# TrainingArguments that define the run: a resume with other values would be another run (refused); max_steps,
# num_train_epochs, saving, logging and evaluation may change (Trainer's own resume reads them from the arguments).
RUN_TRAINING_ARGS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                     "data_seed", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                     "lr_scheduler_type", "warmup_steps", "warmup_ratio", "optim", "bf16", "fp16")
# Adapter options that may differ on resume: total_step (the rank budget's length) follows an extended max_steps.
RESUME_FREE_ADAPTER_OPTIONS = ("total_step",)


def _adapter_options(model) -> dict:
    """The model's adapter config as JSON (the options a checkpoint of it records)."""
    return json.loads(json.dumps(model.peft_config.to_dict(), default=str))


def _run_args(training_args) -> dict:
    return json.loads(json.dumps({k: getattr(training_args, k, None) for k in RUN_TRAINING_ARGS}, default=str))


def save_training_state(model, directory: str, training_args=None) -> str:
    """Write ``directory/training_state.safetensors``: `checkpoint.model_state` of ``model``; in the file's metadata
    its JSON metadata, the adapter's options, the run's `RUN_TRAINING_ARGS` (``training_args``, if given) and a
    digest of the tensors (`checkpoint.tensors_digest`). Written atomically. Returns the path."""
    tensors, meta = model_state(model)
    meta["adapter_options"] = _adapter_options(model)
    if training_args is not None:
        meta["training_args"] = _run_args(training_args)
    meta["sha256"] = tensors_digest(tensors)
    path = os.path.join(directory, TRAINING_STATE_NAME)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", STATE_METADATA_KEY: json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _differences(saved: dict, current: dict, free=()) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in sorted(saved.keys() | current.keys())
            if k not in free and saved.get(k) != current.get(k)]


def load_training_state(model, directory: str, training_args=None) -> None:
    """Put the state of ``directory/training_state.safetensors`` back into ``model`` (`checkpoint.load_model_state`).
    Raises `checkpoint.CheckpointError`, before anything is loaded, for a file that is unreadable or whose tensors
    do not match their recorded digest, a state of another method or model shape, and a checkpoint whose recorded
    adapter options (or `RUN_TRAINING_ARGS`, when ``training_args`` is given) differ from the model's: resuming it
    would be another run."""
    path = os.path.join(directory, TRAINING_STATE_NAME)
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})[STATE_METADATA_KEY])
        tensors = load_file(path)
    except Exception as e:  # missing metadata, or safetensors' own errors for a truncated or corrupted file
        raise CheckpointError(f"Cannot read the training state {path} ({type(e).__name__}: {e}).") from e
    if "sha256" in meta and tensors_digest(tensors) != meta["sha256"]:  # (files written before the digest: none)
        raise CheckpointError(f"The training state {path} is corrupted: its tensors do not match the digest it "
                              f"recorded. Resume from another checkpoint.")
    problems = []
    if "adapter_options" in meta:
        problems += _differences(meta["adapter_options"], _adapter_options(model), RESUME_FREE_ADAPTER_OPTIONS)
    if training_args is not None and "training_args" in meta:
        problems += _differences(meta["training_args"], _run_args(training_args))
    if problems:
        raise CheckpointError(f"{path} was written by another run than this one ({'; '.join(problems)}): resuming it "
                              f"would be neither. Build the model and TrainingArguments with the checkpoint's options "
                              f"(its adapter config is beside it) to continue that run, or train without "
                              f"resume_from_checkpoint to start a new one.")
    meta = {k: v for k, v in meta.items() if k not in ("adapter_options", "training_args", "sha256")}
    load_model_state(model, tensors, meta, where=path)


class HypernetworkLrCallback(TrainerCallback):
    """The hypernetworks' learning rates under a `Trainer`: warns at the start of training when the optimizer was not
    built from ``model.optimizer_param_groups(lr)`` (the hypernetworks would then train at the run's lr, not at the
    ratios of their config), and moves the row embeddings' lr along their schedule (``feature_lr_ratio`` ->
    ``feature_lr_ratio_final``, on top of the Trainer's own scheduler) before every optimizer step. Does nothing for
    models without hypernetworks."""

    def __init__(self):
        self._set_lr: dict[int, float] = {}  # id(param group) -> the lr this callback gave it

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        target = _hypernetwork_model(model) if model is not None else None
        if target is None or optimizer is None:
            return
        wanted = {g["name"]: g["lr"] for g in target.optimizer_param_groups(1.0) if g["name"] in
                  (HYPERNET_GROUP, FEATURE_GROUP)}
        have = {g.get("name") for g in optimizer.param_groups}
        missing = sorted(name for name, ratio in wanted.items() if ratio != 1.0 and name not in have)
        if missing:
            ratios = ", ".join(f"{name} at {wanted[name]:g}x" for name in missing)
            warnings.warn(f"The optimizer has no parameter group for the hypernetworks' {ratios} the learning rate: "
                          f"every hypernetwork parameter trains at the run's lr, which is not the method as "
                          f"configured (it learns slower). Use hyperadalora.HyperAdaLoraTrainer, or pass "
                          f"optimizers=(torch.optim.AdamW(model.optimizer_param_groups(lr=...)), None) to the "
                          f"Trainer.", stacklevel=2)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        target = _hypernetwork_model(model) if model is not None else None
        if target is None or optimizer is None:
            return
        for group in optimizer.param_groups:
            factor = group_lr_factor(group, target.peft_config, state.global_step, state.max_steps)
            if factor == 1.0:
                continue
            if self._set_lr.get(id(group)) == group["lr"]:
                continue  # already scaled since the scheduler last set it (an extra call within one step)
            group["lr"] = group["lr"] * factor
            self._set_lr[id(group)] = group["lr"]


class RankAllocationCallback(HypernetworkLrCallback):
    """Call ``update_and_allocate(step)`` after every optimizer step of a `Trainer` (and, for HyperAdaLoRA, what
    `HypernetworkLrCallback` does)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and _allocating_model(model) is None:
            raise ValueError("RankAllocationCallback needs a HyperAdaLoRA model or a peft AdaLoRA model; "
                             f"got {type(_unwrap(model)).__name__}.")
        total = _total_step(model) if model is not None else None
        max_steps = getattr(state, "max_steps", None)
        if total is not None and max_steps and total != max_steps:
            warnings.warn(f"The rank budget schedule assumes total_step={total} optimizer steps, but the Trainer will "
                          f"take {max_steps}: the budget reaches its target at the wrong time. Set total_step="
                          f"{max_steps} in the adapter config (or max_steps={total} in TrainingArguments).",
                          stacklevel=2)
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        target = _allocating_model(model)
        if target is not None:
            target.update_and_allocate(state.global_step + 1)
            self.calls += 1


def _scalars(logs):
    """The logs without the per-layer ranks (``rank/<layer>``): what the console shows."""
    return None if logs is None else {k: v for k, v in logs.items() if not k.startswith("rank/")}


class ScalarProgressCallback(ProgressCallback):
    """transformers' progress bar, printing the logs without the per-layer ranks (hundreds of them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_scalars(logs), **kwargs)


class ScalarPrinterCallback(PrinterCallback):
    """transformers' log printer (``disable_tqdm``), printing the logs without the per-layer ranks."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_scalars(logs), **kwargs)


# ---------------------------------------------------------------------------------------------- the regulariser
# The orthogonal regulariser (orth_reg_weight) is part of the loss the model's forward returns (this package's models
# and peft's AdaLoRA add it there), and Trainer scales that loss as a whole. transformers 5's Trainer, when the loss
# was normalised by the tokens of the whole optimizer step (the model takes num_items_in_batch; or a compute_loss_func),
# multiplies it by the number of processes (average_tokens_across_devices: DDP / FSDP then average the gradients) and
# does not divide it by the gradient-accumulation steps: right for the task loss, but the regulariser, the same on every
# process and in every micro-batch, would be counted (processes x micro-batches) times per optimizer step.
# HyperAdaLoraTrainer.compute_loss has the forward add it with a weight that this scaling turns into the weight once.
def _penalty_factor(trainer, num_items_in_batch, training: bool = True) -> float:
    """What the regulariser's weight must be multiplied by in the loss of one micro-batch so that Trainer's scaling of
    that loss leaves it weighted ``1 / current_gradient_accumulation_steps`` in every training micro-batch (once per
    optimizer step; the processes' gradients are averaged) and weighted 1 in an evaluation batch (peft's AdaLoRA adds
    it to the evaluation loss too; the processes' losses are averaged). The scaling as transformers 5.23 does it:
    ``Trainer.compute_loss`` multiplies the loss by the processes (``average_tokens_across_devices``, the loss
    normalised by ``num_items_in_batch``; in evaluation too), ``Trainer.training_step`` divides it by the accumulation
    steps unless it is scaled for them already (``loss_is_scaled_for_ga``, by default: normalised by
    ``num_items_in_batch``)."""
    counted = num_items_in_batch is not None and (trainer.model_accepts_loss_kwargs
                                                  or trainer.compute_loss_func is not None)
    processes = 1
    if trainer.args.average_tokens_across_devices and counted:
        tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
        processes = trainer.accelerator.num_processes // tp if trainer.args.n_gpu <= 1 else trainer.args.n_gpu
    if not training:
        return 1.0 / processes if processes != 1 else 1.0
    scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled_for_ga is None:
        scaled_for_ga = ((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
                         or trainer.compute_loss_func is not None)
    steps = getattr(trainer, "current_gradient_accumulation_steps", 1) if scaled_for_ga else 1
    return 1.0 / (processes * steps) if processes * steps != 1 else 1.0


@contextlib.contextmanager
def penalty_scaled(model, factor: float):
    """While inside: the regulariser that ``model``'s training forward adds to its loss weighted ``factor`` times its
    weight (this package's models: `AdapterModel.penalty_loss_factor`; peft's AdaLoRA: its config's
    ``orth_reg_weight``). Nothing for other models or ``factor == 1``."""
    target = _unwrap(model)
    if factor == 1.0:
        yield
        return
    if isinstance(target, AdapterModel):
        target.penalty_loss_factor = factor
        try:
            yield
        finally:
            del target.penalty_loss_factor  # back to the class's 1
        return
    allocating = _allocating_model(target)
    config = None if allocating is None or isinstance(allocating, AdapterModel) else \
        allocating.peft_config.get(getattr(allocating, "trainable_adapter_name", None))
    if config is None or not getattr(config, "orth_reg_weight", 0):
        yield
        return
    weight = config.orth_reg_weight
    config.orth_reg_weight = weight * factor
    try:
        yield
    finally:
        config.orth_reg_weight = weight


# ---------------------------------------------------------------------------------------------- FSDP
# Under accelerate's FSDP plugin, HyperAdaLoraTrainer shards the model itself, before accelerate prepares it, the way
# the library's own loop does (training.distributed.wrap_fsdp): only the frozen base model is sharded (FSDP2's
# fully_shard, one unit per transformer block and the root), every parameter the adapter adds or trains stays whole on
# every process and its gradients are averaged by one all_reduce after the last micro-batch (as DDP does).
# accelerate's own fsdp2_prepare_model would shard the hypernetworks and adapters too, which the rank allocation and
# the saving read whole; it leaves a model that is already an FSDPModule as it is. Refused: the options that this
# sharding does not apply.
FSDP_VERSION_MESSAGE = (
    "HyperAdaLoraTrainer with FSDP version {version}: this package's adapter models (and peft's AdaLoRA) train under "
    "FSDP2 only (the frozen base model sharded, the adapters and hypernetworks whole on every process). Set "
    "fsdp_version: 2 in the accelerate config (or fsdp_config={{'fsdp_version': 2}} in TrainingArguments).")
FSDP_OPTION_MESSAGE = (
    "HyperAdaLoraTrainer with FSDP and {option}: not supported for this package's adapter models and peft's AdaLoRA "
    "({why}). {fix}")
FSDP_QUANTIZED_MESSAGE = (
    "HyperAdaLoraTrainer with FSDP and a 4-bit / 8-bit (bitsandbytes) base: FSDP2 shards every base parameter into a "
    "DTensor, and bitsandbytes' parameters keep their quantization state (absmax, code) beside the packed bytes, which "
    "a DTensor shard does not carry. Train a quantized base with DDP (no fsdp: each process holds the whole quantized "
    "model), or shard a bf16 base (torch_dtype=torch.bfloat16) with FSDP.")


def _fsdp_refusal(plugin, model) -> "str | None":
    """Why the FSDP plugin's settings cannot be applied to ``model`` by `HyperAdaLoraTrainer`, or None."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from .quantization import is_quantized

    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        return FSDP_VERSION_MESSAGE.format(version=version)
    if getattr(plugin, "activation_checkpointing", False):
        return FSDP_OPTION_MESSAGE.format(
            option="activation_checkpointing (fsdp_activation_checkpointing)",
            why="accelerate would wrap the transformer blocks in checkpoint wrappers after this trainer has sharded "
                "them, the reverse of FSDP2's order; not tested",
            fix="Set it to false.")
    if isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy):
        return FSDP_OPTION_MESSAGE.format(
            option="CPU offload (fsdp_offload_params)",
            why="this trainer shards the base model without an offload policy, so the option would be ignored",
            fix="Set it to false.")
    if getattr(plugin, "cpu_ram_efficient_loading", False) or any(p.is_meta for p in model.parameters()):
        return FSDP_OPTION_MESSAGE.format(
            option="cpu_ram_efficient_loading (fsdp_cpu_ram_efficient_loading)",
            why="with it, from_pretrained loads the weights on process 0 only and relies on accelerate's own sharding "
                "to send them to the others, which this trainer does not use",
            fix="Set it to false: every process loads the base model, then each keeps its shard.")
    if is_quantized(model):
        return FSDP_QUANTIZED_MESSAGE
    return None


def _base_parameter_ids(model) -> set:
    """The ids of the parameters FSDP shards: the frozen parameters of the transformers model inside ``model``, less
    the adapter layers' own (everything of a layer with a ``base_layer`` but that base layer: peft AdaLoRA's frozen
    ``ranknum`` included) and, for this package's models, anything outside the transformers model (hypernetworks)."""
    target = _unwrap(model)
    inner = target.base_model if isinstance(target, AdapterModel) else target
    adapter = set()
    for module in inner.modules():
        if isinstance(getattr(module, "base_layer", None), torch.nn.Module):
            adapter |= {id(p) for n, p in module.named_parameters() if not n.startswith("base_layer.")}
    return {id(p) for p in inner.parameters() if not p.requires_grad and id(p) not in adapter}


def _fsdp_not_enabled(args, fsdp_enabled: bool) -> "str | None":
    """The warning for a multi-process run that asked for FSDP (``fsdp`` in TrainingArguments, or `accelerate launch`
    with an FSDP config) which accelerate did not enable (on the CPU it never does), or None."""
    asked = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true",
                                                                                                      "yes")
    if fsdp_enabled or not asked or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return ("FSDP was asked for (fsdp in TrainingArguments, or accelerate launch with an FSDP config) but accelerate "
            "did not enable it: it enables FSDP on GPUs and other accelerators only, not on the CPU. "
            + ("This run is DDP (every process holds the whole model)." if args.world_size > 1 else
               "The processes are not joined (each trains on its own); on the CPU pass use_cpu=True to "
               "TrainingArguments to train them with DDP."))


def _unprepare_evaluation_model(trainer, model) -> bool:
    """Let accelerate wrap ``model`` in DDP for training after ``Trainer.evaluate`` ran before ``train``.

    transformers 5.23's evaluation loop, when no model was prepared yet, prepares the bare model with
    ``accelerator.prepare_model(model, evaluation_mode=True)`` (no DDP), which marks it ``_is_accelerate_prepared``;
    the ``accelerator.prepare(model, optimizer)`` of ``train`` then returns it as it is: every process trains on its
    own gradients, nothing averages them (the processes drift apart, and from one process). Here, for a multi-process
    run that accelerate wraps in DDP (not FSDP, DeepSpeed or a model sharded at loading), the mark and the autocast
    wrapper of its forward are taken off the bare model, so that ``train``'s prepare wraps it as it would have
    without the evaluation. Returns True if it did."""
    if (getattr(trainer.args, "world_size", 1) <= 1 or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
            or getattr(trainer, "is_distributed_loading_by_transformers", False) or model is not trainer.model
            or not model.__dict__.get("_is_accelerate_prepared", False)
            or trainer.accelerator.unwrap_model(model, keep_torch_compile=False) is not model):
        return False
    original = model.__dict__.pop("_original_forward", None)   # accelerate's autocast wrapper (mixed precision)
    if original is not None:
        if getattr(original, "__self__", None) is model and \
                getattr(original, "__func__", None) is getattr(type(model), "forward", None):
            model.__dict__.pop("forward", None)
        else:
            model.forward = original
    del model._is_accelerate_prepared
    trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not model]
    return True


class HyperAdaLoraTrainer(Trainer):
    """A `transformers.Trainer` for this package's models (HyperAdaLoRA, the generated-adapter methods) and peft's
    AdaLoRA: the optimizer is built from ``model.optimizer_param_groups(learning_rate, weight_decay)`` (the
    hypernetworks' own learning rates) with the optimizer class and settings of ``TrainingArguments``; rank
    allocation (`RankAllocationCallback`) and the hypernetworks' lr schedule (`HypernetworkLrCallback`) are added
    unless given. Checkpoints and ``save_model`` hold the adapter in the model's ``save_pretrained`` format
    (`hyperadalora.load_adapter` reads it) and ``training_state.safetensors`` (an exact resume), not the frozen
    base model; for any other model (peft's AdaLoRA...) they are `Trainer`'s. Training logs carry the total rank
    and the rank per layer (``rank/<layer>``) for ``report_to``. Anything else behaves as `Trainer`.

    Under FSDP (``accelerate launch`` with an FSDP2 config, or ``fsdp`` / ``fsdp_config={"fsdp_version": 2}`` in
    TrainingArguments), for this package's models and peft's AdaLoRA, only the frozen base model is sharded (one
    FSDP2 unit per transformer block and the root); the adapters, hypernetworks and trained heads stay whole on every
    process, their gradients averaged by one all_reduce per optimizer step, so the rank allocation, the checkpoints
    and the saved adapter are those of one process (`_shard_base_model`). ``fsdp_info`` is then this process's share
    of the base model's parameters (`training.distributed.base_param_counts`)."""

    fsdp_info = None            # under FSDP: this process's share of the base model's parameters
    _fsdp_replicated = None     # under FSDP: the parameters whole on every process (their gradients all_reduced)
    _fsdp_dist = None           # under FSDP: this process's `training.distributed.Distributed`

    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if self.is_fsdp_enabled and (
                _adapter_model(self.model) is not None or _allocating_model(self.model) is not None):
            self._shard_base_model()
        elif _fsdp_not_enabled(self.args, self.is_fsdp_enabled) is not None:
            warnings.warn(_fsdp_not_enabled(self.args, self.is_fsdp_enabled), stacklevel=2)
        for cb in list(self.callback_handler.callbacks):  # the console: scalars only (the ranks go to report_to)
            for printer, scalars_only in ((ProgressCallback, ScalarProgressCallback),
                                          (PrinterCallback, ScalarPrinterCallback)):
                if type(cb) is printer:
                    self.callback_handler.remove_callback(cb)
                    self.callback_handler.add_callback(scalars_only())
        have = [type(cb) for cb in self.callback_handler.callbacks]
        if _allocating_model(self.model) is not None:
            if not any(issubclass(t, RankAllocationCallback) for t in have):
                self.add_callback(RankAllocationCallback())
        elif _hypernetwork_model(self.model) is not None:
            if not any(issubclass(t, HypernetworkLrCallback) for t in have):
                self.add_callback(HypernetworkLrCallback())

    # ------------------------------------------------------------------ FSDP
    def _shard_base_model(self) -> None:
        """Shard the frozen base model over the processes (`training.distributed.wrap_fsdp`: one FSDP2 unit per
        transformer block and the root; the adapters, hypernetworks and trained heads whole on every process, copied
        from process 0), before accelerate prepares the model: accelerate then leaves it as it is (it is an
        FSDPModule). Raises ValueError for an FSDP setting that this cannot apply (`_fsdp_refusal`)."""
        import torch.distributed as dist
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        from .training.distributed import Distributed, transformer_blocks, wrap_fsdp

        plugin = self.accelerator.state.fsdp_plugin
        refusal = _fsdp_refusal(plugin, self.model)
        if refusal is not None:
            raise ValueError(refusal)
        model, device = self.model, self.args.device
        # the block classes, as accelerate resolves them (fsdp_transformer_layer_cls_to_wrap, else the model's
        # _no_split_modules) before it shards: once sharded they are renamed (FSDPLlamaDecoderLayer), and accelerate's
        # own call at prepare leaves the policy resolved here as it is
        plugin.set_auto_wrap_policy(model)
        policy = plugin.auto_wrap_policy
        classes = getattr(policy, "keywords", {}).get("transformer_layer_cls")
        if getattr(policy, "func", None) is not transformer_auto_wrap_policy or not classes:
            warnings.warn(f"FSDP's auto wrap policy {getattr(policy, 'func', policy)!r} is not applied to this "
                          f"package's models: the FSDP units are the transformer blocks (the model's "
                          f"_no_split_modules) and the root.", stacklevel=3)
            classes = None
        if any(p.device != device for p in model.parameters()):  # FSDP moves only what it shards
            model.to(device)
        base_ids = _base_parameter_ids(model)
        self._fsdp_dist = Distributed(dist.get_rank(), dist.get_world_size(), self.args.local_process_index)
        blocks = transformer_blocks(model, sorted(c.__name__ for c in classes) if classes else None)
        self.fsdp_info = wrap_fsdp(model, device, self._fsdp_dist, base_ids, blocks=blocks)
        self._fsdp_replicated = [p for p in model.parameters() if not hasattr(p, "to_local")]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's ``compute_loss``; in training, the regulariser that the model's forward adds to its loss
        (``orth_reg_weight``: this package's models and peft's AdaLoRA) is weighted so that, after Trainer's scaling
        of the loss (the processes, the gradient-accumulation steps) and the averaging of the
        gradients over the processes, it counts once per optimizer step with its weight, as in one process without
        accumulation (`_penalty_factor`); in evaluation (peft's AdaLoRA adds it there too) once per batch."""
        factor = 1.0
        if _adapter_model(model) is not None or _allocating_model(model) is not None:
            factor = _penalty_factor(self, num_items_in_batch, model.training)
        with penalty_scaled(model, factor):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self._fsdp_replicated is not None and self.accelerator.sync_gradients:
            # the last micro-batch of the optimizer step: average the whole parameters' gradients over the processes
            # (FSDP reduces only what it shards), before Trainer clips them and steps
            from .training.distributed import all_reduce_grads

            all_reduce_grads(self._fsdp_replicated, self._fsdp_dist)
        return loss

    def autocast_smart_context_manager(self, cache_enabled=True):
        # accelerate's FSDP2 casts through the mixed-precision policy of the units it shards itself; a model sharded
        # here computes under autocast instead (bf16 / fp16), as accelerate does for DDP
        if self._fsdp_replicated is not None and self.accelerator.native_amp:
            return self.accelerator.autocast()
        return super().autocast_smart_context_manager(cache_enabled)

    def _wrap_model(self, model, training=True, dataloader=None):
        if training:
            _unprepare_evaluation_model(self, model)
        model = super()._wrap_model(model, training, dataloader)
        if (self._fsdp_replicated is not None and not training and model is self.model
                and not getattr(model, "_is_accelerate_prepared", False)):
            # evaluation before training: Trainer would give accelerate's FSDP2 prepare the model without an optimizer,
            # which it refuses; the model is sharded already and needs only what accelerate adds for evaluation
            model = self.accelerator.prepare_model(model, evaluation_mode=True)
            model._is_accelerate_prepared = True
        return model

    @contextlib.contextmanager
    def _whole_checkpoints(self):
        """Trainer's saving and loading of a single process for a model sharded by `_shard_base_model`: what a
        checkpoint holds (the adapter, ``training_state.safetensors``, the optimizer state of the whole parameters)
        is whole and the same on every process; the sharded base model is never saved (nor Trainer's FSDP files)."""
        if self._fsdp_replicated is None:
            yield
            return
        self.is_fsdp_enabled = False
        try:
            yield
        finally:
            self.is_fsdp_enabled = True

    def save_model(self, output_dir=None, _internal_call=False):
        with self._whole_checkpoints():
            return super().save_model(output_dir, _internal_call=_internal_call)

    def _save_optimizer_and_scheduler(self, output_dir):
        with self._whole_checkpoints():
            return super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with self._whole_checkpoints():
            return super()._load_optimizer_and_scheduler(checkpoint)

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        target = _unwrap(opt_model)
        if self.optimizer is None and hasattr(target, "optimizer_param_groups"):
            groups = target.optimizer_param_groups(self.args.learning_rate, self.args.weight_decay)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs also carry ``total_rank`` and, when ``report_to`` names a tracker, ``rank/<layer>``
        (`tracking.rank_logs`): the ``report_to`` integrations of ``TrainingArguments`` (TensorBoard, W&B, MLflow...)
        record the ranks."""
        if "loss" in logs and (_adapter_model(self.model) is not None or _allocating_model(self.model) is not None):
            ranks = rank_logs(self.model)
            reporting = [r for r in (self.args.report_to or []) if r != "none"]
            # the rank per layer only for a tracker; the console's callbacks print the scalars only (_scalars)
            logs.update(ranks if reporting else {"total_rank": ranks["total_rank"]})
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving and loading
    def _own_saving(self, model=None):
        """The adapter model whose saving this trainer does itself, or None (Trainer's own saving: another model,
        or DeepSpeed / FSDP / SageMaker MP, whose checkpoints Trainer writes and reads its own way)."""
        if self.is_deepspeed_enabled or (self.is_fsdp_enabled and self._fsdp_replicated is None) \
                or is_sagemaker_mp_enabled():
            return None
        return _adapter_model(self.model if model is None else model)

    def _save(self, output_dir=None, state_dict=None):
        target = self._own_saving() if state_dict is None else None
        if target is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        if _has_training_state(target):
            # the state the next step starts from (as the next forward would commit it), before save_pretrained
            target.commit_state()
        target.save_pretrained(output_dir)
        if _has_training_state(target):
            save_training_state(target, output_dir, self.args)
        # what Trainer._save writes besides the model
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _checkpoint_kind(self, directory: str, model=None) -> str:
        """What a checkpoint directory holds for this trainer: "state" (`training_state.safetensors`, ours),
        "trainer" (Trainer's own files: another model, DeepSpeed / FSDP, or an older whole-model file) or
        "adapter" (a fixed adapter's checkpoint: only the adapter, nothing to resume)."""
        if self._own_saving(model) is None:
            return "trainer"
        if os.path.isfile(os.path.join(directory, TRAINING_STATE_NAME)):
            return "state"
        return "trainer" if os.path.isfile(os.path.join(directory, "model.safetensors")) else "adapter"

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        kind = self._checkpoint_kind(resume_from_checkpoint, model)
        if kind == "adapter":
            raise ValueError(f"Cannot resume from {resume_from_checkpoint!r}: it has no {TRAINING_STATE_NAME} "
                             f"(the training state of a HyperAdaLoraTrainer checkpoint; a checkpoint of a fixed "
                             f"adapter, loaded or with its hypernetworks dropped, has only the adapter).")
        if kind == "trainer":
            with self._whole_checkpoints():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_training_state(self._own_saving(model), resume_from_checkpoint, self.args)
        return None

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        kind = self._checkpoint_kind(best)
        if kind == "adapter":
            warnings.warn(f"The best checkpoint {best} has no {TRAINING_STATE_NAME} (a fixed adapter's): the "
                          f"model is left as it is at the end of training.", stacklevel=2)
            return None
        if kind == "trainer":
            with self._whole_checkpoints():
                return super()._load_best_model()
        load_training_state(self._own_saving(), best)
        return None
