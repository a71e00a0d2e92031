"""``gamma`` (the paper's Table 2): the weight of the orthogonal regulariser, gamma in {0.1, 0.15, 0.2}.

HyperAdaLoRA with ``orth_reg_weight`` = each gamma, everything else equal (seeds, data order, schedule,
steps). Reported: the final dev metrics, the final smoothed training task loss (without the regulariser, so
comparable across gammas), the final orthogonal penalty, and convergence: steps to a common target, the
highest (worst) of the variants' final smoothed training task losses, which every variant reaches; ratios are
to gamma = 0.1 (the paper's default).
"""

from __future__ import annotations

import os

from ..plotting import smooth
from .convergence import convergence, curves, final_smoothed
from .options import as_options
from .plots import plot_loss_bands
from .report import (convergence_table, curves_json, fmt_stat, markdown_table, report_header, settings_of,
                     write_outputs)
from .runs import run_index, run_variants
from .stats import stats
from .task_setup import output_dir, single_task_setup

NAME = "gamma"
GAMMAS = (0.1, 0.15, 0.2)
DEFAULTS = dict(task="sst2", steps=200, batch_size=16, lr=3e-3, max_length=64, max_eval_examples=300, seeds=1)

FULL_SIZE = """\
## Full-size run (the paper's setting)

The paper tries gamma = 0.1, 0.15, 0.2 in its NLU setting (RoBERTa-base / DeBERTa-v3-base, batch 64,
lr 1e-5, r = 3). On a GPU:

```
hyperadalora experiment gamma --model /path/to/roberta-base --data-dir /path/to/glue --tasks rte \\
    --steps 5000 --batch-size 64 --lr 1e-5 --max-length 256 --seeds 3 --device cuda \\
    --output-dir runs/experiments/gamma-full
```
"""


def label_of(gamma: float) -> str:
    return f"gamma={gamma:g}"


def run_gamma(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    task, data_dir, steps, seeds, window, command, env, base = single_task_setup(opts, NAME, DEFAULTS,
                                                                                 method="hyperadalora")
    variants = {label_of(g): {"orth_reg_weight": g} for g in GAMMAS}
    runs = run_variants(base, variants, out, seeds, reuse=opts.reuse)
    reference = label_of(GAMMAS[0])
    conv = convergence(runs, window, reference=reference,
                       target_fn=lambda rs: max(final_smoothed(r["rows"], window) for r in rs.values()))
    metric_keys = [k for k in ("accuracy", "f1", "matthews") if f"dev_{k}" in conv["methods"][reference]]
    penalty = {}
    for label in variants:
        vals = []
        for rs in runs.values():
            p = [r["orth_penalty"] for r in rs[label]["rows"] if "orth_penalty" in r]
            vals.append(float(smooth(p, window)[-1]) if p else None)
        penalty[label] = stats(vals)
    series = {label: curves(runs, label) for label in variants}
    png = plot_loss_bands(series, os.path.join(out, "loss_curves.png"), f"gamma on {task} ({steps} steps)", window,
                          conv["target_loss"]["mean"], {k: conv["methods"][k]["steps_to_target"]["mean"] for k in variants})
    results = {"experiment": NAME, "command": command, "env": env, "task": task, "seeds": seeds, "window": window,
               "gammas": list(GAMMAS), "args": base, "convergence": conv, "final_orth_penalty": penalty,
               "plot": os.path.basename(png),
               "curves": curves_json(series),
               "runs": run_index(runs)}
    rows = [[label, *(fmt_stat(conv["methods"][label].get(f"dev_{k}")) for k in metric_keys),
             fmt_stat(conv["methods"][label]["final_smoothed_task_loss"]), fmt_stat(penalty[label], "{:.4g}"),
             fmt_stat(conv["methods"][label]["steps_to_target"], "{:.1f}"),
             fmt_stat(conv["methods"][label]["steps_ratio"], "{:.2f}")] for label in variants]
    settings = settings_of(base)
    settings.pop("orth_reg_weight", None)
    settings.update({"gammas (orth_reg_weight)": ", ".join(map(str, GAMMAS)), "seeds": ", ".join(map(str, seeds)),
                     "smoothing window": window, "data dir": data_dir})
    lines = report_header("Orthogonal-regulariser weight gamma (paper Table 2)", command, env, settings,
                          "HyperAdaLoRA only; the gammas differ, nothing else. The training loss here is the task "
                          "loss (without gamma * penalty).")
    lines += ["## Summary", "",
              f"Common target: the worst final smoothed training task loss of the variants = "
              f"{fmt_stat(conv['target_loss'])} (window {window}); steps ratio: to {reference}.", "",
              markdown_table(["gamma", *(f"dev {k}" for k in metric_keys), "final smoothed loss",
                              "final orth. penalty (smoothed)", "steps to common target", f"ratio to {reference}"],
                             rows), "",
              "## All convergence numbers", "", convergence_table(conv, metric_keys), "",
              "![loss curves](loss_curves.png)", "", FULL_SIZE]
    return write_outputs(out, results, lines)
