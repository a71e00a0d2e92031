"""The cells of the lr sweep: one (task, method, lr, seed) each, a small JSON record under ``OUT/cells/TASK/``
written when its run ends (`cell_record`). A cell is reused when its record was made with the same arguments
(``--reuse``, ``--report-only``) and claimed with a lock file while it runs (`claim`), so that two processes can run
the same command side by side and a sweep can be continued in a later session from committed cells."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import Optional

import numpy as np

from ..report import sanitize
from ..runs import REPO_ROOT, base_args, same_args, train_run
from ..task_setup import default_glue_dir, repo_path
from .design import METHODS, SPLIT_SEED, SweepTask, Variant

def cell_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def cell_path(spec: SweepTask, method: str, lr: float, seed: int, out: str) -> str:
    """Where the cell's record is: ``OUT/cells/TASK/METHOD-lrLR-seedSEED.json``."""
    return os.path.join(out, "cells", spec.name, cell_name(method, lr, seed) + ".json")


def cell_args(spec: SweepTask, opts, method: str, lr: float, seed: int, out: str, variant: Optional[Variant] = None):
    """The TrainArgs of one cell (the options that were set override the task's defaults); ``variant``: a method with
    options of its own (the "why" experiment), named in place of the method."""
    data_path = None
    if spec.data_path and opts.data_path:  # --data-path: another instruction file instead of the Alpaca demo
        data_path = os.path.normpath(os.path.abspath(opts.data_path[0]))
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"lr-sweep: --data-path {opts.data_path[0]!r} does not exist.")
    elif spec.data_path:
        data_path = repo_path(spec.data_path)
        if data_path is None:
            raise FileNotFoundError(f"lr-sweep: {spec.name}: {spec.data_path} (relative to the repository root) does "
                                    f"not exist.")
    kwargs = dict(method=method, task=spec.task, max_steps=spec.steps, batch_size=spec.batch_size, lr=lr, seed=seed,
                  max_length=spec.max_length, eval_every=spec.eval_every, max_eval_examples=spec.max_eval_examples,
                  gen_eval_examples=0, data_path=data_path,
                  output_dir=os.path.join(out, "runs", spec.name, cell_name(method, lr, seed)))
    if variant is not None:
        kwargs.update(method=variant.method, **variant.args)
    if spec.model:
        kwargs["model"] = spec.model
    if spec.task != "alpaca":
        kwargs["data_dir"] = default_glue_dir(opts)
    args = base_args(opts, **kwargs)
    return dataclasses.replace(args, lr=lr, seed=seed)  # the grid's lr, never --lr


def dev_halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two fixed random halves (A, B) of a dev set of ``n`` examples (indices in dev-set order)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def eval_scores(spec: SweepTask, row: dict) -> dict:
    """{score, score_a, score_b} of one evaluation row (written with ``eval_details``)."""
    if spec.score == "accuracy":
        values = np.frombuffer(row["correct"].encode(), dtype=np.uint8) - ord("0")
    else:
        values = np.asarray(row["example_losses"], float)
    a, b = dev_halves(len(values))
    return {"score": float(np.nanmean(values)), "score_a": float(np.nanmean(values[a])),
            "score_b": float(np.nanmean(values[b])), "n": int(len(values))}


def code_version() -> dict:
    """The library version and the git commit (with a ``+dirty`` mark when tracked files differ from it) of the code
    that runs: every cell records them (issue 32)."""
    from ... import __version__
    commit = None
    try:
        root = str(REPO_ROOT)
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"library_version": __version__, "git_commit": commit}


def cell_record(spec: SweepTask, run: dict, lr: float, seed: int, variant: Optional[str] = None) -> dict:
    """The small record of one finished run: its scores at every evaluation, its training loss per 10 steps and its
    timings, with the arguments that identify it (for ``--reuse``) and the code that ran it (`code_version`);
    ``variant``: the name of the cell's variant (the "why" experiment), recorded beside its method."""
    s = run["summary"]
    losses = np.asarray([r["task_loss"] for r in run["rows"]], float)
    return {"task": spec.name, "method": s["method"], **({"variant": variant} if variant else {}), "lr": lr,
            "seed": seed, **code_version(),
            "evals": [{"step": int(e["step"]), **eval_scores(spec, e), "eval_loss": e.get("eval_loss")}
                      for e in run["evals"]],
            "loss_per_10": [round(float(v), 5) for v in
                            (losses[: len(losses) // 10 * 10].reshape(-1, 10).mean(1) if len(losses) >= 10 else [])],
            "final_task_loss": s.get("final_task_loss"), "total_rank": s.get("total_rank"),
            "nonfinite_steps": s.get("nonfinite_steps"), "train_time_s": s.get("train_time_s"),
            "wall_time_s": s.get("wall_time_s"), "median_step_s": s.get("median_step_s"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": json.loads(json.dumps(dataclasses.asdict(run["args"]), default=str)),
            "hypernetwork_options": s.get("hypernetwork_options", {})}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: str) -> bool:
    """Claim a cell for this process (a lock file beside it, created exclusively); a lock left by a process that
    is gone is taken over. False when another live process holds it."""
    lock = path + ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            try:
                os.remove(lock)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def read_cell(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"lr-sweep: {path} is not valid JSON ({e}): delete it to run the cell again.") from None


def write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(sanitize(data), f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_cell(spec: SweepTask, opts, method: str, lr: float, seed: int, out: str,
             variant: Optional[Variant] = None) -> Optional[dict]:
    """The cell's record: reused when its file holds a run with the same arguments (``--reuse``), skipped (None) while
    another process runs it, else trained now. ``method``: the cell's name (a variant's name with ``variant``)."""
    args = cell_args(spec, opts, method, lr, seed, out, variant)
    path = cell_path(spec, method, lr, seed, out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cell = read_cell(path)
    if cell is not None and (opts.reuse or opts.report_only) and same_args(cell, args):
        return cell
    if opts.report_only:
        return None
    if not claim(path):
        print(f"[{spec.name} {cell_name(method, lr, seed)}] running in another process: skipped here", flush=True)
        return None
    try:
        cell = read_cell(path)  # finished by another process between the first look and the claim
        if cell is not None and opts.reuse and same_args(cell, args):
            return cell
        print(f"[{spec.name} {cell_name(method, lr, seed)}] {args.method} at lr {lr:g}, seed {seed}: "
              f"{spec.steps} steps -> {args.output_dir}", flush=True)
        run = train_run(args, reuse=opts.reuse, eval_details=True)
        if run["reused"] and not all(("correct" in e or "example_losses" in e) for e in run["evals"]):
            run = train_run(args, reuse=False, eval_details=True)  # reused run made without the details
        run["args"] = args
        cell = cell_record(spec, run, lr, seed, method if variant is not None else None)
        write_json_atomic(path, cell)
        return cell
    finally:
        try:
            os.remove(path + ".lock")
        except FileNotFoundError:
            pass


def cell_order(lrs, seeds) -> list:
    """(seed, lr) in the order they run: seed by seed, each seed's grid from its middle outwards (a sweep stopped
    early has whole seeds and the middle of the grid)."""
    mid = (len(lrs) - 1) / 2
    by_centre = sorted(lrs, key=lambda lr: (abs(lrs.index(lr) - mid), -lr))
    return [(seed, lr) for seed in seeds for lr in by_centre]


def sweep_cells(spec: SweepTask, opts, lrs: list, seeds: list, out: str) -> list:
    """The records of every cell of the grid that has one: run here (in `cell_order`), reused, or finished by a
    process running beside this one while this one ran the others."""
    cells = []
    for seed, lr in cell_order(lrs, seeds):
        for method in METHODS:
            cell = run_cell(spec, opts, method, lr, seed, out)
            if cell is not None:
                cells.append(cell)
    # cells finished by a process running beside this one count too
    for seed, lr in cell_order(lrs, seeds):
        for method in METHODS:
            if not any(c["method"] == method and c["lr"] == lr and c["seed"] == seed for c in cells):
                cell = read_cell(cell_path(spec, method, lr, seed, out))
                if cell is not None and same_args(cell, cell_args(spec, opts, method, lr, seed, out)):
                    cells.append(cell)
    return cells
