"""The options of ``hyperadalora experiment NAME``: the parser alone, without importing the experiments (torch), so that
the CLI refuses a bad argument at once (`cli.build_parser` builds it from `cli_spec`'s snapshot;
`experiments.registry.add_experiment_parser` from the registry itself)."""

from __future__ import annotations

import argparse


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_csv(text: str) -> list:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(subparsers, descriptions: dict, variants: list, func) -> argparse.ArgumentParser:
    """Add ``experiment NAME [options]`` to ``subparsers``: ``descriptions`` {name: what it does}, the formulation
    ``variants``, ``func`` the command (`registry.cmd_experiment`). Returns the parser."""
    epilog = "experiments:\n" + "\n".join(f"  {k:18s} {v}" for k, v in descriptions.items()) + (
        "\n\nEach writes report.md (the command at the top, how to run the full-size version at the bottom), "
        "results.json and PNG plots to --output-dir (default runs/experiments/NAME). Options left out take the "
        "experiment's default (sized to finish in under 30 minutes on 2 CPU cores).")
    p = subparsers.add_parser("experiment", help="run one experiment of the paper (report.md, results.json, plots)",
                              description="Run one experiment of the paper's evaluation.", epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(descriptions), metavar="NAME", help=" | ".join(descriptions))
    p.add_argument("--data-dir", dest="data_dir", help="GLUE TSV root (default: ../shared/data/glue of the repository)")
    p.add_argument("--model", help="model directory, .gguf file, hub name, or minilm / smollm2")
    p.add_argument("--steps", type=int, help="optimizer steps per run (efficiency: measured steps per method)")
    p.add_argument("--seeds", help="K: seeds 0..K-1 (default 1); or a comma-separated list of seeds, e.g. 2,3 to add "
                                   "two seeds to an earlier --seeds 2 run (with --reuse, the report covers every "
                                   "finished seed of the list)")
    p.add_argument("--output-dir", dest="output_dir", help="default runs/experiments/NAME")
    p.add_argument("--per-device-train-batch-size", "--batch-size", dest="batch_size", type=int)
    p.add_argument("--learning-rate", "--lr", dest="lr", type=float)
    p.add_argument("--max-length", dest="max_length", type=int, help="tokens per example (efficiency: sequence length)")
    p.add_argument("--data-path", dest="data_path", nargs="+", action="extend", metavar="FILE",
                   help="nlg: extra instruction data files (Alpaca-style JSON / JSONL), besides the Alpaca demo set")
    p.add_argument("--tasks", type=_csv, help="comma-separated GLUE tasks (nlu-convergence, extension: all of them; "
                                              "ablation-hypernet, gamma, rank-allocation: the first)")
    p.add_argument("--variants", type=_csv, help="formulation: comma-separated variant labels ("
                                                 + ", ".join(variants) + ")")
    p.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE,...",
                   help="formulation: a variant of your own, repeatable: the library default with these HyperAdaLoRA "
                        "options (and lr_scale), e.g. rows10:feature_lr_ratio=10,hypernet=mlp; without --variants "
                        "it runs beside adalora and default")
    p.add_argument("--batch-sizes", dest="batch_sizes", type=_int_csv, help="efficiency: e.g. 1,2,4,8,16,32")
    p.add_argument("--lrs", help="lr-sweep: the learning-rate grid, comma-separated (default 1e-4,3e-4,1e-3,3e-3,"
                                 "1e-2,3e-2)")
    p.add_argument("--eval-steps", "--eval-every", dest="eval_every", type=int, help="nlu-convergence: dev evaluation interval")
    p.add_argument("--max-train-samples", "--max-train-examples", dest="max_train_examples", type=int)
    p.add_argument("--max-eval-samples", "--max-eval-examples", dest="max_eval_examples", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster when other jobs share the CPU)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in the output dir (same arguments)")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="lr-sweep: write the report from the cells finished so far (e.g. while the sweep runs in other "
                        "processes); train nothing")
    p.add_argument("--progress", action="store_true", help="progress bars of the training runs")
    p.set_defaults(func=func)
    return p


