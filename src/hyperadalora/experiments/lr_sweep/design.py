"""The design of the lr sweep, fixed before its runs (issue 23): the methods, the learning-rate grid, the tasks and
how each is scored (`SweepTask`, `TASKS`), the dev halves' seed and the decision rule (`DECISION_RULE`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..task_setup import DEFAULT_ALPACA_FILE

NAME = "lr-sweep"
METHODS = ("adalora", "hyperadalora", "lora")
LABELS = {"adalora": "AdaLoRA (peft)", "hyperadalora": "HyperAdaLoRA", "lora": "LoRA (peft)"}
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SPLIT_SEED = 20261204  # the fixed random halves A / B of each dev set
ADVANTAGE_WINDOW = 1.5  # rule (b): a good-lr window at least this many times AdaLoRA's
ADVANTAGE_RATIO = 0.85  # rule (c): steps to the target below this ratio, interval excluding 1


@dataclasses.dataclass(frozen=True)
class SweepTask:
    """One task of the sweep: how its runs are made and how its dev score is read."""

    name: str                       # the label in reports
    task: str                       # train's task
    steps: int
    batch_size: int
    max_length: int
    eval_every: int
    seeds: int
    score: str                      # "accuracy" (higher is better) or "dev_loss" (mean per-example loss, lower)
    tolerance: float                # the good-lr window: within this of the method's own best
    model: Optional[str] = None
    data_path: Optional[str] = None
    max_eval_examples: Optional[int] = None   # None: the whole dev set

    @property
    def higher_is_better(self) -> bool:
        return self.score != "dev_loss"

    def utility(self, value: float) -> float:
        """The score with its sign set so that larger is better."""
        return value if self.higher_is_better else -value


@dataclasses.dataclass(frozen=True)
class Variant:
    """A method with options of its own, run in the cells of the "why" experiment (`why`) under its own name."""

    method: str                     # train's method
    args: dict                      # TrainArgs fields set for it (hypernetwork options under "hyper")
    what: str                       # one line for the report


TASKS = {
    # SST-2 on MiniLM: accuracy on the whole dev set (872 sentences)
    "sst2": SweepTask("sst2", "sst2", steps=400, batch_size=16, max_length=64, eval_every=50, seeds=3,
                      score="accuracy", tolerance=0.01),
    # instruction tuning on SmolLM2: the mean per-example loss on every held-out record of the Alpaca demo set
    "alpaca": SweepTask("alpaca", "alpaca", steps=100, batch_size=4, max_length=128, eval_every=20, seeds=2,
                        score="dev_loss", tolerance=0.02, model="smollm2", data_path=DEFAULT_ALPACA_FILE),
}

DECISION_RULE = f"""\
Decision rule (fixed before the runs, issue 23). Per task, at the full budget, HyperAdaLoRA has a real advantage over
AdaLoRA **only if** at least one of these holds:

- (a) best against best: the 95% interval of the paired difference HyperAdaLoRA - AdaLoRA (each at the lr chosen on
  dev half A, scored on half B) excludes 0 in HyperAdaLoRA's favour;
- (b) its good-lr window (decades of lr within the tolerance of its own best) is at least {ADVANTAGE_WINDOW}x
  AdaLoRA's;
- (c) its steps to the common dev-score target, at each method's chosen lr, are below {ADVANTAGE_RATIO}x AdaLoRA's
  (paired ratio, mean over seeds) with a 95% interval that excludes 1, every seed counted (a seed on which a method
  never reaches the target makes the ratio not computable: the rule then does not hold).

Otherwise the verdict is "no advantage when tuned". If (a)'s interval excludes 0 in AdaLoRA's favour, the verdict
says so. The verdict is "not decided" while cells are missing or a method's best lr is at the edge of the grid
(the grid is then extended, not the rule changed). LoRA is an anchor: it is reported, not part of the rule. The
HyperAdaLoRA options are the library defaults at the commit that added this experiment; no option is tuned on these
runs."""

