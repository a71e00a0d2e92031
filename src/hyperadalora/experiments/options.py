"""The options of ``hyperadalora experiment NAME`` (`ExperimentOptions`), how they are read and checked, and the
command line that reproduces them (written at the top of every report).

An experiment is a function ``run_<name>(opts) -> dict``. ``opts`` is an `ExperimentOptions` (or an argparse
namespace / dict with the same names); options left at None take the experiment's own default, which must
finish in under 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ExperimentOptions:
    """Options of ``hyperadalora experiment NAME``; None: the experiment's default."""

    data_dir: Optional[str] = None          # GLUE TSV root (default ../shared/data/glue if it exists)
    model: Optional[str] = None             # model dir / .gguf / alias (minilm, smollm2)
    steps: Optional[int] = None             # optimizer steps per run (efficiency: measured steps per method)
    seeds: Optional[int | list] = None      # K: seeds 0..K-1; or a list of seeds (`seed_list`)
    output_dir: Optional[str] = None        # default runs/experiments/NAME
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    max_length: Optional[int] = None        # tokens per example (efficiency: the sequence length)
    data_path: list = field(default_factory=list)  # nlg: extra instruction data files
    tasks: Optional[list] = None            # GLUE tasks (nlu-convergence; the first one for the others)
    variants: Optional[list] = None         # formulation: labels of the variants to run
    variant: list = field(default_factory=list)  # formulation: your own variants, "NAME:KEY=VALUE,..."
    lrs: Optional[list] = None              # lr-sweep: the learning-rate grid
    report_only: bool = False               # lr-sweep: write the report from the finished cells, train nothing
    batch_sizes: Optional[list] = None      # efficiency
    eval_every: Optional[int] = None
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    device: Optional[str] = None            # cpu | cuda (default: cuda if available)
    threads: Optional[int] = None           # torch.set_num_threads (1 on a CPU shared with other jobs)
    reuse: bool = False                     # reuse finished runs (summary.json with the same arguments)
    progress: bool = False                  # per-run progress bars
    name: str = ""                          # the experiment (set by the registry)


def as_options(opts) -> ExperimentOptions:
    """An `ExperimentOptions` from an ExperimentOptions, argparse namespace, dict or None."""
    if opts is None:
        return ExperimentOptions()
    if isinstance(opts, ExperimentOptions):
        return dataclasses.replace(opts)
    data = dict(opts) if isinstance(opts, dict) else dict(vars(opts))
    names = {f.name for f in dataclasses.fields(ExperimentOptions)}
    kwargs = {k: v for k, v in data.items() if k in names and v is not None}
    for key in ("tasks", "batch_sizes", "data_path"):
        value = kwargs.get(key)
        if isinstance(value, str):
            kwargs[key] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (tuple, list)):
            kwargs[key] = list(value)
    if kwargs.get("batch_sizes"):
        kwargs["batch_sizes"] = [int(b) for b in kwargs["batch_sizes"]]
    if "lrs" in kwargs:
        kwargs["lrs"] = parse_lrs(kwargs["lrs"])
    if "seeds" in kwargs:
        kwargs["seeds"] = parse_seeds(kwargs["seeds"])
    out = ExperimentOptions(**kwargs)
    for name in ("steps", "batch_size", "max_length", "threads"):
        v = getattr(out, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"--{name.replace('_', '-')}={v!r} must be a positive integer.")
    if out.lr is not None and not out.lr > 0:
        raise ValueError(f"--lr={out.lr!r} must be a positive number.")
    if out.batch_sizes is not None and (not out.batch_sizes or min(out.batch_sizes) < 1):
        raise ValueError(f"--batch-sizes={out.batch_sizes!r} must be positive integers.")
    return out


def parse_lrs(value) -> list:
    """``--lrs``: learning rates, a list or a comma-separated string ("1e-4,3e-4,1e-3"); each > 0, no repeats."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    try:
        lrs = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"--lrs={value!r} must be comma-separated positive numbers, e.g. 1e-4,3e-4,1e-3.") from None
    if not lrs or any(not (math.isfinite(v) and v > 0) for v in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"--lrs={value!r} must be distinct positive numbers, e.g. 1e-4,3e-4,1e-3.")
    return sorted(lrs)


def parse_seeds(value):
    """``--seeds``: K (an int, or a string of one) or a list of seeds (a list, or "2,3")."""
    bad = ValueError(f"--seeds={value!r} must be a positive number of seeds K (seeds 0..K-1) or a comma-separated "
                     f"list of distinct non-negative seeds, e.g. --seeds 3 or --seeds 2,3.")
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items or not all(v.isdigit() for v in items):
            raise bad
        value = int(items[0]) if len(items) == 1 and "," not in value else [int(v) for v in items]
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        if value < 1:
            raise bad
        return value
    if isinstance(value, (list, tuple)):
        seeds = list(value)
        if (not seeds or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in seeds)
                or len(set(seeds)) != len(seeds)):
            raise bad
        return seeds
    raise bad


def seed_list(opts: ExperimentOptions, default: int) -> list:
    """The seeds to run: 0..K-1 for ``--seeds K`` (or the experiment's default K), else the given list."""
    seeds = pick(opts.seeds, default)
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def pick(value, default):
    return default if value is None else value


def command_line(name: str, opts: ExperimentOptions) -> str:
    """The `hyperadalora experiment` command that reproduces ``opts`` (every option that was set)."""
    parts = ["hyperadalora", "experiment", name]
    defaults = ExperimentOptions()
    for f in dataclasses.fields(ExperimentOptions):
        if f.name == "name":
            continue
        v = getattr(opts, f.name)
        if v == getattr(defaults, f.name) or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag)
        elif f.name == "data_path":
            parts += [flag, *map(str, v)]
        elif f.name == "variant":  # repeatable: one flag per variant (each holds commas of its own)
            parts += [p for spec in v for p in (flag, str(spec))]
        elif isinstance(v, list):  # one seed as "5," (a bare "5" would mean seeds 0..4)
            parts += [flag, ",".join(map(str, v)) + ("," if f.name == "seeds" and len(v) == 1 else "")]
        else:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)
