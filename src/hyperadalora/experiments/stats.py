"""Statistics over seeds: mean, sample standard deviation, the 95% Student-t interval of the mean (`stats`,
`t_interval`), and the interval of paired differences or ratios (`interval_of`)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy.stats import t as student_t


def t_interval(values, level: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """The ``level`` Student-t interval of the mean of ``values`` (sample standard deviation, n - 1 degrees of
    freedom); (None, None) for fewer than two values."""
    a = np.asarray([float(v) for v in values], float)
    if len(a) < 2:
        return None, None
    half = float(student_t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return float(a.mean()) - half, float(a.mean()) + half


def stats(values, missing: Optional[str] = None) -> dict:
    """Mean, sample standard deviation (n - 1), the 95% t-interval of the mean (``ci95``), min, max over the values
    that are numbers; ``n`` counts them of ``n_total``; ``missing``: what a seed without a number means (e.g. "not
    reached"), shown by `fmt_stat`."""
    values = list(values)
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))]
    out = {"n": len(vals), "n_total": len(values), "values": [None if v is None else v for v in values]}
    if vals:
        a = np.asarray(vals)
        out.update(mean=float(a.mean()), std=float(a.std(ddof=1)) if len(a) > 1 else 0.0, min=float(a.min()),
                   max=float(a.max()), ci95=list(t_interval(a)) if len(a) > 1 else None)
    else:
        out.update(mean=None, std=None, min=None, max=None, ci95=None)
    if missing:
        out["missing"] = missing
    return out


def interval_of(values) -> dict:
    """{mean, std (sample), ci95, n, values} of a list of paired differences or ratios."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    s = stats(vals)
    return {"mean": s["mean"], "std": s["std"], "ci95": s["ci95"], "n": s["n"], "values": vals}
