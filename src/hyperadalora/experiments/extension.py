"""``extension``: does generating the adapter by hypernetworks help other LoRA-family methods?

Three pairs, each a base method and its hypernetwork variant: peft's ``lora`` vs ``hyperlora``, peft's LoRA with
``use_dora=True`` (``dora``) vs ``hyperdora``, and ``hydralora`` vs ``hyperhydralora`` (A and the B heads generated,
routers trained), on RTE and SST-2. Every run has the same seeds, data order, rank (``init_r``), alpha, learning
rate and step count; only ``--method`` differs. Per task and pair: the training-loss curves of both, steps-to-target
(the first step at which a method's smoothed training task loss reaches the base method's final smoothed loss),
the ratio variant / base, the same in training time, and the final dev accuracy; the trainable parameter counts.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .. import training as train_lib
from ..data import get_task
from ..base_models import load_model_and_tokenizer
from ..plotting import pyplot, save_figure
from .convergence import convergence, curves, primary_metric
from .options import as_options
from .plots import plot_loss_bands, seeds_note
from .report import (convergence_table, curves_json, fmt_stat, gap_note, markdown_table, report_header, settings_of,
                     write_outputs)
from .runs import SUMMARY_KEYS, base_args, run_index, run_variants
from .task_setup import available_tasks, experiment_setup, output_dir

NAME = "extension"
TASKS = ("rte", "sst2")
PAIRS = (("lora", "hyperlora"), ("dora", "hyperdora"), ("hydralora", "hyperhydralora"))
DEFAULTS = dict(steps=80, batch_size=16, lr=1e-3, max_length=64, max_eval_examples=200, seeds=1)

FULL_SIZE = """\
## Full-size run

The default is sized for 2 CPU cores (MiniLM, {steps} steps, batch {batch_size}, max_length {max_length}, one seed):
it says whether each hypernetwork variant trains and how its early loss compares, not which method wins. A
comparison worth reading uses several seeds, more steps and the whole dev sets, on a GPU:

```
hyperadalora experiment extension --model /path/to/roberta-base --data-dir /path/to/glue --tasks rte,sst2 \\
    --steps 2000 --batch-size 32 --lr 5e-4 --max-length 128 --seeds 3 --max-eval-examples 10000 \\
    --eval-every 250 --device cuda --output-dir runs/experiments/extension-full
```

Each method's learning rate deserves its own sweep (the hypernetwork variants have a `hypernet_lr_ratio`, see
`hyperadalora train --help`); here all methods share one learning rate so that only the method differs.
"""


def count_parameters(base, methods: list[str]) -> dict:
    """{method: {"trainable", "hypernetworks", "other"}} of each method's adapter model on a fresh base model."""
    spec = get_task(base.task)
    counts = {}
    for method in methods:
        model, _, _ = load_model_and_tokenizer(base.model, spec.kind, num_labels=max(spec.num_labels, 2))
        args = dataclasses.replace(base, method=method)
        wrapped, _ = train_lib.build_adapter_model(args, model, "SEQ_CLS")
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        hyper = sum(p.numel() for p in getattr(wrapped, "hypernetwork_parameters", lambda: [])())
        counts[method] = {"trainable": trainable, "hypernetworks": hyper, "other": trainable - hyper}
    return counts


def plot_dev(summary: dict, metric: str, path: str, title: str) -> str:
    """Grouped bars: dev metric of base and variant, per task and pair."""
    plt = pyplot()
    labels, base_vals, hyper_vals = [], [], []
    for (task, pair), row in summary.items():
        labels.append(f"{task}\n{pair[0]} / {pair[1]}")
        base_vals.append(row["base"] if row["base"] is not None else np.nan)
        hyper_vals.append(row["hyper"] if row["hyper"] is not None else np.nan)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.2), dpi=110)
    ax.bar(x - 0.2, base_vals, 0.4, label="base method")
    ax.bar(x + 0.2, hyper_vals, 0.4, label="hypernetwork variant")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"final dev {metric}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def run_extension(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    data_dir, todo, skipped = available_tasks(opts, TASKS)
    steps, seeds, window, command, env = experiment_setup(opts, NAME, DEFAULTS)
    methods = [m for pair in PAIRS for m in pair]
    results = {"experiment": NAME, "command": command, "env": env, "data_dir": data_dir, "seeds": seeds,
               "window": window, "skipped": skipped, "pairs": [list(p) for p in PAIRS], "tasks": {}}
    sections, summary_rows, dev_summary = [], [], {}
    metric = "accuracy"
    base = None
    for task in todo:
        base = base_args(opts, method="lora", task=task, data_dir=data_dir, max_steps=steps,
                         batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"], max_length=DEFAULTS["max_length"],
                         max_eval_examples=DEFAULTS["max_eval_examples"])
        runs = run_variants(base, {m: {"method": m} for m in methods}, os.path.join(out, task), seeds,
                            reuse=opts.reuse)
        metric = primary_metric(runs[seeds[0]]["lora"]["summary"]["final_eval"]) or "accuracy"
        task_result = {"args": base, "metric": metric, "pairs": {}}
        sections += [f"## {task}", ""]
        for b, h in PAIRS:
            sub = {seed: {b: rs[b], h: rs[h]} for seed, rs in runs.items()}
            conv = convergence(sub, window, reference=b)
            series = {label: curves(sub, label) for label in (b, h)}
            marks = {label: conv["methods"][label]["steps_to_target"]["mean"] for label in (b, h)}
            note = seeds_note(seeds)
            png = plot_loss_bands(series, os.path.join(out, f"loss_{task}_{b}.png"),
                                  f"{task}: {b} vs {h}, training task loss ({steps} steps{note})", window,
                                  conv["target_loss"]["mean"], marks)
            mb, mh = conv["methods"][b], conv["methods"][h]
            task_result["pairs"][f"{b}/{h}"] = {
                "convergence": conv, "plot": os.path.basename(png),
                "curves": curves_json(series), "runs": run_index(sub, SUMMARY_KEYS, nested=True),
            }
            # a ratio to the base's final loss measures speed only where the base's loss came down beyond its noise
            # (`drop_target`); on a flat curve it is noise
            flat = all(p["target_90"] is None for p in conv["per_seed"].values())

            def ratio(stat) -> str:
                return "not measurable (the base's loss did not come down)" if flat else fmt_stat(stat, "{:.2f}")

            summary_rows.append([task, f"{b} / {h}", fmt_stat(conv["target_loss"]),
                                 fmt_stat(mb["steps_to_target"], "{:.1f}"), fmt_stat(mh["steps_to_target"], "{:.1f}"),
                                 ratio(mh["steps_ratio"]), ratio(mh["time_ratio"]), fmt_stat(mh.get("loss_gap")),
                                 fmt_stat(mb.get(f"dev_{metric}")), fmt_stat(mh.get(f"dev_{metric}"))])
            dev_summary[(task, (b, h))] = {"base": (mb.get(f"dev_{metric}") or {}).get("mean"),
                                           "hyper": (mh.get(f"dev_{metric}") or {}).get("mean")}
            sections += [f"### {b} vs {h}", "",
                         f"Target: {b}'s final smoothed training task loss (trailing mean over {window} steps) = "
                         f"{fmt_stat(conv['target_loss'])}.", "",
                         convergence_table(conv, [metric]), "", f"![{task} {b} vs {h}]({os.path.basename(png)})", ""]
        results["tasks"][task] = task_result
    counts = count_parameters(base, methods)
    results["parameters"] = counts
    plot_dev(dev_summary, metric, os.path.join(out, "dev_accuracy.png"),
             f"final dev {metric}: base method vs hypernetwork variant ({steps} steps)")
    results["plots"] = ["dev_accuracy.png"] + [p["plot"] for t in results["tasks"].values()
                                               for p in t["pairs"].values()]
    settings = settings_of(base, "model", "max_steps", "batch_size", "lr", "max_length", "init_r", "lora_alpha",
                           "n_heads", "eval_every", "max_train_examples", "max_eval_examples")
    settings.update({"tasks": ", ".join(todo), "seeds": ", ".join(map(str, seeds)), "data dir": data_dir,
                     "smoothing window": window})
    settings.pop("HyperAdaLoRA options", None)
    settings["hypernetwork options"] = base.hyper or "library defaults (HyperAdaLoraConfig's)"
    lines = report_header(
        "Extension: hypernetwork-generated LoRA, DoRA and HydraLoRA vs their base methods", command, env, settings,
        "Pairs: peft `lora` vs `hyperlora` (A, B generated), peft LoRA `use_dora=True` (`dora`) vs `hyperdora` (A, B "
        "generated, magnitude trained), `hydralora` (shared A, N B heads, token-wise router, all trained) vs "
        "`hyperhydralora` (A and the heads generated, router trained). Same seeds, data order, rank, alpha, learning "
        "rate and steps for all; only the method differs. Steps ratio and time ratio: variant / base (< 1: the "
        "variant reaches the base method's final training loss earlier; n/a: it does not reach it; not measurable: "
        "the base method's loss did not come down beyond its noise on any seed, so the ratio would be noise); time = "
        "training time (steps only, no evaluation) from the end of step 1. " + gap_note(window, "the base method")
        + " Several seeds: mean ± std [min, max].")
    for task, why in skipped.items():
        lines += [f"- **{task} skipped**: {why}"]
    if skipped:
        lines.append("")
    param_rows = [[m, f"{c['trainable']:,}", f"{c['hypernetworks']:,}", f"{c['other']:,}"] for m, c in counts.items()]
    lines += ["## Summary", "",
              markdown_table(["task", "base / variant", "target loss", "base steps to target",
                              "variant steps to target", "steps ratio (variant/base)", "time ratio (variant/base)",
                              "loss gap to the base, same batches", f"base dev {metric}", f"variant dev {metric}"],
                             summary_rows), "",
              f"![dev {metric}](dev_accuracy.png)", "",
              "Trainable parameters (the classifier head included):", "",
              markdown_table(["method", "trainable", "in hypernetworks", "trained directly (adapters + head)"],
                             param_rows), ""]
    lines += sections + [FULL_SIZE.format(steps=DEFAULTS["steps"], batch_size=DEFAULTS["batch_size"],
                                          max_length=DEFAULTS["max_length"])]
    return write_outputs(out, results, lines)


__all__ = ["run_extension"]
