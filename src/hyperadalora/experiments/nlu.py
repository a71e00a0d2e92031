"""``nlu-convergence`` (the paper's Figure 2): training-loss curves of AdaLoRA and HyperAdaLoRA on GLUE.

For each task (RTE, WNLI, SST-2, and MNLI when its files are under --data-dir), both methods train with the
same seeds, data order, base-model hyperparameters, budget schedule and step count: only ``args.method``
differs. Per task: the raw and smoothed training task loss of both methods in one plot, dev accuracy at
checkpoints (every steps/4), steps-to-target (the first step at which a method's smoothed training task loss
reaches AdaLoRA's final smoothed loss), the ratio HyperAdaLoRA / AdaLoRA, and the same in training wall-clock;
with --seeds K: seeds 0..K-1, the mean, std and min-max of every number.
"""

from __future__ import annotations

import os

from .convergence import convergence, curves, eval_points, loss_per_epoch, primary_metric
from .goal import CLASSIFICATION_BOUND, goal_check, goal_section
from .options import as_options
from .plots import plot_eval_points, plot_gap_bands, plot_loss_bands, seeds_note
from .report import (convergence_table, curves_json, epoch_section, fmt_stat, gap_note, markdown_table, report_header,
                     settings_of, write_outputs)
from .runs import SUMMARY_KEYS, base_args, run_index, run_variants
from .task_setup import available_tasks, experiment_setup, output_dir

NAME = "nlu-convergence"
TASKS = ("rte", "wnli", "sst2", "mnli")
DEFAULTS = dict(steps=200, batch_size=16, lr=3e-3, max_length=64, max_eval_examples=300, seeds=1)
METHODS = {"adalora": {"method": "adalora"}, "hyperadalora": {"method": "hyperadalora"}}

FULL_SIZE = """\
## Full-size run (the paper's setting)

The paper trains RoBERTa-base and DeBERTa-v3-base on MNLI, RTE and WNLI with batch 64, lr 1e-5, r = 3
(init_r 3, target_r 2 here), gamma 0.1, for thousands of steps. On a GPU, with the GLUE TSV files (MNLI's
`MNLI/train.tsv` and `MNLI/dev_matched.tsv` included) and a local copy of the model:

```
hyperadalora experiment nlu-convergence --model /path/to/roberta-base --data-dir /path/to/glue \\
    --tasks mnli,rte,wnli,sst2 --steps 5000 --batch-size 64 --lr 1e-5 --max-length 256 --seeds 3 \\
    --max-eval-examples 10000 --device cuda --output-dir runs/experiments/nlu-convergence-full
```

(DeBERTa-v3-base: `--model /path/to/deberta-v3-base`.) At lr 1e-5 the adapters move slowly: compare the
curves over the same number of steps, and check that the default budget schedule (tinit = 10 %, tfinal = 20 %
of the steps, deltaT = 10) fits the run length.
"""


def run_nlu_convergence(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    data_dir, todo, skipped = available_tasks(opts, TASKS)
    steps, seeds, window, command, env = experiment_setup(opts, NAME, DEFAULTS)
    results = {"experiment": NAME, "command": command, "env": env, "data_dir": data_dir, "seeds": seeds,
               "window": window, "skipped": skipped, "tasks": {}}
    sections, summary_rows, goals = [], [], {}
    for task in todo:
        base = base_args(opts, method="adalora", task=task, data_dir=data_dir, max_steps=steps,
                         batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"], max_length=DEFAULTS["max_length"],
                         eval_every=max(1, steps // 4), max_eval_examples=DEFAULTS["max_eval_examples"])
        runs = run_variants(base, METHODS, os.path.join(out, task), seeds, reuse=opts.reuse)
        conv = convergence(runs, window, reference="adalora")
        metric = primary_metric(runs[seeds[0]]["adalora"]["summary"]["final_eval"]) or "accuracy"
        metric_keys = [k for k in ("accuracy", "f1", "matthews") if f"dev_{k}" in conv["methods"]["adalora"]]
        # dev metric at each checkpoint: stats over seeds
        dev = {label: eval_points(runs, label, metric) for label in METHODS}
        series = {label: curves(runs, label) for label in METHODS}
        marks = {label: conv["methods"][label]["steps_to_target"]["mean"] for label in METHODS}
        target = conv["target_loss"]["mean"]
        note = seeds_note(seeds)
        loss_png = plot_loss_bands(series, os.path.join(out, f"loss_{task}.png"),
                                   f"{task}: training task loss ({steps} steps{note})", window, target, marks)
        gap_png = plot_gap_bands(series, "adalora", os.path.join(out, f"gap_{task}.png"),
                                 f"{task}: HyperAdaLoRA's loss minus AdaLoRA's, same batches{note}", window)
        dev_png = plot_eval_points(dev, os.path.join(out, f"dev_{task}.png"),
                                   f"{task}: dev {metric} at checkpoints{note}", f"dev {metric}")
        goals[task] = goal_check(conv, "hyperadalora", {metric: CLASSIFICATION_BOUND})
        per_epoch = loss_per_epoch(runs, METHODS, "adalora")
        results["tasks"][task] = {
            "args": base, "metric": metric, "convergence": conv, "goal_check": goals[task],
            "dev_at_checkpoints": dev, "loss_per_epoch": per_epoch,
            "plots": [os.path.basename(loss_png), os.path.basename(gap_png), os.path.basename(dev_png)],
            "curves": curves_json(series), "runs": run_index(runs, SUMMARY_KEYS + ("rank_pattern",), nested=True),
        }
        h, a = conv["methods"]["hyperadalora"], conv["methods"]["adalora"]
        summary_rows.append([task, fmt_stat(conv["target_loss"]), fmt_stat(a["steps_to_target"], "{:.1f}"),
                             fmt_stat(h["steps_to_target"], "{:.1f}"), fmt_stat(h["steps_ratio"], "{:.2f}"),
                             fmt_stat(h["time_ratio"], "{:.2f}"), fmt_stat(h.get("steps_ratio_90"), "{:.2f}"),
                             fmt_stat(h.get("loss_gap"), "{:.4f}"), fmt_stat(h.get("steps_below"), "{:.2f}"),
                             fmt_stat(a.get(f"dev_{metric}")),
                             fmt_stat(h.get(f"dev_{metric}"))])
        steps_list = sorted(set(dev["adalora"]) | set(dev["hyperadalora"]))
        dev_table = markdown_table(["step"] + list(METHODS),
                                   [[s] + [fmt_stat(dev[label].get(s)) for label in METHODS] for s in steps_list])
        sections += [f"## {task}", "",
                     f"Target: AdaLoRA's final smoothed training task loss (trailing mean over {window} steps) = "
                     f"{fmt_stat(conv['target_loss'])}.", "",
                     convergence_table(conv, metric_keys), "",
                     *epoch_section(per_epoch, METHODS, "adalora"),
                     f"Dev {metric} at checkpoints (step {steps} = the end of training):", "", dev_table, "",
                     f"![{task} loss]({os.path.basename(loss_png)})", "",
                     f"![{task} loss gap]({os.path.basename(gap_png)})", "",
                     f"![{task} dev]({os.path.basename(dev_png)})",
                     ""]
    settings = settings_of(base, "model", "max_steps", "batch_size", "lr", "max_length", "init_r", "target_r", "tinit",
                           "tfinal", "deltaT", "orth_reg_weight", "eval_every", "max_train_examples",
                           "max_eval_examples")
    settings.update({"tasks": ", ".join(todo), "seeds": ", ".join(map(str, seeds)), "data dir": data_dir,
                     "smoothing window": window})
    lines = report_header("NLU convergence: AdaLoRA vs HyperAdaLoRA (paper Figure 2)", command, env, settings,
                          "Both methods: same seeds, data order, base-model hyperparameters, budget schedule and step "
                          "count; only the method differs. Numbers with several seeds: mean ± std [min, max]. "
                          "Steps ratio and time ratio: HyperAdaLoRA / AdaLoRA (< 1: HyperAdaLoRA reaches AdaLoRA's "
                          "final loss earlier); time = training time (steps only, no evaluation) from the end of "
                          "step 1 (a process's first step carries one-off costs that would fall on whichever method "
                          "runs first). \"90% of the drop\": the steps to come down 90% of the way from AdaLoRA's "
                          "initial smoothed loss to its final one (n/a where AdaLoRA's loss did not come down), a "
                          "check on the final-loss target when both curves end on a noisy plateau. " + gap_note(window))
    for task, why in skipped.items():
        lines += [f"- **{task} skipped**: {why}"]
    if skipped:
        lines.append("")
    lines += ["## Summary", "",
              markdown_table(["task", "target loss", "adalora steps to target", "hyperadalora steps to target",
                              "steps ratio (hyper/ada)", "time ratio (hyper/ada)",
                              "steps ratio at 90% of AdaLoRA's drop",
                              "loss gap to AdaLoRA, same batches", "steps below AdaLoRA's loss",
                              "adalora dev", "hyperadalora dev"],
                             summary_rows), "",
              *goal_section(goals, "final dev metric within 1 point")]
    lines += sections + [FULL_SIZE]
    return write_outputs(out, results, lines)


__all__ = ["run_nlu_convergence"]
