"""``hyperadalora experiment lr-sweep``: check the options, run (or reuse) every cell of every task, analyse them and
write the report (`run_lr_sweep`)."""

from __future__ import annotations

import dataclasses
import os
import time

from ..options import as_options, command_line, parse_lrs, seed_list
from ..report import markdown_table, report_header, write_outputs
from ..task_setup import default_glue_dir, environment, glue_task_available, output_dir
from .analysis import analyse
from .cells import sweep_cells
from .design import DECISION_RULE, LABELS, LRS, METHODS, NAME, SPLIT_SEED, TASKS
from .report import FULL_SIZE, plot_best_curves, plot_score_vs_lr, task_section

def run_lr_sweep(opts=None) -> dict:
    """Run the sweep of ``opts`` (its tasks, ``--lrs``, ``--seeds``; ``--report-only``: train nothing) and write
    report.md, results.json and the plots of every task to its output directory."""
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    names = [t.lower().replace("-", "") for t in (opts.tasks or list(TASKS))]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"lr-sweep: unknown task(s) {unknown}; choose from {', '.join(TASKS)}.")
    lrs = parse_lrs(opts.lrs or LRS)
    if len(lrs) < 3:
        raise ValueError(f"--lrs {lrs}: give at least 3 learning rates (an optimum needs a smaller and a larger lr).")
    command, env = command_line(NAME, opts), environment()
    started = time.time()
    results = {"experiment": NAME, "command": command, "env": env, "decision_rule": DECISION_RULE, "lrs": lrs,
               "split_seed": SPLIT_SEED, "tasks": {}, "runs": []}
    lines = report_header("HyperAdaLoRA vs AdaLoRA, each at its own best learning rate (issue 23)", command, env,
                          {"methods": ", ".join(LABELS[m] for m in METHODS), "learning rates": ", ".join(
                              f"{v:g}" for v in lrs), "dev halves": f"a fixed random split (seed {SPLIT_SEED})"},
                          DECISION_RULE)
    sections, verdicts = [], []
    for name in names:
        spec = TASKS[name]
        if opts.steps:
            spec = dataclasses.replace(spec, steps=opts.steps, eval_every=max(1, min(spec.eval_every, opts.steps // 4)))
        if spec.task != "alpaca":
            ok, why = glue_task_available(spec.task, default_glue_dir(opts))
            if not ok:
                raise FileNotFoundError(f"lr-sweep: {spec.task}: {why}")
        seeds = seed_list(opts, spec.seeds)
        cells = sweep_cells(spec, opts, lrs, seeds, out)
        analysis = analyse(spec, cells, lrs, seeds)
        plots = [plot_score_vs_lr(spec, analysis, os.path.join(out, f"score_vs_lr_{spec.name}.png")),
                 plot_best_curves(spec, cells, analysis, os.path.join(out, f"best_curves_{spec.name}.png"))]
        cpu_s = sum(c.get("wall_time_s") or 0.0 for c in cells)
        sections += task_section(spec, analysis, lrs, seeds, plots)
        sections += [f"Compute: {len(cells)} runs, {cpu_s / 3600:.2f} h of run time in all (each run on "
                     f"{env['torch_threads']} thread(s); two processes side by side).", ""]
        verdicts.append([spec.name, f"**{analysis['verdict']}**", analysis["why"]])
        results["tasks"][spec.name] = {"settings": dataclasses.asdict(spec), "seeds": seeds, "analysis": analysis,
                                       "run_time_h": cpu_s / 3600}
        results["runs"] += [{k: v for k, v in c.items() if k not in ("args", "hypernetwork_options")} for c in cells]
    lines += ["## Verdict", "", markdown_table(["task", "verdict", "why"], verdicts), ""] + sections
    lines += [f"This report was written in {time.time() - started:.0f} s of this process (cells reused from earlier "
              f"processes count in the compute lines above, not here).", "", FULL_SIZE]
    return write_outputs(out, results, lines)
