"""``lr-sweep``: HyperAdaLoRA against AdaLoRA with each method at its own best learning rate (issue 23).

A pre-registered test of the project's central claim. Every method (peft's AdaLoRA, HyperAdaLoRA on the library
defaults, peft's LoRA as an anchor) trains at every learning rate of a log-spaced grid, for several seeds (the same
batches for every method at a seed), for a fixed budget, and is evaluated on the whole dev set at several points of
the run. Each (task, method, lr, seed) is one **cell**: a small JSON record under ``OUT/cells/TASK/`` written when its
run ends. Cells are reused (``--reuse``) and claimed with a lock file, so two processes can run the same command side
by side and a sweep can be continued in a later session from committed cells.

The analysis (`analyse`) is fixed before the runs, together with its decision rule (`DECISION_RULE`):

1. score vs learning rate per method: the mean over seeds with a 95% t-interval (sample standard deviation);
2. best against best: each method's lr chosen on half A of the dev set (mean over seeds), scored on half B; the
   paired (same seed) difference HyperAdaLoRA - AdaLoRA with its interval; the reverse split as a check;
3. the good-lr window: how many decades of lr keep the mean score within ``tolerance`` of the method's own best
   (log-linear interpolation between grid points; "at least" where the window reaches the end of the grid);
4. speed at each method's chosen lr: steps to a common dev-score target on half B (linear interpolation between
   evaluations; seeds that never reach it are counted), the paired ratio with its interval, and the paired
   difference of the normalised area under the dev-score curve (a target-free measure);
5. the fitted shift ``s`` in HyperAdaLoRA(lr) ~ AdaLoRA(s * lr), per seed (least squares over the grid, AdaLoRA's
   curve interpolated in log lr), with its interval, and whether the peaks are equal.

Its modules: `design` (what is fixed before the runs), `cells` (running, claiming and reusing cells), `analysis`,
`report` and `run` (`run_lr_sweep`, the experiment of the registry); `why` (``lr-sweep-why``, issue 32: where the
robustness to the lr comes from, with a rule of its own).
"""

from .analysis import analyse
from .design import DECISION_RULE, TASKS, SweepTask
from .run import run_lr_sweep
from .why import WHY_RULE, run_lr_sweep_why

__all__ = ["run_lr_sweep", "run_lr_sweep_why", "analyse", "TASKS", "DECISION_RULE", "WHY_RULE", "SweepTask"]
