"""The analysis of the lr sweep, fixed before its runs together with its decision rule (`design.DECISION_RULE`):
`analyse` computes every number of a task's report from its cells, `verdict_of` applies the rule."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from ..stats import interval_of, stats
from .cells import cell_name
from .design import ADVANTAGE_RATIO, ADVANTAGE_WINDOW, LABELS, METHODS, SweepTask

def score_at(cell: dict, step: int, key: str = "score") -> Optional[float]:
    for e in cell["evals"]:
        if e["step"] == step:
            return e[key]
    return None


def choose_lr(spec: SweepTask, grid: dict, method: str, step: int, key: str) -> Optional[float]:
    """The lr whose mean ``key`` score over its seeds is best (``key``: score_a / score_b / score)."""
    best, best_u = None, -math.inf
    for lr, cells in grid[method].items():
        vals = [score_at(c, step, key) for c in cells.values()]
        vals = [v for v in vals if v is not None]
        if vals and spec.utility(float(np.mean(vals))) > best_u:
            best, best_u = lr, spec.utility(float(np.mean(vals)))
    return best


def mean_curve(grid: dict, method: str, step: int, key: str = "score", seeds=None) -> dict:
    """{lr: mean score over seeds} at ``step`` (``seeds``: only these)."""
    out = {}
    for lr, cells in sorted(grid[method].items()):
        vals = [v for v in (score_at(c, step, key) for s, c in cells.items() if seeds is None or s in seeds)
                if v is not None]
        if vals:
            out[lr] = float(np.mean(vals))
    return out


def good_window(spec: SweepTask, curve: dict) -> dict:
    """Decades of lr within ``spec.tolerance`` of the curve's best (log-linear interpolation of the crossings);
    ``censored`` where the window reaches an end of the grid (then it is a lower bound)."""
    if not curve:
        return {"decades": None, "censored": None, "lo": None, "hi": None}
    lrs = sorted(curve)
    x = np.log10(lrs)
    u = np.asarray([spec.utility(curve[lr]) for lr in lrs])
    i = int(np.argmax(u))
    level = u[i] - spec.tolerance
    ends = []
    for step in (-1, 1):
        j = i
        while 0 <= j + step < len(lrs) and u[j + step] >= level:
            j += step
        if 0 <= j + step < len(lrs):  # crossing between j and j + step
            frac = (u[j] - level) / (u[j] - u[j + step])
            ends.append((x[j] + frac * (x[j + step] - x[j]), False))
        else:
            ends.append((x[j], True))
    (lo, lo_c), (hi, hi_c) = ends
    return {"decades": float(hi - lo), "censored": bool(lo_c or hi_c), "lo": float(10 ** lo), "hi": float(10 ** hi)}


def window_of(spec: SweepTask, grid: dict, method: str, step: int, seeds=None,
              tolerance: Optional[float] = None) -> dict:
    """`good_window` of the method's mean curve at ``step`` over ``seeds`` (all: None), at ``tolerance`` (the task's:
    None)."""
    if tolerance is not None:
        spec = dataclasses.replace(spec, tolerance=tolerance)
    return good_window(spec, mean_curve(grid, method, step, seeds=seeds))


def ratio_of(a: dict, b: dict) -> Optional[float]:
    """Window ``a`` over window ``b`` (decades); None where either is missing or ``b`` is empty."""
    return a["decades"] / b["decades"] if a["decades"] is not None and b["decades"] else None


def steps_to(spec: SweepTask, cell: dict, target: float, key: str = "score_b") -> Optional[float]:
    """The first step at which the dev score reaches ``target``, interpolated linearly between evaluations (the
    first evaluation itself when it is already there); None when never."""
    points = [(e["step"], spec.utility(e[key])) for e in sorted(cell["evals"], key=lambda e: e["step"])]
    goal = spec.utility(target)
    prev = None
    for step, u in points:
        if u >= goal:
            if prev is None:
                return float(step)
            (s0, u0) = prev
            return float(s0 + (goal - u0) / (u - u0) * (step - s0)) if u != u0 else float(step)
        prev = (step, u)
    return None


def auc(spec: SweepTask, cell: dict, key: str = "score_b") -> float:
    """The dev score averaged over the run (trapezoid over the evaluations, normalised by their span)."""
    points = sorted((e["step"], e[key]) for e in cell["evals"])
    steps = np.asarray([p[0] for p in points], float)
    vals = np.asarray([p[1] for p in points], float)
    return float(np.trapezoid(vals, steps) / (steps[-1] - steps[0])) if len(steps) > 1 else float(vals[0])


def fit_shift(spec: SweepTask, hyper: dict, ada: dict) -> Optional[float]:
    """log10 s minimising the mean squared difference between HyperAdaLoRA's score at lr and AdaLoRA's at s * lr
    (AdaLoRA's curve interpolated linearly in log10 lr; only lrs whose shifted value falls inside AdaLoRA's grid,
    at least 3 of them)."""
    if len(hyper) < 3 or len(ada) < 3:
        return None
    ax = np.log10(sorted(ada))
    ay = np.asarray([ada[lr] for lr in sorted(ada)])
    hx = np.log10(sorted(hyper))
    hy = np.asarray([hyper[lr] for lr in sorted(hyper)])
    best, best_err = None, math.inf
    for d in np.arange(-1.5, 1.5001, 0.005):
        inside = (hx + d >= ax[0] - 1e-9) & (hx + d <= ax[-1] + 1e-9)
        if inside.sum() < 3:
            continue
        err = float(np.mean((hy[inside] - np.interp(hx[inside] + d, ax, ay)) ** 2))
        if err < best_err - 1e-15:
            best, best_err = float(d), err
    return best


def analyse(spec: SweepTask, cells: list, lrs: list, seeds: list) -> dict:
    """Every number of the report for one task (the items of the module's docstring and the verdict)."""
    grid = {m: {} for m in METHODS}
    for c in cells:
        grid[c["method"]].setdefault(c["lr"], {})[c["seed"]] = c
    expected = {(m, lr, s) for m in METHODS for lr in lrs for s in seeds}
    present = {(c["method"], c["lr"], c["seed"]) for c in cells}
    missing = sorted(expected - present)
    steps = sorted({e["step"] for c in cells for e in c["evals"]})
    final = spec.steps
    out = {"missing": [cell_name(*m) for m in missing], "budgets": steps, "final_step": final}
    if not cells:
        return {**out, "verdict": "not decided", "why": "no cell has run yet"}

    # 1. score vs lr, per budget
    out["score_vs_lr"] = {m: {f"{lr:g}": {str(step): stats([score_at(c, step) for c in grid[m][lr].values()])
                                          for step in steps}
                              for lr in sorted(grid[m])} for m in METHODS}
    # best lr on the whole dev set (in-sample: for the bracketing check and the peaks, not for the verdict)
    full_best = {m: choose_lr(spec, grid, m, final, "score") for m in METHODS}
    bracket = {}
    for m in METHODS:
        tried = sorted(grid[m])
        b = full_best[m]
        bracket[m] = {"best_lr": b, "bracketed": b is not None and len(tried) >= 3 and tried[0] < b < tried[-1],
                      "edge": None if b is None else ("smallest" if b == tried[0] else "largest" if b == tried[-1]
                                                      else None)}
    out["bracketing"] = bracket

    # 2. best against best, out of sample, at every budget
    def best_vs_best(choose_key: str, score_key: str, step: int) -> dict:
        chosen = {m: choose_lr(spec, grid, m, step, choose_key) for m in METHODS}
        per_method = {m: [score_at(grid[m][chosen[m]].get(s, {"evals": []}), step, score_key) if chosen[m] else None
                          for s in seeds] for m in METHODS}
        def diff(m1: str, m2: str) -> dict:  # paired by seed, positive = m1 better
            return interval_of([None if x is None or y is None else spec.utility(x) - spec.utility(y)
                                for x, y in zip(per_method[m1], per_method[m2])])

        return {"chosen_lr": chosen, "scores": {m: stats(v) for m, v in per_method.items()},
                "diff_hyper_minus_ada": diff("hyperadalora", "adalora"), "seeds": seeds,
                # LoRA, the anchor (reported, not part of the rule)
                "diff_lora_minus_ada": diff("lora", "adalora"), "diff_lora_minus_hyper": diff("lora", "hyperadalora")}

    out["best_vs_best"] = {str(step): best_vs_best("score_a", "score_b", step) for step in steps}
    out["best_vs_best_reverse"] = {str(step): best_vs_best("score_b", "score_a", step) for step in steps}
    bvb = out["best_vs_best"].get(str(final))

    # 3. the good-lr window at the full budget (whole dev set, mean over seeds)
    out["window"] = {m: good_window(spec, mean_curve(grid, m, final)) for m in METHODS}
    wh, wa = out["window"]["hyperadalora"], out["window"]["adalora"]
    out["window_ratio"] = (wh["decades"] / wa["decades"] if wh["decades"] is not None and wa["decades"]
                           else None)

    # 4. speed at each method's chosen lr (half A), on half B: a common target and the area under the curve
    speed = None
    if bvb is not None and all(bvb["chosen_lr"][m] is not None for m in ("adalora", "hyperadalora")):
        finals = {m: bvb["scores"][m]["mean"] for m in ("adalora", "hyperadalora")}
        worse = min(finals.values(), key=spec.utility)
        target = worse - spec.tolerance if spec.higher_is_better else worse + spec.tolerance
        per_seed, ratios, auc_diffs = {}, [], []
        for s in seeds:
            hc = grid["hyperadalora"][bvb["chosen_lr"]["hyperadalora"]].get(s)
            ac = grid["adalora"][bvb["chosen_lr"]["adalora"]].get(s)
            if hc is None or ac is None:
                continue
            sh, sa = steps_to(spec, hc, target), steps_to(spec, ac, target)
            ratio = sh / sa if sh is not None and sa is not None else None
            ratios.append(ratio)
            d = spec.utility(auc(spec, hc)) - spec.utility(auc(spec, ac))
            auc_diffs.append(d)
            per_seed[str(s)] = {"hyperadalora_steps": sh, "adalora_steps": sa, "ratio": ratio, "auc_diff": d}
        speed = {"target": target, "per_seed": per_seed,
                 "missed": {"hyperadalora": sum(p["hyperadalora_steps"] is None for p in per_seed.values()),
                            "adalora": sum(p["adalora_steps"] is None for p in per_seed.values())},
                 "ratio": interval_of(ratios), "all_reached": None not in ratios and bool(ratios),
                 "auc_diff": interval_of(auc_diffs)}
    out["speed"] = speed

    # 5. the shift s, per seed and on the means; the peaks (in-sample, whole dev set)
    shifts = []
    for s in seeds:
        h = {lr: score_at(c[s], final) for lr, c in grid["hyperadalora"].items() if s in c}
        a = {lr: score_at(c[s], final) for lr, c in grid["adalora"].items() if s in c}
        shifts.append(fit_shift(spec, {k: spec.utility(v) for k, v in h.items() if v is not None},
                                {k: spec.utility(v) for k, v in a.items() if v is not None}))
    d_mean = fit_shift(spec, {k: spec.utility(v) for k, v in mean_curve(grid, "hyperadalora", final).items()},
                       {k: spec.utility(v) for k, v in mean_curve(grid, "adalora", final).items()})
    di = interval_of(shifts)
    out["shift"] = {"log10_s_per_seed": shifts, "log10_s": di,
                    "s": None if di["mean"] is None else 10 ** di["mean"],
                    "s_ci95": None if not di["ci95"] else [10 ** di["ci95"][0], 10 ** di["ci95"][1]],
                    "s_of_means": None if d_mean is None else 10 ** d_mean}
    peaks = {m: stats([score_at(grid[m][full_best[m]].get(s, {"evals": []}), final) for s in seeds])
             if full_best[m] else None for m in METHODS}
    peak_diff = None
    if full_best["hyperadalora"] and full_best["adalora"]:
        peak_diff = interval_of([
            None if h is None or a is None else spec.utility(h) - spec.utility(a)
            for h, a in zip(peaks["hyperadalora"]["values"], peaks["adalora"]["values"])])
    out["peaks"] = {"per_method": peaks, "diff_hyper_minus_ada": peak_diff}

    out["robustness"] = robustness(spec, grid, seeds, steps, final)
    # the verdict
    out.update(verdict_of(spec, out, missing, bracket))
    return out


TOLERANCE_MULTIPLES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the robustness table's tolerances, x the pre-registered one


def robustness(spec: SweepTask, grid: dict, seeds: list, budgets: list, final: int) -> dict:
    """How firmly rule (b) holds (issue 32; reported beside the verdict, not part of the rule): the window ratio
    HyperAdaLoRA / AdaLoRA against the tolerance (a table at `TOLERANCE_MULTIPLES` of the pre-registered one, and
    the ranges of tolerance over which the rule holds, from a fine scan), with each seed left out and each seed
    alone, at every budget, and which end of the window widens."""
    def ratio(step=final, use=None, tolerance=None) -> dict:
        wh = window_of(spec, grid, "hyperadalora", step, use, tolerance)
        wa = window_of(spec, grid, "adalora", step, use, tolerance)
        r = ratio_of(wh, wa)
        return {"ratio": r, "holds": bool(r is not None and r >= ADVANTAGE_WINDOW), "hyperadalora": wh,
                "adalora": wa}

    table = [{"tolerance": spec.tolerance * k, **ratio(tolerance=spec.tolerance * k)} for k in TOLERANCE_MULTIPLES]
    scan = np.round(np.linspace(0.25, 3.0, 276) * spec.tolerance, 10)
    holds = [ratio(tolerance=float(t))["holds"] for t in scan]
    ranges = []  # the runs of consecutive scanned tolerances at which the rule holds: [first, last]
    for i, (t, h) in enumerate(zip(scan, holds)):
        if h and (i == 0 or not holds[i - 1]):
            ranges.append([float(t), float(t)])
        elif h:
            ranges[-1][1] = float(t)
    wh, wa = ratio()["hyperadalora"], ratio()["adalora"]
    sides = None
    if None not in (wh["lo"], wh["hi"], wa["lo"], wa["hi"]):
        sides = {"low_end_decades": float(math.log10(wa["lo"] / wh["lo"])),
                 "high_end_decades": float(math.log10(wh["hi"] / wa["hi"])),
                 "hyperadalora_censored": wh["censored"], "adalora_censored": wa["censored"]}
    return {"by_tolerance": table, "holds_for_tolerance": ranges,
            "scan": {"from": float(scan[0]), "to": float(scan[-1]), "points": len(scan)},
            "leave_one_seed_out": {str(s): ratio(use=[x for x in seeds if x != s]) for s in seeds} if len(seeds) > 1
            else {},
            "single_seed": {str(s): ratio(use=[s]) for s in seeds},
            "by_budget": {str(step): ratio(step=step) for step in budgets}, "sides": sides}


def verdict_of(spec: SweepTask, out: dict, missing: list, bracket: dict) -> dict:
    bvb = out["best_vs_best"].get(str(out["final_step"]))
    ci = bvb["diff_hyper_minus_ada"]["ci95"] if bvb else None
    rule = {"a": bool(ci and ci[0] > 0),
            "b": bool(out["window_ratio"] is not None and out["window_ratio"] >= ADVANTAGE_WINDOW),
            "c": bool(out["speed"] and out["speed"]["all_reached"] and out["speed"]["ratio"]["mean"] is not None
                      and out["speed"]["ratio"]["mean"] < ADVANTAGE_RATIO and out["speed"]["ratio"]["ci95"]
                      and out["speed"]["ratio"]["ci95"][1] < 1)}
    worse = bool(ci and ci[1] < 0)
    unbracketed = [m for m in ("adalora", "hyperadalora") if not bracket[m]["bracketed"]]
    if missing or unbracketed:
        why = []
        if missing:
            why.append(f"{len(missing)} cell(s) still to run")
        for m in unbracketed:
            edge = bracket[m]["edge"]
            why.append(f"{LABELS[m]}'s best lr is the {edge} tried: extend the grid" if edge else
                       f"{LABELS[m]} has too few lrs")
        return {"rule": rule, "verdict": "not decided", "why": "; ".join(why), "ada_better": worse}
    if any(rule.values()):
        held = ", ".join(k for k, v in rule.items() if v)
        return {"rule": rule, "verdict": "advantage", "why": "rule (" + held + ") holds", "ada_better": worse}
    return {"rule": rule, "verdict": "no advantage when tuned",
            "why": "none of (a), (b), (c) holds" + ("; AdaLoRA's tuned score is better (interval of (a) below 0)"
                                                     if worse else ""), "ada_better": worse}
