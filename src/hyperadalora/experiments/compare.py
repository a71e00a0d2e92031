"""Side-by-side comparison of methods (`compare`, behind ``hyperadalora demo``): each method trains in turn with
`training.train`, then ``report.md`` (a table), ``results.json`` (every number of the report) and ``loss_curves.png``
are written to the output directory.

Steps-to-target: the first step at which a method's smoothed training (task) loss reaches the reference method's
final smoothed loss; the ratio of a method to the reference and the wall-clock time to that step
(`convergence.steps_to_target`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from ..plotting import plot_loss_curves
from ..training import TrainArgs, read_metrics, train
from .convergence import SMOOTH_WINDOW, convergence
from .report import fmt


def summarize(runs: dict, reference: str, window: int = SMOOTH_WINDOW) -> dict:
    """runs: {label: {"rows": [...], "summary": {...}}} (one seed) -> per-label numbers relative to ``reference``:
    `convergence` of that one seed (steps and time to the reference's final smoothed loss, to 90% of its
    drop, their ratios), with each run's ``final_eval`` dict."""
    one = convergence({"single": runs}, window, reference)["per_seed"]["single"]
    methods = {label: {**{k: v for k, v in m.items() if not k.startswith("dev_")},
                       "final_eval": runs[label]["summary"].get("final_eval") or {}}
               for label, m in one["methods"].items()}
    return {"target_loss": one["target_loss"], "target_90": one["target_90"], "reference": reference,
            "window": window, "methods": methods}


def format_table(result: dict) -> str:
    """The Markdown table of a `summarize` / `compare` result, one row per method."""
    lines = ["| method | final smoothed loss | steps to target | steps ratio | time to target (s) | time ratio "
             "| steps to 90% of the drop | ratio (90%) | loss gap, same batches | steps below | median step (s) "
             "| dev metrics | total rank |", "|---" * 13 + "|"]
    late = "n/a (not reached)"
    no90 = "n/a (no drop to measure)" if result.get("target_90") is None else late
    for label, m in result["methods"].items():
        ev = ", ".join(f"{k}={v:.4f}" for k, v in m["final_eval"].items() if isinstance(v, float) and k != "eval_loss")
        lines.append(f"| {label} | {m['final_smoothed_task_loss']:.4f} | {fmt(m['steps_to_target'], '{}', late)} | "
                     f"{fmt(m['steps_ratio'], '{:.2f}', late)} | {fmt(m['time_to_target_s'], '{:.1f}', late)} | "
                     f"{fmt(m['time_ratio'], '{:.2f}', late)} | {fmt(m.get('steps_to_90'), '{}', no90)} | "
                     f"{fmt(m.get('steps_ratio_90'), '{:.2f}', no90)} | {fmt(m.get('loss_gap'), '{:+.4f}', 'n/a')} | "
                     f"{fmt(m.get('steps_below'), '{:.2f}', 'n/a')} | {m['median_step_s']:.3f} | {ev} | "
                     f"{m['total_rank']} |")
    return "\n".join(lines)


def compare(base: TrainArgs, variants: dict, output_dir: str, reference: Optional[str] = None,
            title: str = "", command: str = "") -> dict:
    """Train each variant ({label: {TrainArgs field overrides}}) and write report.md / results.json / plot."""
    os.makedirs(output_dir, exist_ok=True)
    runs = {}
    for label, overrides in variants.items():
        overrides = dict(overrides)
        hyper = {**base.hyper, **overrides.pop("hyper", {})}
        args = dataclasses.replace(base, output_dir=os.path.join(output_dir, label), hyper=hyper,
                                   **{"overwrite": True, **overrides})  # a comparison refreshes its runs
        print(f"[{label}] training {args.method} for {args.max_steps} steps -> {args.output_dir}", flush=True)
        summary = train(args)
        summary.pop("model", None)
        rows, evals = read_metrics(summary["metrics"])
        runs[label] = {"rows": rows, "evals": evals, "summary": summary}
    reference = reference or next(iter(variants))
    result = summarize(runs, reference)
    plot = plot_loss_curves({k: v["rows"] for k, v in runs.items()}, os.path.join(output_dir, "loss_curves.png"),
                            title=title, window=SMOOTH_WINDOW)
    result.update({"title": title, "command": command, "plot": os.path.basename(plot),
                   "args": {k: dataclasses.asdict(base)[k] for k in ("task", "model", "max_steps", "batch_size", "lr",
                                                                       "seed", "max_length", "init_r", "target_r")},
                   "curves": {k: [[r["step"], round(r["task_loss"], 5)] for r in v["rows"]] for k, v in runs.items()}})
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    a = result["args"]
    settings = (f"Settings (every method): model {a['model'] or 'default'}, lr {a['lr']:g}, batch {a['batch_size']}, "
                f"max_length {a['max_length']}, {a['max_steps']} steps, init_r {a['init_r']} -> target_r "
                f"{a['target_r']}, seed {a['seed']}; the same batches in the same order. One shared learning rate: "
                "HyperAdaLoRA's head start is largest where that lr is small for AdaLoRA (with AdaLoRA at about 3x "
                "the lr the two converged alike on SST-2 and the demo's sentiment task, `docs/method.md`), so "
                "compare at more than one `--lr` before drawing conclusions.")
    report = [f"# {title or 'Comparison'}", "", f"Command: `{command}`" if command else "", "", settings,
              "", f"Target loss: {reference}'s final smoothed training loss = {result['target_loss']:.4f} "
              f"(trailing mean over {SMOOTH_WINDOW} steps)" + (
                  f"; 90% of its drop: {result['target_90']:.4f}." if result.get("target_90") is not None else
                  "; its loss did not come down by more than its noise: no 90%-of-the-drop target."),
              "", format_table(result), "",
              f"![loss curves]({result['plot']})", ""]
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(report))
    return result
