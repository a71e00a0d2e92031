"""The goal the project holds HyperAdaLoRA to (issue 6), checked on a `convergence` result (`goal_check`), and the
reports' "Goal check" section (`goal_table`, `goal_section`)."""

from __future__ import annotations

import numpy as np

from .convergence import DROP_FRACTION
from .report import markdown_table

# The goal the project holds itself to (issue 6): on the classification tasks the method reaches the reference's final
# training loss in at most 0.8x its steps and 0.8x its training time, with its final dev accuracy within 1 point; on
# instruction tuning its BLEU-4 and ROUGE-1 are within 0.5 of the reference's (no speed bound: `goal_check(speed=False)`).
GOAL_STEPS, GOAL_TIME = 0.8, 0.8
CLASSIFICATION_BOUND = (1.0, 100.0)  # (largest drop allowed, in points; points per unit): 1 point of a 0-1 metric
GENERATION_QUALITY = {"bleu4": (0.5, 1.0), "rouge1": (0.5, 1.0)}  # BLEU-4 and ROUGE-1 are reported 0-100
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "matthews": "Matthews", "bleu4": "BLEU-4", "rouge1": "ROUGE-1"}


def goal_check(conv: dict, label: str, quality: dict, speed: bool = True) -> dict:
    """The goal, checked on one `convergence` result: ``label`` against its reference, over the seeds whose
    reference loss came down beyond its noise (`drop_target`; on the others there is no speed to measure).

    steps / time: the mean over those seeds of the ratio (a seed where ``label`` never reached the target fails
    it). quality: {metric: (largest drop allowed in points, points per unit)}; per metric the mean over all seeds of
    the label's final dev value minus the reference's, in points. Returns the numbers and a verdict: "met",
    "not met", or "not measurable" (no seed's reference loss came down). ``speed=False``: a goal on the quality
    alone (instruction tuning); the steps and time ratios are still measured, for information."""
    ref = conv["reference"]
    out = {"seeds": len(conv["per_seed"]), "goal_steps": GOAL_STEPS, "goal_time": GOAL_TIME, "quality": {},
           "speed_in_goal": speed}
    for metric, (bound, scale) in quality.items():
        diffs = [p["methods"][label].get(f"dev_{metric}") for p in conv["per_seed"].values()]
        refs = [p["methods"][ref].get(f"dev_{metric}") for p in conv["per_seed"].values()]
        pairs = [(a, b) for a, b in zip(diffs, refs) if a is not None and b is not None]
        if pairs:
            points = scale * float(np.mean([a - b for a, b in pairs]))
            out["quality"][metric] = {"points": points, "bound": bound, "ok": points >= -bound}
    quality_ok = all(q["ok"] for q in out["quality"].values())
    quality_verdict = ("met" if quality_ok else "not met") if out["quality"] else "not measurable"
    gaps = [p["methods"][label].get("loss_gap") for p in conv["per_seed"].values()]
    out["loss_gap"] = float(np.mean(gaps)) if gaps and None not in gaps else None  # beside the verdict, all seeds
    seeds = [s for s, p in conv["per_seed"].items() if p["target_90"] is not None]
    out["measurable_seeds"] = len(seeds)
    if not seeds:
        return {**out, "steps_ratio": None, "time_ratio": None, "not_reached": 0, "seeds_within_goal": 0,
                "reference_drop": None, "verdict": "not measurable" if speed else quality_verdict}
    rows = [conv["per_seed"][s]["methods"][label] for s in seeds]
    # the reference's drop, start - final smoothed loss: drop_target's level is start - DROP_FRACTION * drop
    out["reference_drop"] = float(np.mean([(conv["per_seed"][s]["target_90"] - conv["per_seed"][s]["target_loss"])
                                           / (1 - DROP_FRACTION) for s in seeds]))
    steps, times = [r["steps_ratio"] for r in rows], [r["time_ratio"] for r in rows]
    not_reached = sum(v is None for v in steps)
    out.update(not_reached=not_reached,
               steps_ratio=None if not_reached else float(np.mean(steps)),
               time_ratio=None if not_reached or None in times else float(np.mean(times)),
               seeds_within_goal=sum(v is not None and v <= GOAL_STEPS for v in steps))
    if not speed:
        return {**out, "verdict": quality_verdict}
    met = (out["steps_ratio"] is not None and out["steps_ratio"] <= GOAL_STEPS and out["time_ratio"] is not None
           and out["time_ratio"] <= GOAL_TIME and quality_ok)
    return {**out, "verdict": "met" if met else "not met"}


def speed_in_goal(checks: dict) -> bool:
    """Whether the speed bound is part of these `goal_check` results' goal (the table's headers and the section's
    wording follow it)."""
    return all(g.get("speed_in_goal", True) for g in checks.values())


def goal_table(checks: dict) -> str:
    """Markdown table of `goal_check` results, one row per name (e.g. task), with the paired loss gap beside them:
    it needs no target, so it still measures where the verdict is "not measurable"."""
    rows = []
    speed = speed_in_goal(checks)
    for name, g in checks.items():
        if g["measurable_seeds"] == 0:
            steps = time = f"n/a: the reference's loss did not come down beyond its noise on any of {g['seeds']} seeds"
        else:
            steps = ("never reached on " + str(g["not_reached"]) + " seed(s)" if g["steps_ratio"] is None
                     else f"{g['steps_ratio']:.2f} ({g['seeds_within_goal']} of {g['measurable_seeds']} seeds "
                          f"<= {g['goal_steps']})")
            time = "n/a" if g["time_ratio"] is None else f"{g['time_ratio']:.2f}"
        quality = ", ".join(f"{METRIC_NAMES.get(m, m)} {q['points']:+.2f} (>= -{q['bound']:g}{'' if q['ok'] else ': no'})"
                            for m, q in g["quality"].items()) or "n/a"
        drop = "n/a" if g["reference_drop"] is None else f"{g['reference_drop']:.3f}"
        gap = "n/a" if g.get("loss_gap") is None else f"{g['loss_gap']:+.4f}"
        rows.append([name, drop, gap, steps, time, quality, f"**{g['verdict']}**"])
    return markdown_table(["", "the reference's loss drop (start - final, smoothed)",
                           "loss gap to the reference, same batches (all seeds)",
                           *((f"steps ratio, mean (goal <= {GOAL_STEPS})", f"time ratio, mean (goal <= {GOAL_TIME})")
                             if speed else ("steps ratio, mean (not part of this goal)",
                                            "time ratio, mean (not part of this goal)")),
                           "final dev quality vs the reference, points (goal)", "verdict"], rows)


def goal_section(checks: dict, quality: str) -> list[str]:
    """The reports' "Goal check" section: the goal in words (``quality``: its dev-quality part) and `goal_table`."""
    measure = ("Speed: means over the seeds on which AdaLoRA's loss came down beyond its noise (on the others there "
               "is no speed to measure); a seed on which the method never reaches the target fails it.")
    if speed_in_goal(checks):
        goal = (f"AdaLoRA's final smoothed training loss in <= {GOAL_STEPS}x its steps and <= {GOAL_TIME}x its "
                f"training time, {quality}. {measure}")
    else:
        goal = (f"{quality} (the speed bound, <= {GOAL_STEPS}x AdaLoRA's steps and time to its final training "
                f"loss, is set for the classification tasks). The steps and time ratios are given for information. "
                f"{measure}")
    return ["## Goal check", "", f"The goal we hold HyperAdaLoRA to: {goal}", "", goal_table(checks), ""]
