"""Training: one loop for HyperAdaLoRA, the generated-adapter methods and peft's LoRA / DoRA / AdaLoRA baselines.

Same data order, seeds, optimizer, schedule and step count for every method: the only difference is the
adapter. `train` writes to ``output_dir``:
- ``metrics.jsonl``: one row per optimizer step ``{"step", "loss", "task_loss", "lr", "time", "total_rank", ...}``
  (``loss`` includes the orthogonal regulariser, ``task_loss`` does not; ``lr`` is the run's scheduled learning
  rate at that step, whatever the groups' own ratios; ``lr_rows`` the row embeddings' own, where they have one),
  and ``{"eval": ...}`` rows at evaluation points (``"type": "eval"``);
- ``summary.json``: the final dev metrics, timings and arguments;
- ``adapter/``: the saved adapter (HyperAdaLoRA: `save_pretrained`; baselines: peft's `save_pretrained`);
- ``checkpoints/step-XXXXXXX/``: training checkpoints (`hyperadalora.checkpoint`), every ``save_every`` steps
  and at the end, the newest ``keep_checkpoints`` kept.

Never lose a run, never fail silently:
- ``resume`` (a checkpoint, or a run's output directory: its newest valid checkpoint) continues the run the
  checkpoint records (its options: `hyperadalora.resume`) exactly where it was taken: on the CPU the losses of
  every later step equal the uninterrupted run's, bit for bit. ``metrics.jsonl`` is cut back to the checkpoint's
  step (a row torn by a kill dropped) and appended.
- A full disk stops the run with `DiskFullError`, naming its last complete checkpoint (left intact).
- SIGINT (Ctrl-C) / SIGTERM finish the current step, write a checkpoint and raise `TrainingInterrupted`
  (the CLI exits with 130 / 143 and prints how to resume).
- A step whose loss or gradient is NaN/Inf is skipped (no optimizer step, no rank allocation; its metrics
  row says ``"skipped": true``; ``nonfinite_steps`` in the summary); after ``max_nonfinite`` in a row the run
  stops with `NonFiniteLossError`, after writing a checkpoint of the last good step.

Modules: `args` (`TrainArgs`, the methods, the options under ``hyper``), `adapters` (the adapter of a run:
`build_adapter_model`), `entry` (`train`), `loop` (`TrainingLoop`, `LoopState`), `evaluation`, `distributed` (devices,
processes, batch sharding), `run_files` (the output directory, metrics.jsonl, resume checks), `stopping`.
"""

from ..resume import OPTIONS_ADDED_LATER, recorded_options
from .adapters import (TaskLossProbe, adapter_config, build_adapter_model, default_target_modules,
                       make_optimizer, param_groups, quantization_config, rank_pattern, task_type_of, total_rank)
from .args import (DEFAULT_OUTPUT_DIR, DEFAULT_TASK, DTYPES, FROM_THE_RUN, HYPER_FIELDS, METHODS, NULLABLE_HYPER_FIELDS,
                   PRECISIONS, RESUME_FREE_ARGS, SCHEDULED_METHODS, TRAIN_ARG_FIELDS, TrainArgs, args_from_dict,
                   config_class, has_hypernetworks, hypernetwork_options, run_dir_of)
from .distributed import Distributed, all_mean, check_device, setup_distributed, shard_batch, wrap_ddp
from .evaluation import evaluate, generate_and_score, per_example_lm_loss
from .entry import set_seed, train
from .loop import AdapterBuilder, LoopState, TrainingLoop, grads_finite
from .run_files import (RUN_FILES, check_resume_args, latest_checkpoint, median_step, prepare_output_dir,
                        read_metrics, truncate_metrics)
from .stopping import (DISK_FULL_ERRNOS, DiskFullError, NonFiniteLossError, StopRequest, TrainingInterrupted)

__all__ = [
    "TrainArgs", "train", "TrainingLoop", "LoopState", "AdapterBuilder", "build_adapter_model", "args_from_dict",
    "read_metrics", "METHODS", "HYPER_FIELDS", "NULLABLE_HYPER_FIELDS", "FROM_THE_RUN", "TRAIN_ARG_FIELDS", "DTYPES",
    "PRECISIONS", "DEFAULT_TASK", "DEFAULT_OUTPUT_DIR", "SCHEDULED_METHODS", "RESUME_FREE_ARGS", "RUN_FILES",
    "OPTIONS_ADDED_LATER", "recorded_options", "config_class", "has_hypernetworks", "hypernetwork_options",
    "run_dir_of", "prepare_output_dir", "check_resume_args", "truncate_metrics", "median_step", "latest_checkpoint",
    "default_target_modules", "quantization_config", "task_type_of", "adapter_config", "param_groups", "total_rank",
    "make_optimizer", "rank_pattern", "TaskLossProbe", "evaluate", "per_example_lm_loss", "generate_and_score",
    "Distributed", "setup_distributed", "wrap_ddp", "shard_batch", "all_mean", "check_device", "set_seed",
    "grads_finite", "StopRequest", "TrainingInterrupted", "NonFiniteLossError", "DiskFullError", "DISK_FULL_ERRNOS",
]
