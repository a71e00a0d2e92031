"""How fast the methods' training losses come down, measured on their logged rows: steps and training time to a
target loss (`steps_to_target`), to 90% of the reference's drop (`drop_target`), the paired loss gap on the same
batches (`paired_gap`), all of it per seed and over seeds (`convergence`); the speed read at the dev evaluations
(`dev_speed`); the loss per pass over the training set (`loss_per_epoch`); the curves behind the plots."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import numpy as np

from ..plotting import smooth
from .stats import stats

SMOOTH_WINDOW = 25  # the default smoothing window of the training loss (trailing mean)


def train_time_at(rows: list[dict], step: int) -> Optional[float]:
    """Training time from the end of the run's first step to the end of ``step`` (None if not logged). The first step
    carries one-off costs (the process's first backward, kernel set-up) that fall on whichever method a process runs
    first: they are left out of every time the reports compare."""
    times = {r["step"]: r.get("train_time", r.get("time")) for r in rows}
    if step not in times or not rows:
        return None
    return times[step] - rows[0].get("train_time", rows[0].get("time"))


def steps_to_target(rows: list[dict], target: float, window: int = SMOOTH_WINDOW, key: str = "task_loss"):
    """(step, training time after the first step: `train_time_at`) at which the smoothed loss first reaches
    ``target``, or (None, None)."""
    s = smooth([r[key] for r in rows], window)
    hit = np.nonzero(s <= target)[0]
    if len(hit) == 0:
        return None, None
    step = rows[int(hit[0])]["step"]
    return step, train_time_at(rows, step)


DROP_FRACTION = 0.9  # the "90% of the reference's drop" level of the reports


def final_smoothed(rows: list[dict], window: int, key: str = "task_loss") -> float:
    """The last value of the smoothed ``key`` curve."""
    return float(smooth([r[key] for r in rows], window)[-1])


def drop_target(rows: list[dict], target: float, window: int, fraction: float = DROP_FRACTION,
                key: str = "task_loss") -> Optional[float]:
    """The loss ``fraction`` of the way down from the run's initial smoothed loss (the mean of its first ``window``
    values) to ``target``; None when the run's loss did not come down by more than twice the standard error of
    those two means (a flat, noisy curve has no drop to measure: its 90% level would be noise)."""
    values = np.asarray([r[key] for r in rows], float)
    if len(values) < 2 * window or window < 2:
        return None
    head, tail = values[:window], values[-window:]
    start = float(head.mean())
    noise = math.sqrt((head.var(ddof=1) + tail.var(ddof=1)) / window)
    return start - fraction * (start - target) if start - target > 2 * noise else None


def paired_gap(rows: list[dict], ref_rows: list[dict], skip: int, key: str = "task_loss") -> dict:
    """{"loss_gap": mean of (loss - reference loss) at the same step, "steps_below": fraction of those steps where
    loss < reference loss}, over the steps after the first ``skip`` that both runs logged (None if there are none)."""
    ref = {r["step"]: r[key] for r in ref_rows}
    diffs = np.array([r[key] - ref[r["step"]] for r in rows if r["step"] > skip and r["step"] in ref], float)
    if len(diffs) == 0:
        return {"loss_gap": None, "steps_below": None}
    return {"loss_gap": float(diffs.mean()), "steps_below": float((diffs < 0).mean())}


# per-label results of `convergence` that are missing where a run never reached the target
REACH_KEYS = ("steps_to_target", "time_to_target_s", "steps_ratio", "time_ratio", "steps_to_90", "steps_ratio_90")


def convergence(runs_by_seed: dict, window: int, reference: Optional[str] = None,
                target_fn: Optional[Callable[[dict], float]] = None) -> dict:
    """Steps-to-target of every label, per seed and as statistics over the seeds.

    The target of a seed is ``target_fn(runs of the seed)`` or else the reference label's final smoothed training
    task loss. Per label: final smoothed loss, steps and train time (s) to the target, their ratios to the
    reference's (when a reference is given), median step time, total train time and the final dev metrics.

    With a reference, also the steps to **90% of the reference's drop** (`drop_target`): the first step at which
    the smoothed loss has come down 90% of the way from the reference's initial smoothed loss to the target. When
    both curves end on a noisy plateau, the final-loss target sits inside the plateau's noise and its first
    crossing can move by tens of steps with a rounding-level change of the run; the 90% level is below the noise.

    And the **paired loss gap** (`paired_gap`): the methods see the same batches in the same order, so the
    difference of their raw losses at the same step cancels the batch's own difficulty: its mean over the steps
    after the first window (``loss_gap``, negative = below the reference) and the fraction of those steps on which
    the label's loss is below the reference's (``steps_below``). It needs no target, so it also measures curves
    whose final loss is not below their start.
    """
    per_seed = {}
    for seed, runs in runs_by_seed.items():
        target = target_fn(runs) if target_fn is not None else final_smoothed(runs[reference]["rows"], window)
        ref_step, ref_time = steps_to_target(runs[reference]["rows"], target, window) if reference else (None, None)
        target90 = drop_target(runs[reference]["rows"], target, window) if reference else None
        ref90 = steps_to_target(runs[reference]["rows"], target90, window)[0] if target90 is not None else None
        table = {}
        for label, run in runs.items():
            step, t = steps_to_target(run["rows"], target, window)
            step90 = steps_to_target(run["rows"], target90, window)[0] if target90 is not None else None
            s = run["summary"]
            table[label] = {
                "final_smoothed_task_loss": final_smoothed(run["rows"], window),
                "steps_to_target": step, "time_to_target_s": t,
                "steps_ratio": step / ref_step if step and ref_step else None,
                "time_ratio": t / ref_time if t is not None and ref_time else None,
                "steps_to_90": step90, "steps_ratio_90": step90 / ref90 if step90 and ref90 else None,
                **(paired_gap(run["rows"], runs[reference]["rows"], window) if reference else {}),
                "median_step_s": s.get("median_step_s"), "train_time_s": s.get("train_time_s"),
                "total_rank": s.get("total_rank"),
                **{f"dev_{k}": v for k, v in (s.get("final_eval") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)},
            }
        per_seed[seed] = {"target_loss": target, "target_90": target90, "methods": table}
    labels = list(next(iter(runs_by_seed.values())))
    no_drop = all(p["target_90"] is None for p in per_seed.values())

    def missing(key: str) -> Optional[str]:  # why a seed has no number (shown by fmt_stat)
        if key in ("steps_to_90", "steps_ratio_90") and no_drop:
            return "no drop to measure"
        return "not reached" if key in REACH_KEYS else None

    agg = {}
    for label in labels:
        keys = list(dict.fromkeys(k for p in per_seed.values() for k in p["methods"][label]))
        agg[label] = {k: stats([p["methods"][label].get(k) for p in per_seed.values()], missing(k)) for k in keys}
    return {"reference": reference, "window": window, "target_loss": stats([p["target_loss"] for p in per_seed.values()]),
            "per_seed": per_seed, "methods": agg}


def eval_by_step(evals: list[dict], metric: str) -> dict:
    """{step: metric} of the eval rows (the final evaluation included)."""
    return {int(e["step"]): float(e[metric]) for e in evals if metric in e}


def eval_points(runs_by_seed: dict, label: str, metric: str) -> dict:
    """{step: stats over the seeds} of ``label``'s dev ``metric`` at each evaluation (the final one included)."""
    per_step = {}
    for runs in runs_by_seed.values():
        for step, v in eval_by_step(runs[label]["evals"], metric).items():
            per_step.setdefault(step, []).append(v)
    return {step: stats(vs) for step, vs in sorted(per_step.items())}


def dev_speed(runs_by_seed: dict, reference: str, label: str, metric: str = "eval_loss") -> dict:
    """Steps and training time for ``label`` to reach the reference's **final dev loss**, read at the evaluations
    (``eval_every`` and the final one), against the reference's own steps and time to it.

    The dev set is the same at every evaluation, so this speed has no batch noise: it measures runs whose training
    loss does not come down beyond the noise of its batches (where `drop_target` finds no level). Its resolution is
    the evaluation interval. Per seed and, for the ratios, statistics over the seeds; ``not_reached`` counts the
    seeds on which ``label`` never got there."""
    def first_at_or_below(run, target):
        hit = [step for step, v in sorted(eval_by_step(run["evals"], metric).items()) if v <= target]
        if not hit:
            return None, None
        return hit[0], train_time_at(run["rows"], hit[0])

    per_seed = {}
    for seed, runs in runs_by_seed.items():
        target = (runs[reference]["summary"].get("final_eval") or {}).get(metric)
        if target is None:
            raise ValueError(f"dev_speed: the {reference!r} run of seed {seed} has no final {metric!r}.")
        ref_step, ref_time = first_at_or_below(runs[reference], target)
        step, t = first_at_or_below(runs[label], target)
        per_seed[seed] = {"target": target, "reference_steps": ref_step, "steps": step,
                          "steps_ratio": step / ref_step if step and ref_step else None,
                          "time_ratio": t / ref_time if t is not None and ref_time else None}
    seeds = per_seed.values()
    return {"metric": metric, "per_seed": per_seed,
            "steps_ratio": stats([p["steps_ratio"] for p in seeds], "not reached"),
            "time_ratio": stats([p["time_ratio"] for p in seeds], "not reached"),
            "not_reached": sum(p["steps"] is None for p in seeds)}


def loss_per_epoch(runs_by_seed: dict, labels: Iterable[str], reference: str, key: str = "task_loss") -> list[dict]:
    """Per pass over the training set (the ``epoch`` the loop logs with every step): its steps, and per label the
    mean raw ``key`` over those steps (stats over the seeds) and, but for the reference, its mean gap to the
    reference at the same steps. On the first pass every batch is new data, so the training loss is a held-out
    loss there; after it, a falling loss may be memorisation. [] when the rows carry no epoch."""
    first = next(iter(runs_by_seed.values()))[reference]["rows"]
    if not first or any("epoch" not in r for r in first):
        return []
    out = []
    for epoch in sorted({int(r["epoch"]) for r in first}):
        steps = [r["step"] for r in first if int(r["epoch"]) == epoch]
        row = {"epoch": epoch, "first_step": min(steps), "last_step": max(steps)}
        for label in labels:
            means, gaps = [], []
            for runs in runs_by_seed.values():
                ref = {r["step"]: r[key] for r in runs[reference]["rows"] if int(r.get("epoch", -1)) == epoch}
                own = {r["step"]: r[key] for r in runs[label]["rows"] if int(r.get("epoch", -1)) == epoch}
                if own:
                    means.append(float(np.mean(list(own.values()))))
                shared = sorted(set(own) & set(ref))
                if label != reference and shared:
                    gaps.append(float(np.mean([own[s] - ref[s] for s in shared])))
            row[label] = stats(means)
            if label != reference:
                row[f"{label}_gap"] = stats(gaps)
        out.append(row)
    return out


def curves(runs_by_seed: dict, label: str, key: str = "task_loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values[seed, step]) of one label over the seeds (cut to the shortest run)."""
    per_seed = [[r[key] for r in runs[label]["rows"]] for runs in runs_by_seed.values()]
    n = min(len(c) for c in per_seed)
    steps = np.asarray([r["step"] for r in next(iter(runs_by_seed.values()))[label]["rows"][:n]])
    return steps, np.asarray([c[:n] for c in per_seed], dtype=float)


def primary_metric(final_eval: dict) -> Optional[str]:
    """The dev metric the reports lead with: the first of accuracy, F1, Matthews, ROUGE-1, BLEU-4 that was measured."""
    for k in ("accuracy", "f1", "matthews", "rouge1", "bleu4"):
        if k in final_eval:
            return k
    return None
