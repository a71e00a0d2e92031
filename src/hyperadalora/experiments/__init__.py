"""The experiment suite of the paper (`EXPERIMENTS`, ``hyperadalora experiment NAME``) and side-by-side comparisons
of methods (`compare`, ``hyperadalora demo``).

Each experiment is a function ``run_<name>(opts) -> dict`` in its own module, registered in `registry`; what the
experiments share is in `options` (the options and the command line), `task_setup` (data, output directory,
machine), `runs` (training runs and ``--reuse``), `stats` (statistics over seeds), `convergence` (speed measures on
the loss curves), `goal` (the project's goal check), `report` (report.md, results.json) and `plots`.
"""

from .compare import compare, format_table, summarize
from .convergence import SMOOTH_WINDOW, steps_to_target, train_time_at
from .options import ExperimentOptions
from .registry import EXPERIMENTS, add_experiment_parser, cmd_experiment, run_experiment

__all__ = ["EXPERIMENTS", "ExperimentOptions", "SMOOTH_WINDOW", "add_experiment_parser", "cmd_experiment", "compare",
           "format_table", "run_experiment", "steps_to_target", "summarize", "train_time_at"]
