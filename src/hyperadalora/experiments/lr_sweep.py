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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np

from .common import (DEFAULT_ALPACA_FILE, _parse_lrs, _plt, _same_args, as_options, base_args, command_line, default_glue_dir,
                     environment, fmt, glue_task_available, markdown_table, output_dir, repo_path, report_header,
                     sanitize, save_line_plot, seed_list, stats, t_interval, train_run, write_outputs)

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


# ---------------------------------------------------------------------------------------------- cells
def cell_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def cell_args(spec: SweepTask, opts, method: str, lr: float, seed: int, out: str):
    """The TrainArgs of one cell (the options that were set override the task's defaults)."""
    data_path = None
    if spec.data_path and opts.data_path:  # --data-path: another instruction file instead of the Alpaca demo
        data_path = os.path.normpath(os.path.abspath(opts.data_path[0]))
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"lr-sweep: --data-path {opts.data_path[0]!r} does not exist.")
    elif spec.data_path:
        data_path = repo_path(spec.data_path)
        if data_path is None:
            raise FileNotFoundError(f"lr-sweep: {spec.name}: {spec.data_path} (relative to the repository root) does "
                                    f"not exist.")
    kwargs = dict(method=method, task=spec.task, max_steps=spec.steps, batch_size=spec.batch_size, lr=lr, seed=seed,
                  max_length=spec.max_length, eval_every=spec.eval_every, max_eval_examples=spec.max_eval_examples,
                  gen_eval_examples=0, data_path=data_path,
                  output_dir=os.path.join(out, "runs", spec.name, cell_name(method, lr, seed)))
    if spec.model:
        kwargs["model"] = spec.model
    if spec.task != "alpaca":
        kwargs["data_dir"] = default_glue_dir(opts)
    args = base_args(opts, **kwargs)
    return dataclasses.replace(args, lr=lr, seed=seed)  # the grid's lr, never --lr


def dev_halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two fixed random halves (A, B) of a dev set of ``n`` examples (indices in dev-set order)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def eval_scores(spec: SweepTask, row: dict) -> dict:
    """{score, score_a, score_b} of one evaluation row (written with ``eval_details``)."""
    if spec.score == "accuracy":
        values = np.frombuffer(row["correct"].encode(), dtype=np.uint8) - ord("0")
    else:
        values = np.asarray(row["example_losses"], float)
    a, b = dev_halves(len(values))
    return {"score": float(np.nanmean(values)), "score_a": float(np.nanmean(values[a])),
            "score_b": float(np.nanmean(values[b])), "n": int(len(values))}


def cell_record(spec: SweepTask, run: dict, lr: float, seed: int) -> dict:
    """The small record of one finished run: its scores at every evaluation, its training loss per 10 steps and its
    timings, with the arguments that identify it (for ``--reuse``)."""
    s = run["summary"]
    losses = np.asarray([r["task_loss"] for r in run["rows"]], float)
    return {"task": spec.name, "method": s["method"], "lr": lr, "seed": seed,
            "evals": [{"step": int(e["step"]), **eval_scores(spec, e), "eval_loss": e.get("eval_loss")}
                      for e in run["evals"]],
            "loss_per_10": [round(float(v), 5) for v in
                            (losses[: len(losses) // 10 * 10].reshape(-1, 10).mean(1) if len(losses) >= 10 else [])],
            "final_task_loss": s.get("final_task_loss"), "total_rank": s.get("total_rank"),
            "nonfinite_steps": s.get("nonfinite_steps"), "train_time_s": s.get("train_time_s"),
            "wall_time_s": s.get("wall_time_s"), "median_step_s": s.get("median_step_s"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": json.loads(json.dumps(dataclasses.asdict(run["args"]), default=str)),
            "hypernetwork_options": s.get("hypernetwork_options", {})}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: str) -> bool:
    """Claim a cell for this process (a lock file beside it, created exclusively); a lock left by a process that
    is gone is taken over. False when another live process holds it."""
    lock = path + ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            try:
                os.remove(lock)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def read_cell(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"lr-sweep: {path} is not valid JSON ({e}): delete it to run the cell again.") from None


def write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(sanitize(data), f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_cell(spec: SweepTask, opts, method: str, lr: float, seed: int, out: str) -> Optional[dict]:
    """The cell's record: reused when its file holds a run with the same arguments (``--reuse``), skipped (None) while
    another process runs it, else trained now."""
    args = cell_args(spec, opts, method, lr, seed, out)
    path = os.path.join(out, "cells", spec.name, cell_name(method, lr, seed) + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cell = read_cell(path)
    if cell is not None and (opts.reuse or opts.report_only) and _same_args(cell, args):
        return cell
    if opts.report_only:
        return None
    if not claim(path):
        print(f"[{spec.name} {cell_name(method, lr, seed)}] running in another process: skipped here", flush=True)
        return None
    try:
        cell = read_cell(path)  # finished by another process between the first look and the claim
        if cell is not None and opts.reuse and _same_args(cell, args):
            return cell
        print(f"[{spec.name} {cell_name(method, lr, seed)}] {method} at lr {lr:g}, seed {seed}: {spec.steps} steps "
              f"-> {args.output_dir}", flush=True)
        run = train_run(args, reuse=opts.reuse, eval_details=True)
        if run["reused"] and not all(("correct" in e or "example_losses" in e) for e in run["evals"]):
            run = train_run(args, reuse=False, eval_details=True)  # reused run made without the details
        run["args"] = args
        cell = cell_record(spec, run, lr, seed)
        write_json_atomic(path, cell)
        return cell
    finally:
        try:
            os.remove(path + ".lock")
        except FileNotFoundError:
            pass


def cell_order(lrs, seeds) -> list:
    """(seed, lr) in the order they run: seed by seed, each seed's grid from its middle outwards (a sweep stopped
    early has whole seeds and the middle of the grid)."""
    mid = (len(lrs) - 1) / 2
    by_centre = sorted(lrs, key=lambda lr: (abs(lrs.index(lr) - mid), -lr))
    return [(seed, lr) for seed in seeds for lr in by_centre]


# ---------------------------------------------------------------------------------------------- analysis
def score_at(cell: dict, step: int, key: str = "score") -> Optional[float]:
    for e in cell["evals"]:
        if e["step"] == step:
            return e[key]
    return None


def fmt_ci(values, f: str = "{:.4f}") -> str:
    """``mean [lo, hi] (n)`` with the 95% t-interval; one value: itself."""
    s = stats(values)
    if s["mean"] is None:
        return "n/a"
    if s["n"] < 2:
        return f.format(s["mean"]) + f" (n={s['n']})"
    lo, hi = s["ci95"]
    return f"{f.format(s['mean'])} [{f.format(lo)}, {f.format(hi)}] (n={s['n']})"


def interval_of(values) -> dict:
    """{mean, std (sample), ci95, n, values} of a list of paired differences or ratios."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    s = stats(vals)
    return {"mean": s["mean"], "std": s["std"], "ci95": s["ci95"], "n": s["n"], "values": vals}


def choose_lr(spec: SweepTask, grid: dict, method: str, step: int, key: str) -> Optional[float]:
    """The lr whose mean ``key`` score over its seeds is best (``key``: score_a / score_b / score)."""
    best, best_u = None, -math.inf
    for lr, cells in grid[method].items():
        vals = [score_at(c, step, key) for c in cells.values()]
        vals = [v for v in vals if v is not None]
        if vals and spec.utility(float(np.mean(vals))) > best_u:
            best, best_u = lr, spec.utility(float(np.mean(vals)))
    return best


def mean_curve(grid: dict, method: str, step: int, key: str = "score") -> dict:
    """{lr: mean score over seeds} at ``step``."""
    out = {}
    for lr, cells in sorted(grid[method].items()):
        vals = [v for v in (score_at(c, step, key) for c in cells.values()) if v is not None]
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
        diffs = [None if h is None or a is None else spec.utility(h) - spec.utility(a)
                 for h, a in zip(per_method["hyperadalora"], per_method["adalora"])]
        return {"chosen_lr": chosen, "scores": {m: stats(v) for m, v in per_method.items()},
                "diff_hyper_minus_ada": interval_of(diffs), "seeds": seeds}

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

    # the verdict
    out.update(verdict_of(spec, out, missing, bracket))
    return out


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
        return {"rule": rule, "verdict": "advantage", "why": f"rule (" + held + ") holds", "ada_better": worse}
    return {"rule": rule, "verdict": "no advantage when tuned",
            "why": "none of (a), (b), (c) holds" + ("; AdaLoRA's tuned score is better (interval of (a) below 0)"
                                                     if worse else ""), "ada_better": worse}


# ---------------------------------------------------------------------------------------------- report
def _plot_score_vs_lr(spec: SweepTask, analysis: dict, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    final = str(analysis["final_step"])
    for i, m in enumerate(METHODS):
        per_lr = analysis["score_vs_lr"][m]
        lrs = sorted(per_lr, key=float)
        if not lrs:
            continue
        x = np.asarray([float(v) for v in lrs])
        st = [per_lr[v][final] for v in lrs]
        ok = [s["mean"] is not None for s in st]
        x, st = x[ok], [s for s, k in zip(st, ok) if k]
        mean = np.asarray([s["mean"] for s in st])
        lo = np.asarray([s["ci95"][0] if s["ci95"] else s["mean"] for s in st])
        hi = np.asarray([s["ci95"][1] if s["ci95"] else s["mean"] for s in st])
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], color=f"C{i}", marker="o", capsize=3, label=LABELS[m])
    s = analysis.get("shift", {}).get("s_of_means")
    ada = analysis["score_vs_lr"]["adalora"]
    if s and ada:
        lrs = sorted(ada, key=float)
        ys = [ada[v][final]["mean"] for v in lrs]
        xs = [float(v) / s for v in lrs]
        ax.plot(xs, ys, color="C0", linestyle=":", label=f"AdaLoRA shifted: its score at lr plotted at lr / {s:.2f}")
    means = [st["mean"] for m in METHODS for per in analysis["score_vs_lr"][m].values()
             for st in [per.get(final, {})] if st.get("mean") is not None]
    if means:  # intervals of 2 seeds can span far beyond the scores: the axis follows the means
        pad = 0.1 * (max(means) - min(means)) + 0.02
        lo, hi = min(means) - pad, max(means) + pad
        ax.set_ylim(max(lo, 0.0) if spec.higher_is_better else lo, min(hi, 1.0) if spec.higher_is_better else hi)
    ax.set_xscale("log")
    return save_line_plot(fig, ax, path, "learning rate",
                          "dev accuracy" if spec.higher_is_better else "dev loss (mean per example)",
                          f"{spec.name}: dev score after {spec.steps} steps, mean and 95% interval over seeds")


def _plot_best_curves(spec: SweepTask, grid_cells: list, analysis: dict, path: str) -> Optional[str]:
    bvb = analysis["best_vs_best"].get(str(analysis["final_step"]))
    if not bvb:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, m in enumerate(METHODS):
        lr = bvb["chosen_lr"][m]
        cells = [c for c in grid_cells if c["method"] == m and c["lr"] == lr]
        if not cells:
            continue
        steps = sorted({e["step"] for c in cells for e in c["evals"]})
        vals = np.asarray([[score_at(c, s, "score_b") for s in steps] for c in cells], float)
        mean = np.nanmean(vals, 0)
        ax.plot(steps, mean, color=f"C{i}", marker="o", label=f"{LABELS[m]} at lr {lr:g} ({len(cells)} seeds)")
        if len(cells) > 1:
            ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=f"C{i}", alpha=0.15)
    if analysis.get("speed"):
        ax.axhline(analysis["speed"]["target"], color="gray", linestyle="--", linewidth=1, label="common target")
    return save_line_plot(fig, ax, path, "optimizer step",
                          ("dev accuracy" if spec.higher_is_better else "dev loss") + " on half B",
                          f"{spec.name}: each method at its lr chosen on half A (min-max band over seeds)")


def _ci_text(iv: Optional[dict], f: str = "{:+.4f}") -> str:
    if not iv or iv.get("mean") is None:
        return "n/a"
    if not iv.get("ci95"):
        return f.format(iv["mean"]) + f" (n={iv['n']})"
    return f"{f.format(iv['mean'])} [{f.format(iv['ci95'][0])}, {f.format(iv['ci95'][1])}] (n={iv['n']})"


def task_section(spec: SweepTask, a: dict, lrs: list, seeds: list, plots: list) -> list[str]:
    unit = "accuracy points" if spec.higher_is_better else "dev loss"
    scale = 100.0 if spec.higher_is_better else 1.0
    f = "{:.4f}"
    lines = [f"## {spec.name}", "",
             f"**Verdict: {a['verdict']}** ({a['why']}).", ""]
    if a.get("missing"):
        lines += [f"Cells still to run ({len(a['missing'])}): " + ", ".join(a["missing"][:40])
                  + (" ..." if len(a["missing"]) > 40 else ""), ""]
    if "score_vs_lr" not in a:
        return lines
    final = str(a["final_step"])
    lines += [f"### 1. Dev score vs learning rate after {spec.steps} steps (mean [95% interval] (seeds))", "",
              markdown_table(["lr"] + [LABELS[m] for m in METHODS],
                             [[f"{lr:g}"] + [fmt_ci(a["score_vs_lr"][m].get(f"{lr:g}", {}).get(final, {})
                                                    .get("values", []))
                                             for m in METHODS] for lr in lrs]), ""]
    lines += ["Best lr on the whole dev set: " + ", ".join(
        f"{LABELS[m]} {fmt(a['bracketing'][m]['best_lr'], '{:g}')}"
        + ("" if a["bracketing"][m]["bracketed"] else " (**not bracketed**)") for m in METHODS) + ".", ""]
    lines += [f"### 2. Best against best (lr chosen on dev half A, scored on half B)", "",
              "HyperAdaLoRA - AdaLoRA, paired by seed, in " + unit + " (positive = HyperAdaLoRA better); at every "
              "budget (the verdict reads the last):", ""]
    rows = []
    for step in a["budgets"]:
        b, r = a["best_vs_best"][str(step)], a["best_vs_best_reverse"][str(step)]
        d = {**b["diff_hyper_minus_ada"]}
        if d["mean"] is not None:
            d = {**d, "mean": d["mean"] * scale, "ci95": [v * scale for v in d["ci95"]] if d["ci95"] else None}
        rd = {**r["diff_hyper_minus_ada"]}
        if rd["mean"] is not None:
            rd = {**rd, "mean": rd["mean"] * scale, "ci95": [v * scale for v in rd["ci95"]] if rd["ci95"] else None}
        rows.append([step, " / ".join(fmt(b["chosen_lr"][m], "{:g}") for m in METHODS),
                     fmt_ci(b["scores"]["adalora"]["values"], f), fmt_ci(b["scores"]["hyperadalora"]["values"], f),
                     fmt_ci(b["scores"]["lora"]["values"], f), _ci_text(d, "{:+.2f}" if scale > 1 else "{:+.4f}"),
                     _ci_text(rd, "{:+.2f}" if scale > 1 else "{:+.4f}")])
    lines += [markdown_table(["step", "chosen lr (AdaLoRA / HyperAdaLoRA / LoRA)", "AdaLoRA on B", "HyperAdaLoRA on B",
                              "LoRA on B", "difference (a)", "reverse split (chosen on B, scored on A)"], rows), ""]
    lines += [f"### 3. The good-lr window (decades of lr within {spec.tolerance:g} of the method's own best, "
              f"whole dev set, step {spec.steps})", "",
              markdown_table(["method", "decades", "from", "to"],
                             [[LABELS[m], fmt(w["decades"], "{:.2f}") + (" (at least: reaches the grid's end)"
                                                                       if w["censored"] else ""),
                               fmt(w["lo"], "{:.2g}"), fmt(w["hi"], "{:.2g}")]
                              for m, w in a["window"].items()]), "",
              f"HyperAdaLoRA / AdaLoRA: {fmt(a['window_ratio'], '{:.2f}')} (rule (b): >= {ADVANTAGE_WINDOW}).", ""]
    sp = a.get("speed")
    if sp:
        rows = [[s, fmt(p["adalora_steps"], "{:.0f}", "never"), fmt(p["hyperadalora_steps"], "{:.0f}", "never"),
                 fmt(p["ratio"], "{:.2f}"), fmt(p["auc_diff"] * scale, "{:+.2f}" if scale > 1 else "{:+.4f}")]
                for s, p in sp["per_seed"].items()]
        auc_iv = {**sp["auc_diff"]}
        if auc_iv["mean"] is not None:
            auc_iv = {**auc_iv, "mean": auc_iv["mean"] * scale,
                      "ci95": [v * scale for v in auc_iv["ci95"]] if auc_iv["ci95"] else None}
        lines += ["### 4. Speed at each method's chosen lr (half B)", "",
                  f"Common target: the worse of the two methods' final half-B means, relaxed by the tolerance: "
                  f"{sp['target']:.4f}. Steps interpolated between evaluations (every {spec.eval_every}).", "",
                  markdown_table(["seed", "AdaLoRA steps", "HyperAdaLoRA steps", "ratio",
                                  "area under the dev curve, difference"], rows), "",
                  f"Ratio HyperAdaLoRA / AdaLoRA: {_ci_text(sp['ratio'], '{:.2f}')}; seeds that never reach the "
                  f"target: AdaLoRA {sp['missed']['adalora']}, HyperAdaLoRA {sp['missed']['hyperadalora']} (rule (c): "
                  f"< {ADVANTAGE_RATIO} with the interval below 1, every seed reaching it). Area under the dev-score "
                  f"curve, HyperAdaLoRA - AdaLoRA ({unit}; positive = better): "
                  f"{_ci_text(auc_iv, '{:+.2f}' if scale > 1 else '{:+.4f}')}.", ""]
    sh, pk = a["shift"], a["peaks"]
    pd = pk["diff_hyper_minus_ada"]
    if pd and pd["mean"] is not None:
        pd = {**pd, "mean": pd["mean"] * scale, "ci95": [v * scale for v in pd["ci95"]] if pd["ci95"] else None}
    lines += ["### 5. The shift: HyperAdaLoRA(lr) ~ AdaLoRA(s * lr)", "",
              f"s fitted per seed (least squares over the grid at step {spec.steps}): "
              + ", ".join(fmt(None if v is None else 10 ** v, "{:.2f}") for v in sh["log10_s_per_seed"])
              + f"; geometric mean {fmt(sh['s'], '{:.2f}')}"
              + (f" [95% interval {sh['s_ci95'][0]:.2f}, {sh['s_ci95'][1]:.2f}]" if sh["s_ci95"] else "")
              + f"; on the mean curves {fmt(sh['s_of_means'], '{:.2f}')}. Peaks (each method at its best lr on the "
              f"whole dev set, in-sample): HyperAdaLoRA - AdaLoRA {_ci_text(pd, '{:+.2f}' if scale > 1 else '{:+.4f}')}"
              f" {unit}.", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots if p] + [""]
    return lines


FULL_SIZE = """\
## Full-size run (the paper's setting)

On a GPU, with local copies of the paper's models and data (e.g. RoBERTa-base on GLUE, LLaMA-3.1-8B on Alpaca), the same
grid and rule apply; only the run length and the models change:

```
hyperadalora experiment lr-sweep --tasks sst2 --model /path/to/roberta-base --data-dir /path/to/glue \\
    --steps 3000 --lrs 1e-5,3e-5,1e-4,3e-4,1e-3,3e-3 --seeds 3 --device cuda --output-dir runs/experiments/lr-sweep-full
hyperadalora experiment lr-sweep --tasks alpaca --model /path/to/Llama-3.1-8B --data-path /path/to/alpaca_data.json \\
    --steps 2000 --lrs 3e-6,1e-5,3e-5,1e-4,3e-4 --seeds 2 --device cuda --output-dir runs/experiments/lr-sweep-full
```

Run two or more such processes side by side with `--reuse`: each claims the cells that no live process holds.
"""


def run_lr_sweep(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    names = [t.lower().replace("-", "") for t in (opts.tasks or list(TASKS))]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"lr-sweep: unknown task(s) {unknown}; choose from {', '.join(TASKS)}.")
    lrs = _parse_lrs(opts.lrs or LRS)
    if len(lrs) < 3:
        raise ValueError(f"--lrs {lrs}: give at least 3 learning rates (an optimum needs a smaller and a larger lr).")
    command, env = command_line(NAME, opts), environment()
    started = time.time()
    results = {"experiment": NAME, "command": command, "env": env, "decision_rule": DECISION_RULE, "lrs": lrs,
               "split_seed": SPLIT_SEED, "tasks": {}, "runs": []}
    lines = report_header("HyperAdaLoRA vs AdaLoRA, each at its own best learning rate (issue 23)", command, env,
                          {"methods": ", ".join(LABELS[m] for m in METHODS), "learning rates": ", ".join(
                              f"{v:g}" for v in lrs), "dev halves": f"a fixed random split (seed {SPLIT_SEED})"},
                          DECISION_RULE)
    sections, verdicts = [], []
    for name in names:
        spec = TASKS[name]
        if opts.steps:
            spec = dataclasses.replace(spec, steps=opts.steps, eval_every=max(1, min(spec.eval_every, opts.steps // 4)))
        if spec.task != "alpaca":
            ok, why = glue_task_available(spec.task, default_glue_dir(opts))
            if not ok:
                raise FileNotFoundError(f"lr-sweep: {spec.task}: {why}")
        seeds = seed_list(opts, spec.seeds)
        cells = []
        for seed, lr in cell_order(lrs, seeds):
            for method in METHODS:
                cell = run_cell(spec, opts, method, lr, seed, out)
                if cell is not None:
                    cells.append(cell)
        # cells finished by a process running beside this one count too
        for seed, lr in cell_order(lrs, seeds):
            for method in METHODS:
                if not any(c["method"] == method and c["lr"] == lr and c["seed"] == seed for c in cells):
                    cell = read_cell(os.path.join(out, "cells", spec.name, cell_name(method, lr, seed) + ".json"))
                    if cell is not None and _same_args(cell, cell_args(spec, opts, method, lr, seed, out)):
                        cells.append(cell)
        analysis = analyse(spec, cells, lrs, seeds)
        plots = [_plot_score_vs_lr(spec, analysis, os.path.join(out, f"score_vs_lr_{spec.name}.png")),
                 _plot_best_curves(spec, cells, analysis, os.path.join(out, f"best_curves_{spec.name}.png"))]
        cpu_s = sum(c.get("wall_time_s") or 0.0 for c in cells)
        sections += task_section(spec, analysis, lrs, seeds, plots)
        sections += [f"Compute: {len(cells)} runs, {cpu_s / 3600:.2f} h of run time in all (each run on "
                     f"{env['torch_threads']} thread(s); two processes side by side).", ""]
        verdicts.append([spec.name, f"**{analysis['verdict']}**", analysis["why"]])
        results["tasks"][spec.name] = {"settings": dataclasses.asdict(spec), "seeds": seeds, "analysis": analysis,
                                       "run_time_h": cpu_s / 3600}
        results["runs"] += [{k: v for k, v in c.items() if k not in ("args", "hypernetwork_options")} for c in cells]
    lines += ["## Verdict", "", markdown_table(["task", "verdict", "why"], verdicts), ""] + sections
    lines += [f"This report was written in {time.time() - started:.0f} s of this process (cells reused from earlier "
              f"processes count in the compute lines above, not here).", "", FULL_SIZE]
    return write_outputs(out, results, lines)


__all__ = ["run_lr_sweep", "analyse", "TASKS", "DECISION_RULE"]
