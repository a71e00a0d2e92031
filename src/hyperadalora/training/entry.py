"""The entry point of training: `train` checks the arguments (and the checkpoint it resumes) before anything loads,
joins the process group of a multi-process run, prepares the output directory, and runs a `loop.TrainingLoop`."""

from __future__ import annotations

import os
import random
from typing import Callable, Optional

import numpy as np
import torch

from .. import checkpoint as ckpt_lib
from .. import data as data_lib
from .. import progress
from .. import tracking
from .adapters import adapter_config, build_adapter_model, task_type_of
from .args import TrainArgs
from .distributed import check_device, setup_distributed
from .loop import AdapterBuilder, TrainingLoop
from .run_files import check_resume_args, disk_full_message, prepare_output_dir
from .stopping import DISK_FULL_ERRNOS, DiskFullError


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(args: TrainArgs, *, model=None, tokenizer=None, train_examples=None, eval_examples=None,
          on_step: Optional[Callable[[int, dict], None]] = None, eval_details: bool = False,
          build_adapter: Optional[AdapterBuilder] = None) -> dict:
    """Fine-tune with ``args.method``; returns the summary (also written to ``output_dir/summary.json``).

    ``model``/``tokenizer``/``*_examples`` may be passed in (tests, experiments) instead of being loaded.
    ``on_step(step, row)`` is called after every optimizer step (and its evaluation), before checkpointing.
    ``eval_details``: the evaluation rows of metrics.jsonl also hold the per-example results (`evaluate`).
    ``build_adapter(args, model, task_type) -> (adapter model, allocate(step) or None)`` wraps the base model
    (default: `adapters.build_adapter_model`); e.g. to keep each run's adapter model for inspection from ``on_step``.
    Raises `TrainingInterrupted` on SIGINT/SIGTERM and `NonFiniteLossError` (both after a checkpoint), and
    `checkpoint.CheckpointError` / FileNotFoundError for a bad ``resume`` (before writing anything).

    Multi-process (``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N``): the model is
    wrapped in DistributedDataParallel, ``batch_size`` is per process, and each optimizer step's global batch
    of ``N * batch_size`` examples is the one a single process with ``N * batch_size`` would draw, split
    between the processes. The logged losses are the means over processes (a causal LM's are normalised by the global
    batch's labelled tokens, so they are the single process's); only process 0 writes metrics, checkpoints, the
    summary and the adapter, and evaluates. ``args.fsdp`` (or ``accelerate launch`` with an FSDP config): FSDP2
    shards the frozen base model over the processes instead of DDP copying it (`distributed.wrap_fsdp`; every
    process then evaluates).
    """
    progress.STAGES.reset(enabled=args.progress and os.environ.get("RANK", "0") == "0")
    spec = data_lib.get_task(args.task)
    # the adapter's options are checked before the model and data load (minutes for a large model); the target
    # modules, which need the model, are checked when the adapter is built
    adapter_config(args, args.target_modules or ["query"], task_type_of(spec.kind))
    check_device(args.device)
    tracking.check_installed(args.report_to)
    ckpt = None
    if args.resume:  # verified before anything is loaded or written
        ckpt = ckpt_lib.load_checkpoint(ckpt_lib.find_checkpoint(args.resume), verified=True)
        ckpt["hint"] = check_resume_args(args, ckpt)
    set_seed(args.seed)
    dist, device = setup_distributed(args.device)
    created = prepare_output_dir(args, dist.main)
    try:
        try:
            loop = TrainingLoop(args, spec, dist, device, build_adapter or build_adapter_model, ckpt=ckpt,
                                model=model, tokenizer=tokenizer, train_examples=train_examples,
                                eval_examples=eval_examples, on_step=on_step, eval_details=eval_details)
            return loop.run()
        except OSError as e:
            if e.errno not in DISK_FULL_ERRNOS:
                raise
            raise DiskFullError(disk_full_message(args, e)) from e
    except BaseException:
        if created and not os.listdir(args.output_dir):  # failed before writing anything: leave no empty directory
            os.rmdir(args.output_dir)
        raise
    finally:
        dist.close()
