"""Writing the reports: numbers as text (`fmt`, `fmt_stat`, `fmt_ci`, `fmt_interval`), Markdown tables, the report's
header and settings, the sections every experiment shares (`convergence_table`, `epoch_section`, `gap_note`), and
the two files of every experiment: ``report.md`` and ``results.json`` (`write_outputs`).

``report.md``: the command that produced it (at the top), the settings, the tables, the plots, and how to run the
full-size (paper) version (at the bottom); ``results.json``: every number of the report (and the curves behind the
plots).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Optional

import numpy as np

from ..training import TrainArgs
from .stats import stats


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table: the header, then one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(v, f: str = "{:.4f}", none: str = "n/a") -> str:
    """``v`` in format ``f``; ``none`` for None, NaN and infinities."""
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else f.format(v)


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


def fmt_ci(values, f: str = "{:.4f}") -> str:
    """``mean [lo, hi] (n)`` with the 95% t-interval; one value: itself."""
    s = stats(values)
    if s["mean"] is None:
        return "n/a"
    if s["n"] < 2:
        return f.format(s["mean"]) + f" (n={s['n']})"
    lo, hi = s["ci95"]
    return f"{f.format(s['mean'])} [{f.format(lo)}, {f.format(hi)}] (n={s['n']})"


def fmt_interval(iv: Optional[dict], f: str = "{:+.4f}") -> str:
    """An `interval_of` result as ``mean [lo, hi] (n=...)``; without an interval ``mean (n=...)``; else ``n/a``."""
    if not iv or iv.get("mean") is None:
        return "n/a"
    if not iv.get("ci95"):
        return f.format(iv["mean"]) + f" (n={iv['n']})"
    return f"{f.format(iv['mean'])} [{f.format(iv['ci95'][0])}, {f.format(iv['ci95'][1])}] (n={iv['n']})"


def gap_note(window: int, reference: str = "AdaLoRA") -> str:
    """The reports' one-sentence definition of the paired loss gap (`paired_gap`) against ``reference``."""
    return (f"\"Loss gap, same batches\": the mean, over the steps after the first {window}, of the method's raw "
            f"training loss minus {reference}'s at the same step (both see the same batch there; negative = below "
            f"{reference}'s), and the fraction of those steps on which it is below.")


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


def curves_json(series: dict) -> dict:
    """{label: {"steps", "task_loss"}} of `convergence.curves` series {label: (steps, values[seed, step])}: the curves
    behind a report's plots, for results.json (losses rounded to 5 decimals)."""
    return {label: {"steps": s.tolist(), "task_loss": v.round(5).tolist()} for label, (s, v) in series.items()}


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
    """The report's first lines: the title, the command that produced it, ``intro``, the settings and the machine."""
    lines = [f"# {title}", "", "Produced by:", "", "```", command, "```", ""]
    if intro:
        lines += [intro, ""]
    lines += ["Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += [f"- machine: {env['device']}, {env['cpu_count']} CPU cores, torch {env['torch']} "
              f"({env['torch_threads']} threads); {env['date']}", ""]
    return lines


def settings_of(args: TrainArgs, *names) -> dict:
    """The report's settings from the base arguments of the runs (``names``: which fields; default: the usual ones)."""
    d = dataclasses.asdict(args)
    keys = names or ("task", "model", "max_steps", "batch_size", "lr", "max_length", "init_r", "target_r", "tinit",
                     "tfinal", "deltaT", "orth_reg_weight", "eval_every", "max_train_examples", "max_eval_examples")
    out = {k: d[k] for k in keys if k in d}
    out["model"] = out.get("model") or "default (minilm / smollm2)"
    out["HyperAdaLoRA options"] = d["hyper"] or "library defaults (HyperAdaLoraConfig)"
    return out
