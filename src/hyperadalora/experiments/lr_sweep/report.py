"""The lr sweep's report: per task, its plots (`plot_score_vs_lr`, `plot_best_curves`) and its section
(`task_section`: the five items of the analysis and the verdict); how to run the full-size sweep (`FULL_SIZE`)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ...plotting import pyplot
from ..plots import save_line_plot
from ..report import fmt, fmt_ci, fmt_interval, markdown_table
from .analysis import score_at
from .design import ADVANTAGE_RATIO, ADVANTAGE_WINDOW, LABELS, METHODS, SweepTask

def plot_score_vs_lr(spec: SweepTask, analysis: dict, path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    final = str(analysis["final_step"])
    for i, m in enumerate(METHODS):
        per_lr = analysis["score_vs_lr"][m]
        lrs = sorted(per_lr, key=float)
        if not lrs:
            continue
        x = np.asarray([float(v) for v in lrs])
        st = [per_lr[v][final] for v in lrs]
        ok = [s["mean"] is not None for s in st]
        x, st = x[ok], [s for s, k in zip(st, ok) if k]
        mean = np.asarray([s["mean"] for s in st])
        lo = np.asarray([s["ci95"][0] if s["ci95"] else s["mean"] for s in st])
        hi = np.asarray([s["ci95"][1] if s["ci95"] else s["mean"] for s in st])
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], color=f"C{i}", marker="o", capsize=3, label=LABELS[m])
    s = analysis.get("shift", {}).get("s_of_means")
    ada = analysis["score_vs_lr"]["adalora"]
    if s and ada:
        lrs = sorted(ada, key=float)
        ys = [ada[v][final]["mean"] for v in lrs]
        xs = [float(v) / s for v in lrs]
        ax.plot(xs, ys, color="C0", linestyle=":", label=f"AdaLoRA shifted: its score at lr plotted at lr / {s:.2f}")
    means = [st["mean"] for m in METHODS for per in analysis["score_vs_lr"][m].values()
             for st in [per.get(final, {})] if st.get("mean") is not None]
    if means:  # intervals of 2 seeds can span far beyond the scores: the axis follows the means
        pad = 0.1 * (max(means) - min(means)) + 0.02
        lo, hi = min(means) - pad, max(means) + pad
        ax.set_ylim(max(lo, 0.0) if spec.higher_is_better else lo, min(hi, 1.0) if spec.higher_is_better else hi)
    ax.set_xscale("log")
    return save_line_plot(fig, ax, path, "learning rate",
                          "dev accuracy" if spec.higher_is_better else "dev loss (mean per example)",
                          f"{spec.name}: dev score after {spec.steps} steps, mean and 95% interval over seeds")


def plot_best_curves(spec: SweepTask, grid_cells: list, analysis: dict, path: str) -> Optional[str]:
    bvb = analysis["best_vs_best"].get(str(analysis["final_step"]))
    if not bvb:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, m in enumerate(METHODS):
        lr = bvb["chosen_lr"][m]
        cells = [c for c in grid_cells if c["method"] == m and c["lr"] == lr]
        if not cells:
            continue
        steps = sorted({e["step"] for c in cells for e in c["evals"]})
        vals = np.asarray([[score_at(c, s, "score_b") for s in steps] for c in cells], float)
        mean = np.nanmean(vals, 0)
        ax.plot(steps, mean, color=f"C{i}", marker="o", label=f"{LABELS[m]} at lr {lr:g} ({len(cells)} seeds)")
        if len(cells) > 1:
            ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=f"C{i}", alpha=0.15)
    if analysis.get("speed"):
        ax.axhline(analysis["speed"]["target"], color="gray", linestyle="--", linewidth=1, label="common target")
    return save_line_plot(fig, ax, path, "optimizer step",
                          ("dev accuracy" if spec.higher_is_better else "dev loss") + " on half B",
                          f"{spec.name}: each method at its lr chosen on half A (min-max band over seeds)")


def scaled(iv: Optional[dict], scale: float) -> Optional[dict]:
    """An `interval_of` result with its mean and interval multiplied by ``scale`` (e.g. accuracy in points)."""
    if not iv or iv["mean"] is None:
        return iv
    return {**iv, "mean": iv["mean"] * scale, "ci95": [v * scale for v in iv["ci95"]] if iv["ci95"] else None}


def task_section(spec: SweepTask, a: dict, lrs: list, seeds: list, plots: list) -> list[str]:
    """The report's section of one task: its verdict, then the five items of `analysis.analyse` and its plots."""
    unit = "accuracy points" if spec.higher_is_better else "dev loss"
    scale = 100.0 if spec.higher_is_better else 1.0  # accuracy differences in points
    f, df = "{:.4f}", "{:+.2f}" if scale > 1 else "{:+.4f}"
    lines = [f"## {spec.name}", "",
             f"**Verdict: {a['verdict']}** ({a['why']}).", ""]
    if a.get("missing"):
        lines += [f"Cells still to run ({len(a['missing'])}): " + ", ".join(a["missing"][:40])
                  + (" ..." if len(a["missing"]) > 40 else ""), ""]
    if "score_vs_lr" not in a:
        return lines
    final = str(a["final_step"])
    lines += [f"### 1. Dev score vs learning rate after {spec.steps} steps (mean [95% interval] (seeds))", "",
              markdown_table(["lr"] + [LABELS[m] for m in METHODS],
                             [[f"{lr:g}"] + [fmt_ci(a["score_vs_lr"][m].get(f"{lr:g}", {}).get(final, {})
                                                    .get("values", []))
                                             for m in METHODS] for lr in lrs]), ""]
    lines += ["Best lr on the whole dev set: " + ", ".join(
        f"{LABELS[m]} {fmt(a['bracketing'][m]['best_lr'], '{:g}')}"
        + ("" if a["bracketing"][m]["bracketed"] else " (**not bracketed**)") for m in METHODS) + ".", ""]
    lines += ["### 2. Best against best (lr chosen on dev half A, scored on half B)", "",
              "HyperAdaLoRA - AdaLoRA, paired by seed, in " + unit + " (positive = HyperAdaLoRA better); at every "
              "budget (the verdict reads the last):", ""]
    rows = []
    for step in a["budgets"]:
        b, r = a["best_vs_best"][str(step)], a["best_vs_best_reverse"][str(step)]
        rows.append([step, " / ".join(fmt(b["chosen_lr"][m], "{:g}") for m in METHODS),
                     fmt_ci(b["scores"]["adalora"]["values"], f), fmt_ci(b["scores"]["hyperadalora"]["values"], f),
                     fmt_ci(b["scores"]["lora"]["values"], f),
                     fmt_interval(scaled(b["diff_hyper_minus_ada"], scale), df),
                     fmt_interval(scaled(r["diff_hyper_minus_ada"], scale), df)])
    lines += [markdown_table(["step", "chosen lr (AdaLoRA / HyperAdaLoRA / LoRA)", "AdaLoRA on B", "HyperAdaLoRA on B",
                              "LoRA on B", "difference (a)", "reverse split (chosen on B, scored on A)"], rows), ""]
    last = a["best_vs_best"][final]
    if last.get("diff_lora_minus_ada"):
        lines += [f"LoRA, the anchor, at its own chosen lr (step {spec.steps}, half B, paired by seed, positive = LoRA "
                  f"better): LoRA - AdaLoRA {fmt_interval(scaled(last['diff_lora_minus_ada'], scale), df)}, LoRA - "
                  f"HyperAdaLoRA {fmt_interval(scaled(last['diff_lora_minus_hyper'], scale), df)} ({unit}).", ""]
    lines += [f"### 3. The good-lr window (decades of lr within {spec.tolerance:g} of the method's own best, "
              f"whole dev set, step {spec.steps})", "",
              markdown_table(["method", "decades", "from", "to"],
                             [[LABELS[m], fmt(w["decades"], "{:.2f}") + (" (at least: reaches the grid's end)"
                                                                       if w["censored"] else ""),
                               fmt(w["lo"], "{:.2g}"), fmt(w["hi"], "{:.2g}")]
                              for m, w in a["window"].items()]), "",
              f"HyperAdaLoRA / AdaLoRA: {fmt(a['window_ratio'], '{:.2f}')} (rule (b): >= {ADVANTAGE_WINDOW}).", ""]
    sp = a.get("speed")
    if sp:
        rows = [[s, fmt(p["adalora_steps"], "{:.0f}", "never"), fmt(p["hyperadalora_steps"], "{:.0f}", "never"),
                 fmt(p["ratio"], "{:.2f}"), fmt(p["auc_diff"] * scale, df)]
                for s, p in sp["per_seed"].items()]
        lines += ["### 4. Speed at each method's chosen lr (half B)", "",
                  f"Common target: the worse of the two methods' final half-B means, relaxed by the tolerance: "
                  f"{sp['target']:.4f}. Steps interpolated between evaluations (every {spec.eval_every}).", "",
                  markdown_table(["seed", "AdaLoRA steps", "HyperAdaLoRA steps", "ratio",
                                  "area under the dev curve, difference"], rows), "",
                  f"Ratio HyperAdaLoRA / AdaLoRA: {fmt_interval(sp['ratio'], '{:.2f}')}; seeds that never reach the "
                  f"target: AdaLoRA {sp['missed']['adalora']}, HyperAdaLoRA {sp['missed']['hyperadalora']} (rule (c): "
                  f"< {ADVANTAGE_RATIO} with the interval below 1, every seed reaching it). Area under the dev-score "
                  f"curve, HyperAdaLoRA - AdaLoRA ({unit}; positive = better): "
                  f"{fmt_interval(scaled(sp['auc_diff'], scale), df)}.", ""]
    sh, pk = a["shift"], a["peaks"]
    lines += ["### 5. The shift: HyperAdaLoRA(lr) ~ AdaLoRA(s * lr)", "",
              f"s fitted per seed (least squares over the grid at step {spec.steps}): "
              + ", ".join(fmt(None if v is None else 10 ** v, "{:.2f}") for v in sh["log10_s_per_seed"])
              + f"; geometric mean {fmt(sh['s'], '{:.2f}')}"
              + (f" [95% interval {sh['s_ci95'][0]:.2f}, {sh['s_ci95'][1]:.2f}]" if sh["s_ci95"] else "")
              + f"; on the mean curves {fmt(sh['s_of_means'], '{:.2f}')}. Peaks (each method at its best lr on the "
              f"whole dev set, in-sample): HyperAdaLoRA - AdaLoRA "
              f"{fmt_interval(scaled(pk['diff_hyper_minus_ada'], scale), df)}"
              f" {unit}.", ""]
    if a.get("robustness"):
        lines += robustness_section(spec, a["robustness"])
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots if p] + [""]
    return lines


def robustness_section(spec: SweepTask, rb: dict) -> list[str]:
    """How firmly rule (b) holds (`analysis.robustness`): against the tolerance, the seeds and the budget, and which
    end of the window widens. Reported beside the verdict; the verdict is the rule's, at the pre-registered
    tolerance."""
    def row(label, r):
        wh, wa = r["hyperadalora"], r["adalora"]
        return [label, fmt(wh["decades"], "{:.2f}") + ("+" if wh["censored"] else ""),
                fmt(wa["decades"], "{:.2f}") + ("+" if wa["censored"] else ""), fmt(r["ratio"], "{:.2f}"),
                "holds" if r["holds"] else "fails"]

    head = ["", "HyperAdaLoRA window (decades)", "AdaLoRA window", "ratio", f"rule (b) (>= {ADVANTAGE_WINDOW})"]
    held = ", ".join(f"{lo:.4g} to {hi:.4g}" for lo, hi in rb["holds_for_tolerance"]) or "nowhere"
    lines = ["### 6. How firmly rule (b) holds (beside the verdict, not part of the rule)", "",
             "A + marks a window that reaches an end of the grid (a lower bound).", "",
             f"**Against the tolerance** (pre-registered: {spec.tolerance:g}):", "",
             markdown_table(["tolerance"] + head[1:], [row(f"{r['tolerance']:.4g}", r) for r in rb["by_tolerance"]]),
             "", f"Scanned from {rb['scan']['from']:.4g} to {rb['scan']['to']:.4g} ({rb['scan']['points']} "
             f"tolerances): the rule holds for tolerances {held}.", ""]
    if rb["leave_one_seed_out"]:
        lines += ["**Each seed left out, and each seed alone** (at the pre-registered tolerance):", "",
                  markdown_table(["seeds"] + head[1:],
                                 [row(f"without seed {s}", r) for s, r in rb["leave_one_seed_out"].items()]
                                 + [row(f"seed {s} alone", r) for s, r in rb["single_seed"].items()
                                    if len(rb["single_seed"]) > 2]), ""]  # with 2 seeds: the rows above
    lines += ["**At every budget** (the rule reads the last):", "",
              markdown_table(["step"] + head[1:], [row(step, r) for step, r in rb["by_budget"].items()]), ""]
    sd = rb.get("sides")
    if sd:
        censored = "; HyperAdaLoRA's window reaches an end of the grid" if sd["hyperadalora_censored"] else ""
        lines += [f"**Which end widens**: HyperAdaLoRA's window reaches {sd['low_end_decades']:+.2f} decades beyond "
                  f"AdaLoRA's at the small-lr end and {sd['high_end_decades']:+.2f} at the large-lr end (positive = "
                  f"wider on that side{censored}).", ""]
    return lines


FULL_SIZE = """\
## Full-size run (the paper's setting)

On a GPU, with local copies of the paper's models and data (e.g. RoBERTa-base on GLUE, LLaMA-3.1-8B on Alpaca), the same
grid and rule apply; only the run length and the models change:

```
hyperadalora experiment lr-sweep --tasks sst2 --model /path/to/roberta-base --data-dir /path/to/glue \\
    --steps 3000 --lrs 1e-5,3e-5,1e-4,3e-4,1e-3,3e-3 --seeds 3 --device cuda --output-dir runs/experiments/lr-sweep-full
hyperadalora experiment lr-sweep --tasks alpaca --model /path/to/Llama-3.1-8B --data-path /path/to/alpaca_data.json \\
    --steps 2000 --lrs 3e-6,1e-5,3e-5,1e-4,3e-4 --seeds 2 --device cuda --output-dir runs/experiments/lr-sweep-full
```

Run two or more such processes side by side with `--reuse`: each claims the cells that no live process holds.
"""
