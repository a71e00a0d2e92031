"""Experiment tracking of the training loop: TensorBoard, Weights & Biases (offline) or MLflow (a local store).

``hyperadalora train --report-to tensorboard|wandb|mlflow`` (``TrainArgs.report_to``) logs, at every optimizer step,
what ``metrics.jsonl`` records (``train/loss``, ``train/task_loss``, ``train/lr``, ``train/total_rank``, and the other
numbers of the row), the rank of every adapted layer (``train/rank/<layer name>``, `RANK_TAG`), the evaluation metrics
(``eval/<name>``) and, when the run ends (or stops), a heatmap of the ranks (layers x steps) as an image
(``rank/heatmap``). Where the logs go:

- ``tensorboard``: ``OUTPUT_DIR/tensorboard/`` (``tensorboard --logdir OUTPUT_DIR/tensorboard``); needs the
  ``tensorboard`` package (installed with this package's ``[tracking]`` extra);
- ``wandb``: offline unless ``WANDB_MODE`` says otherwise, under ``OUTPUT_DIR/wandb/`` (``wandb sync`` uploads it
  later); needs ``pip install wandb``;
- ``mlflow``: ``MLFLOW_TRACKING_URI`` if set, else the local store ``file://OUTPUT_DIR/mlruns``
  (``mlflow ui --backend-store-uri OUTPUT_DIR/mlruns``); needs ``pip install mlflow``.

`rank_per_layer` / `rank_logs` read the ranks of any model the package trains (HyperAdaLoRA, the generated-adapter
methods, peft's AdaLoRA and LoRA); `HyperAdaLoraTrainer` adds `rank_logs` to the logs that ``Trainer``'s own
``report_to`` integrations receive.
"""

from __future__ import annotations

import os
from typing import Optional

from .methods import AdapterModel
from .tuner_utils import unwrap_model

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
# The tag of a layer's rank, on every path: the CLI's trackers write ``train/rank/<layer>``, as transformers'
# TensorBoard and W&B integrations write the Trainer path's ``rank/<layer>`` logs (they prefix ``train/``).
RANK_TAG = "train/rank/"
PIP_NAME = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def rank_per_layer(model) -> dict:
    """{adapted module name: its current rank} of a HyperAdaLoRA / generated-adapter model or a peft LoRA /
    AdaLoRA model (peft's AdaLoRA: from its rank pattern once it masks, ``init_r`` before)."""
    model = unwrap_model(model)
    if isinstance(model, AdapterModel):
        return {name: int(r) for name, r in model.rank_pattern.items()}
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    inner = getattr(model, "base_model", None)
    if config is None or inner is None:
        raise TypeError(f"rank_per_layer needs an adapter model of hyperadalora or peft, got {type(model).__name__}.")
    if type(inner).__name__ == "AdaLoraModel":
        if config.rank_pattern:
            return {name: int(sum(bool(b) for b in mask)) for name, mask in config.rank_pattern.items()}
        return {name: int(config.init_r) for name, m in inner.named_modules()
                if hasattr(m, "lora_E") and "default" in m.lora_E}
    return {name: int(m.r["default"]) for name, m in inner.named_modules()
            if hasattr(m, "lora_A") and isinstance(getattr(m, "r", None), dict) and "default" in m.r}


def rank_logs(model) -> dict:
    """``{"total_rank": ..., "rank/<layer>": ...}`` for a logger."""
    ranks = rank_per_layer(model)
    return {"total_rank": sum(ranks.values()), **{f"rank/{name}": r for name, r in ranks.items()}}


def check_installed(report_to: str) -> None:
    """Raise the ImportError of a tracker whose package is missing (before a run loads its model)."""
    if report_to != "none":
        _import(report_to)


def _import(report_to: str):
    import importlib

    try:
        return importlib.import_module(report_to)
    except ImportError as e:
        from .extras import missing

        raise missing(PIP_NAME[report_to], f"--report-to {report_to} (or choose another --report-to)") from e


class Tracker:
    """Base class: keeps the rank history for the heatmap; subclasses write scalars and images."""

    def __init__(self):
        self.steps: list[int] = []
        self.history: list[dict] = []

    def log_step(self, step: int, row: dict, ranks: dict) -> None:
        scalars = {f"train/{k}": float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars.update({f"{RANK_TAG}{name}": float(r) for name, r in ranks.items()})
        self.scalars(step, scalars)
        self.steps.append(step)
        self.history.append(dict(ranks))

    def log_eval(self, step: int, result: dict) -> None:
        self.scalars(step, {f"eval/{k}": float(v) for k, v in result.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        """Log the rank heatmap (if any step was logged) and finish the run."""
        if self.history:
            import matplotlib.pyplot as plt

            from .plotting import rank_heatmap

            names = list(self.history[-1])
            ranks = [[h.get(name, 0) for h in self.history] for name in names]
            fig = rank_heatmap(self.steps, names, ranks)
            try:
                self.figure(self.steps[-1], "rank/heatmap", fig)
            finally:
                plt.close(fig)
        self.finish()

    # what a tracker implements
    def scalars(self, step: int, values: dict) -> None:
        raise NotImplementedError

    def figure(self, step: int, tag: str, fig) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    def __init__(self, output_dir: str, config: dict):
        super().__init__()
        _import("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = os.path.join(output_dir, "tensorboard")
        self.writer = SummaryWriter(self.logdir)
        self.writer.add_text("args", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def scalars(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def figure(self, step, tag, fig):
        self.writer.add_figure(tag, fig, step, close=False)

    def finish(self):
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, output_dir: str, config: dict, run_name: str):
        super().__init__()
        self.wandb = _import("wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "hyperadalora"), name=run_name,
                                   dir=output_dir, config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def scalars(self, step, values):
        self.run.log(values, step=step)

    def figure(self, step, tag, fig):
        self.run.log({tag: self.wandb.Image(fig)}, step=step)

    def finish(self):
        self.run.finish()


class MlflowTracker(Tracker):
    def __init__(self, output_dir: str, config: dict, run_name: str):
        super().__init__()
        self.mlflow = _import("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "file://" + os.path.abspath(os.path.join(output_dir, "mlruns"))
        self.mlflow.set_tracking_uri(uri)
        self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "hyperadalora"))
        self.run = self.mlflow.start_run(run_name=run_name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def scalars(self, step, values):
        self.mlflow.log_metrics(values, step=step)

    def figure(self, step, tag, fig):
        self.mlflow.log_figure(fig, tag.replace("/", "_") + ".png")

    def finish(self):
        self.mlflow.end_run()


def make_tracker(report_to: str, output_dir: str, config: dict, run_name: Optional[str] = None) -> Optional[Tracker]:
    """The tracker of ``report_to`` (None for "none"); ``config``: the run's arguments (logged as its parameters)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to={report_to!r}: choose one of {REPORT_TO}.")
    run_name = run_name or os.path.basename(os.path.abspath(output_dir))
    if report_to == "tensorboard":
        return TensorBoardTracker(output_dir, config)
    if report_to == "wandb":
        return WandbTracker(output_dir, config, run_name)
    if report_to == "mlflow":
        return MlflowTracker(output_dir, config, run_name)
    return None
