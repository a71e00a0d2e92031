"""The training loop: one loop for HyperAdaLoRA, the generated-adapter methods and peft's LoRA / DoRA / AdaLoRA.

A `TrainingLoop` (run by `entry.train`) holds a run's model, data, optimizer and `LoopState`, what a checkpoint records
of the loop (step, epoch, batches consumed, counters). Each concern is one method: `TrainingLoop.train_step` (the
micro-batches, the skipped non-finite steps, the optimizer and the rank allocation), `log_step` / `log_eval`,
`evaluate`, `checkpoint`, `check_stop` (NaN/Inf in a row, SIGINT / SIGTERM), `run` and `finish` (adapter, summary).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .. import checkpoint as ckpt_lib
from .. import data as data_lib
from .. import progress
from .. import quantization as quant_lib
from .. import tracking
from ..generator import FEATURE_GROUP, group_lr_factor
from ..base_models import load_model_and_tokenizer
from ..methods import AdapterModel
from . import evaluation
from .adapters import (TaskLossProbe, make_optimizer, param_groups, quantization_config, rank_pattern, task_type_of,
                       total_rank)
from .args import FSDP_QUANTIZED, TrainArgs, hypernetwork_options
from .distributed import (Distributed, all_mean, all_reduce_grads, fsdp_from_env, fsdp_gathered, shard_batch,
                          wrap_ddp, wrap_fsdp)
from .run_files import last_logged_ranks, latest_checkpoint, median_step, truncate_metrics, write_summary
from .stopping import NonFiniteLossError, StopRequest, TrainingInterrupted

# (args, model, task_type) -> (adapter model, allocate(step) or None): `adapters.build_adapter_model` by default
AdapterBuilder = Callable[[TrainArgs, torch.nn.Module, str], tuple]


@dataclass
class LoopState:
    """Where the loop is: what a checkpoint records of it (``state.json["loop"]``) and a resumed run starts from."""

    step: int = 0             # optimizer steps done
    epoch: int = 0            # the epoch of the data order (its loader is seeded with seed + epoch)
    batches: int = 0          # batches of that epoch consumed
    train_time: float = 0.0   # seconds in optimizer steps
    elapsed: float = 0.0      # seconds since the run started (at the checkpoint)
    nonfinite: int = 0        # skipped (NaN/Inf) steps in all
    consecutive: int = 0      # ... in a row, up to now
    last: dict = field(default_factory=dict)  # the last step's metrics row

    def record(self, elapsed: float) -> dict:
        """The state as a checkpoint records it, at ``elapsed`` seconds."""
        return {"step": self.step, "epoch": self.epoch, "batches": self.batches, "train_time": self.train_time,
                "nonfinite": self.nonfinite, "consecutive": self.consecutive, "last": self.last, "elapsed": elapsed}

    @classmethod
    def from_record(cls, loop: dict) -> "LoopState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in loop.items() if k in names})


class TrainingLoop:
    """One run: the model, data, optimizer and `LoopState` of ``args`` (restored from ``ckpt`` when resuming), set up
    in the constructor in a fixed order (the seeds and the random state are consumed as in every earlier version, so
    the losses stay the same bit for bit), then `run`."""

    def __init__(self, args: TrainArgs, spec, dist: Distributed, device: torch.device, build_adapter: AdapterBuilder,
                 *, ckpt: Optional[dict] = None, model=None, tokenizer=None, train_examples=None, eval_examples=None,
                 on_step: Optional[Callable[[int, dict], None]] = None, eval_details: bool = False):
        self.args, self.spec, self.dist, self.device, self.ckpt = args, spec, dist, device, ckpt
        self.on_step, self.eval_details = on_step, eval_details
        if train_examples is None or eval_examples is None:
            with progress.stage("load_data", f"loading the {args.task} data", quiet_below=1.0):
                if train_examples is None:
                    train_examples = data_lib.load_examples(args.task, "train", args.data_dir, path=args.data_path,
                                                            max_examples=args.max_train_examples, seed=args.seed)
                if eval_examples is None:
                    eval_examples = data_lib.load_examples(args.task, "dev", args.data_dir, path=args.data_path,
                                                           max_examples=args.max_eval_examples, seed=args.seed)
        with progress.stage("load_model", f"loading the model ({args.model or 'the default for ' + args.task})"):
            model, tokenizer = self._base_model(model, tokenizer)
        self.tokenizer = tokenizer
        # FSDP (--fsdp, or accelerate launch with an FSDP config) in a multi-process run: the base model's own
        # parameters are sharded, everything the adapter adds stays whole (`distributed.wrap_fsdp`)
        self.fsdp = dist.world > 1 and (args.fsdp or fsdp_from_env())
        if self.fsdp and quant_lib.is_quantized(model):
            raise ValueError(FSDP_QUANTIZED)
        base_ids = {id(p) for p in model.parameters()} if self.fsdp else set()
        with progress.stage("adapter", f"adding the {args.method} adapters"):
            self.model, self.allocate = build_adapter(args, model, task_type_of(spec.kind))  # the adapter model
            if args.gradient_checkpointing:
                quant_lib.enable_gradient_checkpointing(self.model)
            self.model.to(device)
        with progress.stage("tokenize", f"tokenizing {len(train_examples)} + {len(eval_examples)} examples",
                            quiet_below=1.0):
            if spec.kind == "classification":
                self.train_ds = data_lib.build_classification_dataset(train_examples, tokenizer, args.max_length)
                eval_ds = data_lib.build_classification_dataset(eval_examples, tokenizer, args.max_length)
            else:
                self.train_ds = data_lib.build_instruction_dataset(train_examples, tokenizer, args.max_length)
                eval_ds = data_lib.build_instruction_dataset(eval_examples, tokenizer, args.max_length)
        self.collate = data_lib.make_collator(tokenizer)
        self.eval_loader = data_lib.make_dataloader(eval_ds, args.batch_size, shuffle=False, seed=args.seed,
                                                    collate_fn=self.collate)
        self.gen_examples = eval_examples[:args.gen_eval_examples] if spec.kind == "instruction" else None
        self.optimizer = make_optimizer(self.model, args)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.adapter_cfg = getattr(self.model, "peft_config", None)  # the row embeddings' schedule reads it
        self.state = LoopState()
        if ckpt is not None:
            self._restore(ckpt)
        # what the training forward runs: DDP around the model in a multi-process run, or the model sharded in
        # place by FSDP (after the checkpoint is loaded: both make every process start from process 0's state)
        self.fsdp_info = None
        if self.fsdp:
            self.fsdp_info = wrap_fsdp(self.model, device, dist, base_ids)
            self.wrapped = self.model
        else:
            self.wrapped = wrap_ddp(self.model, device) if dist.world > 1 else self.model
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if ckpt is not None and dist.main:
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt["path"])))
            truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), self.metrics_path, self.state.step)
        # the epoch's loader (its order depends only on seed + epoch), fast-forwarded past the consumed batches
        self.batches = iter(self._train_loader(self.state.epoch))
        for _ in range(self.state.batches):
            next(self.batches, None)
        if ckpt is not None:
            ckpt_lib.restore_rng(ckpt["rng"])
        self.probe = None if args.method == "hyperadalora" else TaskLossProbe(self.model)
        self.log = self.tracker = self.bar = None
        # the per-layer ranks are logged when they change: a resumed run compares with the last ones its metrics hold,
        # as the uninterrupted run would
        self.last_ranks = last_logged_ranks(self.metrics_path) if ckpt is not None and dist.main else None
        self.stop = StopRequest()

    # ------------------------------------------------------------------------------------------ set-up
    def _base_model(self, model, tokenizer):
        args, spec = self.args, self.spec
        quantize = args.load_in_4bit or args.load_in_8bit
        if model is None:
            model, tokenizer, _ = load_model_and_tokenizer(
                args.model, spec.kind, num_labels=max(spec.num_labels, 2),
                quantization=quantization_config(args, spec.kind) if quantize else None, device=self.device)
        elif quantize and not quant_lib.is_quantized(model):
            raise ValueError("load_in_4bit / load_in_8bit quantize the base model when train() loads it; the model "
                             "passed in has no bitsandbytes layer: pass a quantized model, or leave the flags out.")
        if quant_lib.is_quantized(model):
            note = progress.quantized_base_note()
            if note and self.dist.main:
                print(f"hyperadalora: {note}", file=sys.stderr)
            model = quant_lib.prepare_quantized_base(model)
        return model, tokenizer

    def _restore(self, ckpt: dict) -> None:
        ckpt_lib.load_model_state(self.model, ckpt["tensors"], ckpt["state"]["model"], ckpt["path"],
                                  hint=ckpt.get("hint", ""))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt_lib.CheckpointError(f"{ckpt['path']}: the optimizer state does not fit this run ({e}).") from e
        self.state = LoopState.from_record(ckpt["state"]["loop"])

    def _train_loader(self, epoch: int):
        """The training batches of ``epoch``: global batches (``world * batch_size``; each process takes its slice)."""
        return data_lib.make_dataloader(self.train_ds, self.args.batch_size * self.dist.world, shuffle=True,
                                        seed=self.args.seed + epoch, collate_fn=self.collate)

    def autocast(self):  # bf16 autocast of the base model; HyperAdaLoRA keeps its hypernetworks in fp32
        if self.args.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr_factor(self, step: int) -> float:
        """The run's schedule at ``step`` (0-based index of the optimizer step about to be taken)."""
        args = self.args
        if args.warmup_steps and step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.scheduler == "constant":
            return 1.0
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))

    def task_loss(self, out) -> torch.Tensor:
        """The task loss of the forward that gave ``out``, without the orthogonal regulariser (peft's AdaLoRA adds
        it to ``out.loss``, in evaluation too; HyperAdaLoRA only to a training forward's)."""
        if isinstance(self.model, AdapterModel):
            return self.model.last_task_loss
        return self.probe.value if self.probe is not None and self.probe.value is not None else out.loss

    # ------------------------------------------------------------------------------------------ one step
    def loss_normaliser(self, whole: dict) -> dict:
        """Multi-process causal-LM training: ``num_items_in_batch`` for transformers' loss, so that each process's
        loss is its labelled tokens' summed loss over the global batch's labelled tokens, times the world size (the
        mean over processes, which DDP's and `distributed.all_reduce_grads`'s averaging take, is then the global
        batch's token mean, as one process computes it; a mean of each process's own token mean would weigh the
        processes' tokens unequally). Nothing in a single-process run or for classification (a mean over
        examples, equal shares)."""
        if self.dist.world == 1 or self.spec.kind == "classification" or "labels" not in whole:
            return {}
        tokens = int((whole["labels"][:, 1:] != -100).sum())
        return {"num_items_in_batch": torch.tensor(max(tokens, 1) / self.dist.world, device=self.device)}

    def next_batch(self) -> dict:
        """The next global batch; a new epoch (its own order) when this one is used up."""
        try:
            batch = next(self.batches)
            if len(next(iter(batch.values()))) < self.dist.world:
                raise StopIteration  # too few examples left for every process: next epoch
        except StopIteration:
            self.state.epoch += 1
            self.state.batches = 0
            self.batches = iter(self._train_loader(self.state.epoch))
            batch = next(self.batches)
        self.state.batches += 1
        return batch

    def train_step(self, step: int) -> tuple[dict, bool]:
        """Optimizer step ``step`` (1-based): its metrics row and whether it was taken (False: a NaN/Inf loss or
        gradient; skipped: no optimizer step, no rank allocation)."""
        args, state, optimizer = self.args, self.state, self.optimizer
        t0 = time.perf_counter()
        schedule = self.lr_factor(step - 1)  # the run's schedule at this step, shared by every group
        for g, base_lr in zip(optimizer.param_groups, self.base_lrs):
            g["lr"] = base_lr * schedule * group_lr_factor(g, self.adapter_cfg, step - 1, args.max_steps)
        loss_sum, task_sum = 0.0, 0.0
        for micro in range(args.grad_accum):
            whole = self.next_batch()
            batch = {k: v.to(self.device) for k, v in shard_batch(whole, self.dist).items()}
            batch.update(self.loss_normaliser(whole))
            # DDP: gradients are averaged over processes once per optimizer step (last micro-batch); FSDP: the
            # adapter's gradients are averaged after the last micro-batch (below), the base model has none
            sync = (self.wrapped.no_sync() if self.dist.world > 1 and not self.fsdp and micro < args.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                with self.autocast():
                    out = self.wrapped(**batch)
                loss = out.loss.float() / args.grad_accum
                loss.backward()
            loss_sum += float(out.loss.detach())
            task_sum += float(self.task_loss(out).detach())
        loss_sum, task_sum = all_mean([loss_sum, task_sum], self.dist, self.device)  # the global mean
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.fsdp:
            all_reduce_grads(params, self.dist)
        finite = math.isfinite(loss_sum) and grads_finite(params)
        if finite:
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            if self.allocate is not None:
                self.allocate(step)
            state.consecutive = 0
        else:  # skip the update: the weights, optimizer and allocator stay as they were
            state.nonfinite += 1
            state.consecutive += 1
        optimizer.zero_grad(set_to_none=True)
        state.train_time += time.perf_counter() - t0
        row = {"step": step, "loss": loss_sum / args.grad_accum, "task_loss": task_sum / args.grad_accum,
               "lr": args.lr * schedule, "time": time.perf_counter() - self.start,
               "train_time": state.train_time, "total_rank": total_rank(self.model), "epoch": state.epoch}
        rows_lr = [g["lr"] for g in optimizer.param_groups if g.get("name") == FEATURE_GROUP]
        if rows_lr:  # the row embeddings' lr (their own ratio and schedule)
            row["lr_rows"] = rows_lr[0]
        if isinstance(self.model, AdapterModel):  # HyperAdaLoRA: its orthogonal penalty and generated norm
            row.update(self.model.penalty_logs())
        if not finite:
            row["skipped"] = True
        return row, finite

    # ------------------------------------------------------------------------------------------ logging
    def log_step(self, step: int, row: dict) -> None:
        """metrics.jsonl and the trackers get every step (the per-layer ranks too: metrics.jsonl's ``ranks``, on the
        first row and wherever they changed); the console only scalars, as Trainer prints them: the progress bar's
        loss, lr and total rank, and a line every ``logging_steps`` steps."""
        ranks = tracking.rank_per_layer(self.model) if (self.tracker is not None or self.dist.main) else {}
        logged = dict(row)
        if ranks and ranks != self.last_ranks:
            logged["ranks"] = ranks
            self.last_ranks = ranks
        self.log.write(json.dumps(logged) + "\n")
        self.log.flush()
        if self.tracker is not None:
            self.tracker.log_step(step, row, ranks)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", rank=row["total_rank"])
        every = self.args.logging_steps
        if every and (step % every == 0 or step == self.args.max_steps) and self.dist.main:
            line = json.dumps({"step": step, "loss": round(row["loss"], 4), "learning_rate": row["lr"],
                               "total_rank": row["total_rank"], "epoch": row["epoch"]})
            (self.bar.write if not self.bar.disable else print)(line)

    def log_eval(self, step: int, result: dict, **extra) -> None:
        if self.dist.main:
            self.log.write(json.dumps({"type": "eval", "step": step, **extra, "time": time.perf_counter() - self.start,
                                       **result}) + "\n")
            self.log.flush()
            if self.tracker is not None:
                self.tracker.log_eval(step, result)

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, gen_examples=None) -> Optional[dict]:
        """Dev metrics (`evaluation.evaluate`): process 0 only, on the model without DDP (no collectives). Under FSDP
        every process evaluates (each forward gathers the shards of every process) and process 0's result is kept."""
        result = None
        if self.fsdp:
            with fsdp_gathered(self.model):
                result = evaluation.evaluate(self.model, self.spec, self.eval_loader, self.device, self.tokenizer,
                                             gen_examples, self.args.max_new_tokens, self.autocast, self.task_loss,
                                             details=self.eval_details)
            return result if self.dist.main else None
        if self.dist.main:
            with progress.stage("eval", f"evaluating on {len(self.eval_loader.dataset)} dev examples"
                                + (f" and generating {len(gen_examples)} answers" if gen_examples else ""),
                                quiet_below=1.0):
                result = evaluation.evaluate(self.model, self.spec, self.eval_loader, self.device, self.tokenizer,
                                             gen_examples, self.args.max_new_tokens, self.autocast, self.task_loss,
                                             details=self.eval_details, progress=progress.enabled())
        self.dist.barrier()
        return result

    # ------------------------------------------------------------------------------------------ checkpoints
    def snapshot(self) -> dict:
        """The loop state and random state now: what a checkpoint of this moment holds."""
        return {"loop": self.state.record(time.perf_counter() - self.start), "rng": ckpt_lib.capture_rng()}

    def checkpoint(self, snap: dict) -> Optional[str]:
        """Write the checkpoint of ``snap`` (process 0; none with keep_checkpoints=0): its path, or None."""
        args = self.args
        if not args.keep_checkpoints or not self.dist.main:
            return None
        self.log.flush()  # the metrics rows up to the checkpoint are on disk before it is
        os.fsync(self.log.fileno())
        return ckpt_lib.save_checkpoint(args.output_dir, snap["loop"]["step"], self.model, self.optimizer,
                                        snap["loop"], snap["rng"], json.loads(json.dumps(asdict(args), default=str)),
                                        args.keep_checkpoints, hypernetwork_options(args))

    # ------------------------------------------------------------------------------------------ stopping
    def check_stop(self, step: int, snap: dict) -> None:
        """Raise `NonFiniteLossError` after ``max_nonfinite`` skipped steps in a row (checkpointing the last good
        state), `TrainingInterrupted` after a SIGINT / SIGTERM to any process (checkpointing this step)."""
        args, state, stop = self.args, self.state, self.stop
        if state.consecutive >= args.max_nonfinite:
            first = step - state.consecutive + 1
            path = self.checkpoint(self.good) if self.good is not None else None
            where = (f"the last good state (step {self.good['loop']['step']}) is checkpointed in {path}" if path
                     else "no checkpoint of a good state was written")
            raise NonFiniteLossError(
                f"Non-finite (NaN/Inf) loss or gradient at {state.consecutive} steps in a row (steps {first} to "
                f"{step}; max_nonfinite={args.max_nonfinite}): stopped at step {step}. The updates were skipped; "
                f"{where}. Lower the learning rate, set max_grad_norm, or check the data.")
        if self.dist.world > 1 and stop.signum is None and all_mean([0.0], self.dist, self.device)[0] > 0:
            stop.signum = signal.SIGTERM  # another process was signalled: all stop after the same step
        elif self.dist.world > 1 and stop.signum is not None:
            all_mean([1.0], self.dist, self.device)
        if stop.signum is not None:
            path = self.checkpoint(snap)
            name = signal.Signals(stop.signum).name
            hint = (f"Continue it with --resume {args.output_dir} "
                    f"(train(TrainArgs.resumed({args.output_dir!r})))." if path else "No checkpoint was written "
                    "(keep_checkpoints=0).")
            raise TrainingInterrupted(f"{name}: stopped after step {step} of {args.max_steps}; checkpoint: "
                                      f"{path}. {hint}", stop.signum, step, path)

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Train to ``max_steps``, evaluate, save the adapter and the summary; returns the summary."""
        args, state, main = self.args, self.state, self.dist.main
        self.log = open(self.metrics_path if main else os.devnull, "a" if self.ckpt is not None else "w")
        config = json.loads(json.dumps(asdict(args), default=str))
        self.tracker = tracking.make_tracker(args.report_to, args.output_dir, config) if main else None
        self.start = time.perf_counter() - state.elapsed
        self.good = self.snapshot() if self.ckpt is not None else None  # after the last good step
        saved_at = self.ckpt["step"] if self.ckpt is not None else None
        train_stage = progress.stage("train", f"training {args.method} for {args.max_steps - state.step} steps")
        train_stage.__enter__()
        self.bar = tqdm(total=args.max_steps, initial=state.step, desc="training",
                        disable=not (args.progress and main), leave=False)
        try:
            self.wrapped.train()
            with self.stop:
                for step in range(state.step + 1, args.max_steps + 1):
                    row, finite = self.train_step(step)
                    self.log_step(step, row)
                    if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                        self.log_eval(step, self.evaluate())
                    state.step, state.last = step, row
                    if self.on_step is not None:
                        self.on_step(step, row)
                    snap = self.snapshot()
                    if finite:
                        self.good = snap
                    self.check_stop(step, snap)
                    if finite and args.save_every and step % args.save_every == 0 and step < args.max_steps:
                        saved_at = step
                        self.checkpoint(snap)
            if saved_at != args.max_steps:
                self.checkpoint(self.snapshot())
            self.bar.close()
            train_stage.__exit__(None, None, None)
            train_stage = None
            final = self.evaluate(self.gen_examples)
            self.log_eval(args.max_steps, final, final=True)
        finally:
            if train_stage is not None:
                train_stage.__exit__(None, None, None)
            self.bar.close()
            self.log.close()
            if self.tracker is not None:
                self.tracker.close()
            if self.probe is not None:
                self.probe.remove()
        return self.finish(final)

    def finish(self, final: dict) -> dict:
        """Save the adapter and summary.json (process 0); the summary, with the trained model under ``"model"``."""
        args, state, main = self.args, self.state, self.dist.main
        adapter_dir = os.path.join(args.output_dir, "adapter")
        if args.save_adapter and main:
            with warnings.catch_warnings(), progress.stage("save", f"saving the adapter to {adapter_dir}",
                                                           quiet_below=1.0):
                # peft reads a layer that AdaLoRA pruned to rank 0 (lora_A of shape (0, in)) as an unsharded
                # DeepSpeed/FSDP tensor and warns so; such a layer is legitimate (adapter_config.json: rank_pattern)
                warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*")
                self.model.save_pretrained(adapter_dir)
        last = state.last
        summary = {"method": args.method, "task": args.task, "steps": args.max_steps, "final_eval": final,
                   "final_loss": last.get("loss"), "final_task_loss": last.get("task_loss"),
                   "train_time_s": state.train_time, "wall_time_s": time.perf_counter() - self.start,
                   "median_step_s": median_step(self.metrics_path) if main else None,
                   "total_rank": last.get("total_rank"),
                   "nonfinite_steps": state.nonfinite,
                   "rank_pattern": rank_pattern(self.model), "metrics": self.metrics_path,
                   "adapter": adapter_dir if args.save_adapter else None,
                   "checkpoint": latest_checkpoint(args.output_dir),
                   "resumed_from": self.ckpt["path"] if self.ckpt else None,
                   "args": asdict(args), "hypernetwork_options": hypernetwork_options(args),
                   "processes": self.dist.world,
                   # seconds: since the process started (set-up included), and in each stage (`progress`)
                   **progress.STAGES.summary()}
        if self.fsdp_info is not None:  # this process's share of the base model's parameters (process 0's)
            summary["fsdp"] = self.fsdp_info
        if main:
            write_summary(os.path.join(args.output_dir, "summary.json"), summary)
        summary["model"] = self.model
        return summary


def grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
