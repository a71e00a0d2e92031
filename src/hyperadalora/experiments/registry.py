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


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_csv(text: str) -> list:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``experiment NAME [options]`` to ``subparsers`` (of the ``hyperadalora`` parser); returns the parser."""
    epilog = "experiments:\n" + "\n".join(f"  {k:18s} {v}" for k, v in DESCRIPTIONS.items()) + (
        "\n\nEach writes report.md (the command at the top, how to run the full-size version at the bottom), "
        "results.json and PNG plots to --output-dir (default runs/experiments/NAME). Options left out take the "
        "experiment's default (sized to finish in under 30 minutes on 2 CPU cores).")
    p = subparsers.add_parser("experiment", help="run one experiment of the paper (report.md, results.json, plots)",
                              description="Run one experiment of the paper's evaluation.", epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME", help=" | ".join(EXPERIMENTS))
    p.add_argument("--data-dir", dest="data_dir", help="GLUE TSV root (default: ../shared/data/glue of the repository)")
    p.add_argument("--model", help="model directory, .gguf file, hub name, or minilm / smollm2")
    p.add_argument("--steps", type=int, help="optimizer steps per run (efficiency: measured steps per method)")
    p.add_argument("--seeds", help="K: seeds 0..K-1 (default 1); or a comma-separated list of seeds, e.g. 2,3 to add "
                                   "two seeds to an earlier --seeds 2 run (with --reuse, the report covers every "
                                   "finished seed of the list)")
    p.add_argument("--output-dir", dest="output_dir", help="default runs/experiments/NAME")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-length", dest="max_length", type=int, help="tokens per example (efficiency: sequence length)")
    p.add_argument("--data-path", dest="data_path", nargs="+", action="extend", metavar="FILE",
                   help="nlg: extra instruction data files (Alpaca-style JSON / JSONL), besides the Alpaca demo set")
    p.add_argument("--tasks", type=_csv, help="comma-separated GLUE tasks (nlu-convergence, extension: all of them; "
                                              "ablation-hypernet, gamma, rank-allocation: the first)")
    p.add_argument("--variants", type=_csv, help="formulation: comma-separated variant labels ("
                                                 + ", ".join(FORMULATION_VARIANTS) + ")")
    p.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE,...",
                   help="formulation: a variant of your own, repeatable: the library default with these HyperAdaLoRA "
                        "options (and lr_scale), e.g. rows10:feature_lr_ratio=10,hypernet=mlp; without --variants "
                        "it runs beside adalora and default")
    p.add_argument("--batch-sizes", dest="batch_sizes", type=_int_csv, help="efficiency: e.g. 1,2,4,8,16,32")
    p.add_argument("--lrs", help="lr-sweep: the learning-rate grid, comma-separated (default 1e-4,3e-4,1e-3,3e-3,"
                                 "1e-2,3e-2)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="nlu-convergence: dev evaluation interval")
    p.add_argument("--max-train-examples", dest="max_train_examples", type=int)
    p.add_argument("--max-eval-examples", dest="max_eval_examples", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster when other jobs share the CPU)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in the output dir (same arguments)")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="lr-sweep: write the report from the cells finished so far (e.g. while the sweep runs in other "
                        "processes); train nothing")
    p.add_argument("--progress", action="store_true", help="progress bars of the training runs")
    p.set_defaults(func=cmd_experiment)
    return p


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
