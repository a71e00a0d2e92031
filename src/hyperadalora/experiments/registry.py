"""The experiment registry and the ``hyperadalora experiment NAME ...`` subcommand."""

from __future__ import annotations

import argparse
import os

from .ablation import run_ablation_hypernet
from .efficiency import run_efficiency
from .extension import run_extension
from .formulation import VARIANTS as FORMULATION_VARIANTS
from .formulation import run_formulation
from .gamma import run_gamma
from .lr_sweep import run_lr_sweep, run_lr_sweep_why
from .nlg import run_nlg
from .nlu import run_nlu_convergence
from .. import experiment_args
from .options import ExperimentOptions, as_options
from .rank_allocation import run_rank_allocation

EXPERIMENTS = {
    "nlu-convergence": run_nlu_convergence,
    "nlg": run_nlg,
    "ablation-hypernet": run_ablation_hypernet,
    "gamma": run_gamma,
    "efficiency": run_efficiency,
    "rank-allocation": run_rank_allocation,
    "extension": run_extension,
    "formulation": run_formulation,
    "lr-sweep": run_lr_sweep,
    "lr-sweep-why": run_lr_sweep_why,
}

DESCRIPTIONS = {
    "nlu-convergence": "Fig. 2: adalora vs hyperadalora loss curves, steps-to-target, dev accuracy on RTE, WNLI, "
                       "SST-2 (+MNLI if present); default MiniLM, 200 steps, batch 16, max_length 64",
    "nlg": "Tables 1/3: instruction tuning (SmolLM2-135M, Alpaca demo), BLEU-4/ROUGE-1, training time; "
           "default 50 steps, batch 4, max_length 256",
    "ablation-hypernet": "Fig. 3: hypernet attention vs cnn vs mlp (+adalora), steps-to-target, parameter counts; "
                         "default SST-2, 200 steps at lr 3e-3",
    "gamma": "Table 2: orth_reg_weight 0.1 / 0.15 / 0.2, dev metrics and convergence; default SST-2, 200 steps at "
             "lr 3e-3",
    "efficiency": "Table 4: peak memory and median step latency, batch 1..32 (1..64 on a GPU), hyperadalora vs "
                  "adalora vs lora (benchmarks/step_time.py)",
    "rank-allocation": "per-layer rank over training (heatmaps) and the final rank pattern, adalora vs hyperadalora; "
                       "default SST-2, 200 steps at lr 3e-3",
    "formulation": "every HyperAdaLoRA formulation tried (paper recurrence, damped, static, offset, feature context, "
                   "principal seed) vs adalora: steps-to-target table; default SST-2, 200 steps, lr 3e-3",
    "extension": "lora vs hyperlora, dora vs hyperdora, hydralora vs hyperhydralora: loss curves, steps-to-target "
                 "ratio, final dev accuracy on RTE and SST-2; default MiniLM, 80 steps, batch 16, max_length 64",
    "lr-sweep": "issue 23: adalora, hyperadalora, lora at every lr of a grid (default 1e-4..3e-2), several seeds, "
                "on SST-2 (MiniLM, 400 steps, 3 seeds) and instruction tuning (SmolLM2, 100 steps, 2 seeds); each "
                "method at its own best lr, with a pre-registered decision rule. Hours of CPU: run it in two "
                "processes side by side with --reuse --threads 1 (cells are claimed, reused across sessions)",
    "lr-sweep-why": "issue 32: where HyperAdaLoRA's lr robustness comes from: HyperAdaLoRA with feature_lr_ratio=1, "
                    "without row codes, and peft AdaLoRA with P and Q at 30x the lr, on the lr sweep's SST-2 grid "
                    "extended by 1e-1 (3 seeds), beside the sweep's committed cells, with a pre-registered rule. Hours "
                    "of CPU: run it in two processes side by side with --reuse --threads 1",
}


CELL_EXPERIMENTS = ("lr-sweep", "lr-sweep-why")  # the experiments with an lr grid (--lrs) and cells (--report-only)


def run_experiment(name: str, opts=None) -> dict:
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}.")
    opts = as_options(opts)
    opts.name = name
    if name != "formulation" and (opts.variants or opts.variant):
        raise ValueError(f"--variants / --variant choose formulations of the 'formulation' experiment; {name!r} "
                         f"has none: leave them out, or run 'hyperadalora experiment formulation'.")
    if name not in CELL_EXPERIMENTS and opts.lrs:
        raise ValueError(f"--lrs sets the grid of the 'lr-sweep' experiment; {name!r} has none: use --lr.")
    if name not in CELL_EXPERIMENTS and opts.report_only:
        raise ValueError(f"--report-only applies to the 'lr-sweep' experiment's cells; {name!r} has none: use --reuse.")
    out = opts.output_dir or os.path.join("runs", "experiments", name)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--output-dir {out!r} is a file, not a directory: choose a directory (it is created "
                              f"if missing).")
    created = not os.path.exists(out)
    try:
        return EXPERIMENTS[name](opts)
    except BaseException:
        if created:  # a run refused before it wrote anything leaves no empty directories behind
            _remove_empty_dirs(out)
        raise


def _remove_empty_dirs(root: str) -> None:
    """Remove ``root`` and the directories under it that hold no file (bottom-up); keep anything with a file."""
    if not os.path.isdir(root):
        return
    for path, _, _ in sorted(os.walk(root), key=lambda entry: -entry[0].count(os.sep)):
        if not os.listdir(path):
            os.rmdir(path)


def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``experiment NAME [options]`` to ``subparsers`` (of the ``hyperadalora`` parser); returns the parser."""
    return experiment_args.add_parser(subparsers, DESCRIPTIONS, list(FORMULATION_VARIANTS), cmd_experiment)


def cmd_experiment(ns) -> int:
    names = set(vars(ExperimentOptions()))
    opts = as_options({k: v for k, v in vars(ns).items() if k in names})
    result = run_experiment(ns.name, opts)
    with open(result["report"]) as f:
        text = f.read()
    if "## Summary" in text:
        summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
        print("\n" + summary.strip() + "\n")
    print(f"Report:  {result['report']}")
    print(f"Numbers: {result['results_json']}")
    print(f"Plots:   {os.path.dirname(result['report'])}/*.png")
    return 0
