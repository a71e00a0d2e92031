"""Training runs of the experiments: the base arguments from the options (`base_args`), one run (`train_run`), every
variant for every seed (`run_variants`), reuse of finished runs (``--reuse``: `same_args`), where the runs are
(`run_index`), and the wrapped models of the runs (`AdapterRecorder`).

Each run writes a sub-directory of the experiment's output directory (``metrics.jsonl``, ``summary.json``, as written
by `training.train`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from .. import training as train_lib
from ..training import TrainArgs, read_metrics
from .options import ExperimentOptions


REPO_ROOT = Path(__file__).resolve().parents[3]
# the data folder beside the checkout (``../shared``): where the experiments' default data lives
SHARED_ROOT = REPO_ROOT.parent / "shared"
DATA_LOCATION_ARGS = ("data_dir", "data_path")


def same_data_location(saved: Optional[str], current: Optional[str]) -> bool:
    """Whether a run's recorded data path names the current one: the same path, or the same place in the shared
    folder beside the checkout (``../shared/...``) recorded from a checkout that sat elsewhere (a CI clone, another
    machine). Any other path must be equal."""
    if saved == current:
        return True
    if saved is None or current is None:
        return False
    try:
        rel = Path(current).resolve().relative_to(SHARED_ROOT)
    except ValueError:
        return False
    tail = (SHARED_ROOT.name,) + rel.parts
    return Path(saved).parts[-len(tail):] == tail


class AdapterRecorder:
    """An adapter builder for `training.train` (``build_adapter=``) that keeps every wrapped model it builds in
    ``built``, in order: an ``on_step`` callback inspects the current run's model as ``built[-1]``."""

    def __init__(self):
        self.built: list = []

    def __call__(self, args: TrainArgs, model, task_type: str):
        wrapped, allocate = train_lib.build_adapter_model(args, model, task_type)
        self.built.append(wrapped)
        return wrapped, allocate


def same_args(summary: dict, args: TrainArgs) -> bool:
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
    if not all(same_data_location(saved.get(k, defaults.get(k)), current[k]) for k in DATA_LOCATION_ARGS):
        return False
    return all(saved.get(k, defaults.get(k)) == v for k, v in current.items()
               if k not in free and k != "hyper" and k not in DATA_LOCATION_ARGS)


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
        if same_args(summary, args) and os.path.isfile(summary.get("metrics", "")):
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
                 keep_model: bool = False, on_step_factory: Optional[Callable] = None,
                 build_adapter: Optional[Callable] = None) -> dict:
    """Train every variant ({label: TrainArgs overrides}) for every seed: {seed: {label: run}}.

    An override ``lr_scale`` sets the variant's learning rate to ``base.lr * lr_scale``.

    Runs go to ``out_dir/seed<k>/<label>``. Everything but the overrides and the seed is ``base``.
    ``on_step_factory(label, seed)`` -> on_step callback, or None. ``build_adapter``: `training.train`'s adapter
    builder (e.g. an `AdapterRecorder`).
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
            extra = {"build_adapter": build_adapter} if build_adapter is not None else {}
            run = train_run(args, reuse=reuse, on_step=cb, keep_model=keep_model, **extra)
            run["args"] = args
            results[seed][label] = run
    return results


SUMMARY_KEYS = ("final_eval", "train_time_s", "wall_time_s", "median_step_s", "total_rank", "nonfinite_steps")


def run_index(runs_by_seed: dict, keys: Iterable[str] = ("final_eval", "train_time_s"), nested: bool = False) -> dict:
    """{seed: {label: {output_dir, summary values}}}: where each run is and its headline numbers (results.json);
    ``nested``: the summary values under a ``summary`` key."""
    def entry(run: dict) -> dict:
        values = {k: run["summary"].get(k) for k in keys}
        return {"output_dir": run["args"].output_dir, **({"summary": values} if nested else values)}

    return {str(seed): {label: entry(r) for label, r in runs.items()} for seed, runs in runs_by_seed.items()}
