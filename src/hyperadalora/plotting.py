"""Loss-curve plots (matplotlib, headless)."""

from __future__ import annotations

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend, imported on first use rather than with this module: pyplot
    is slow to import, and setting the backend at import would change it for every program that imports the
    library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Lay out, save and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def smooth(values, window: int = 25) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curves(curves: dict, path: str, title: str = "", window: int = 25, key: str = "task_loss",
                     xlabel: str = "optimizer step") -> str:
    """curves: {label: list of metrics rows}; raw (faint) and smoothed training loss per label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, rows) in enumerate(curves.items()):
        steps = [r["step"] for r in rows]
        values = [r[key] for r in rows]
        color = f"C{i}"
        ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth(values, window), color=color, linewidth=2, label=f"{label} (smoothed, {window})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def rank_heatmap(steps: list, names: list, ranks, title: str = "rank per layer"):
    """A matplotlib Figure: the rank of every adapted layer (rows, in ``names`` order) at every logged step
    (columns); ``ranks`` is (len(names), len(steps)). The caller closes it (``plt.close(fig)``)."""
    plt = pyplot()
    ranks = np.asarray(ranks, dtype=float)
    fig, ax = plt.subplots(figsize=(8, max(2.5, min(12.0, 0.12 * len(names) + 1.5))), dpi=100)
    image = ax.imshow(ranks, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5) if steps else None)
    if len(names) <= 40:
        ax.set_yticks(range(len(names)), names, fontsize=6)
    else:
        ax.set_ylabel(f"adapted layer (0..{len(names) - 1}, model order)")
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    return fig
