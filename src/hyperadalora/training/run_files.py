"""A run's directory: making it ready, checking the checkpoint a run resumes, its metrics.jsonl (cut back to a
checkpoint, read, summarised) and what a full disk leaves of it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict
from typing import Optional

import numpy as np

from .. import checkpoint as ckpt_lib
from ..resume import ResumeConflict, changed_args, recorded_options
from .args import TrainArgs, hypernetwork_options, run_dir_of

RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoints", "adapter")  # what a run writes in its output_dir


def prepare_output_dir(args: TrainArgs, main: bool = True) -> bool:
    """Make ``args.output_dir`` ready for the run. A directory that holds another run (a summary, metrics,
    checkpoints or an adapter) is refused unless the run continues it (``resume`` in it) or ``overwrite`` is set;
    with ``overwrite`` those files are removed first, so that no stale checkpoint is mixed with the new run's.
    Every process checks (all refuse alike); only the ``main`` one removes and creates. Returns whether the
    directory was created here."""
    out = args.output_dir
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    continuing = args.resume and os.path.abspath(run_dir_of(args.resume)) == os.path.abspath(out)
    if present and not continuing:
        if not args.overwrite:
            raise FileExistsError(
                f"{out!r} already holds a run ({', '.join(present)}). Continue it with --resume {out}, replace it "
                f"with --overwrite, or choose another --output-dir.")
        for name in present if main else ():
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    created = main and not os.path.isdir(out)
    if main:
        os.makedirs(out, exist_ok=True)
    return created


def check_resume_args(args: TrainArgs, ckpt: dict) -> str:
    """Refuse a checkpoint of another method, beyond max_steps, or whose recorded arguments or hypernetwork options
    differ from ``args`` where a resumed run may not change them (`TrainArgs` took them from the same record, unless
    it was changed after it was built: `resume.ResumeConflict`). Returns the hint for a checkpoint that does not fit
    the model: "" (the options are the recorded ones, or none were recorded)."""
    saved = ckpt["state"].get("args", {})
    if saved.get("method") not in (None, args.method):
        raise ckpt_lib.CheckpointError(f"{ckpt['path']} was written by a {saved['method']!r} run; this run's "
                                       f"method is {args.method!r}.")
    if ckpt["step"] > args.max_steps:
        raise ckpt_lib.CheckpointError(f"{ckpt['path']} is at step {ckpt['step']}, beyond max_steps={args.max_steps}.")
    # checkpoints record every hypernetwork option the run used, defaults included: compare those, not ``hyper``
    recorded = recorded_options(ckpt["state"].get("hypernetwork_options") or None)
    options = hypernetwork_options(args)
    changed = changed_args(json.loads(json.dumps(asdict(args), default=str)), saved)
    changed += [f"hypernetwork option {k} (recorded {v!r}, now {options[k]!r})"
                for k, v in (recorded or {}).items() if k in options and options[k] != v]
    if changed:
        raise ResumeConflict(f"Resuming {ckpt['path']} with other arguments than it records ({'; '.join(changed)}) "
                             f"would be another run: build the arguments with TrainArgs.resumed({ckpt['path']!r}) "
                             f"(or the CLI's --resume), or start a new run without resume.")
    return ""


def truncate_metrics(source: str, target: str, step: int) -> None:
    """Keep the rows of ``source`` up to ``step`` (no final evaluation) and write them atomically to ``target``."""
    kept = []
    if os.path.isfile(source):
        with open(source) as f:
            lines = f.readlines()
        torn = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by the interruption (a kill, a full disk)
                torn.append(number)
                continue
            if row.get("step", 0) <= step and not row.get("final"):
                kept.append(json.dumps(row) + "\n")
        if torn and torn != [len(lines)]:
            warnings.warn(f"{source}: line(s) {torn} are not JSON (damaged); they are dropped.", stacklevel=3)
        elif torn:
            print(f"{source}: its last line was torn by the interruption; repaired (dropped, the resumed run writes "
                  f"its rows after step {step}).", file=sys.stderr)
    else:
        warnings.warn(f"{source} is missing: {target} will only have the rows after step {step}.", stacklevel=3)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def write_summary(path: str, summary: dict) -> None:
    """summary.json, atomically: a reader never sees half a summary."""
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a metrics.jsonl."""
    rows, evals = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            (evals if row.get("type") == "eval" else rows).append(row)
    return rows, evals


def median_step(metrics_path: str) -> float:
    """The median training time of an optimizer step in a metrics.jsonl (the first step left out: one-off costs)."""
    times = []
    with open(metrics_path) as f:
        prev = 0.0
        for line in f:
            row = json.loads(line)
            if "train_time" in row:
                times.append(row["train_time"] - prev)
                prev = row["train_time"]
    return float(np.median(times[1:] if len(times) > 1 else times)) if times else float("nan")


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = ckpt_lib.list_checkpoints(output_dir)
    return found[-1][1] if found else None


def disk_full_message(args: TrainArgs, error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            latest = ckpt_lib.find_checkpoint(args.output_dir)
        kept = f"its last complete checkpoint, {latest}, is intact"
    except (FileNotFoundError, ckpt_lib.CheckpointError):
        latest, kept = None, "no checkpoint had been completed"
    then = f"continue with --resume {args.output_dir}" if latest else "start it again (--overwrite)"
    return (f"No space left on the device while writing the run's files{where}: {error.strerror or error}. The run "
            f"stopped; {kept}. Free some space (or choose another --output-dir), then {then}.")


def last_logged_ranks(path: str) -> Optional[dict]:
    """The per-layer ranks of the last metrics row that has them (rows log them when they change); None if none."""
    ranks = None
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "ranks" in row:
                    ranks = row["ranks"]
    except FileNotFoundError:
        pass
    return ranks
