"""The experiments' plots: training-loss curves over seeds with their bands (`plot_loss_bands`), the paired loss gap
to a reference (`plot_gap_bands`), dev metrics at the evaluations (`plot_eval_points`); every line plot is labelled
and saved alike (`save_line_plot`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..plotting import pyplot, save_figure, smooth


def save_line_plot(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Label, grid, legend and save a line plot the way every experiment's plots look; returns ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_loss_bands(series: dict, path: str, title: str, window: int, target: Optional[float] = None,
                    marks: Optional[dict] = None, ylabel: str = "training task loss") -> str:
    """series: {label: (steps, values[seed, step])}: raw mean (faint), smoothed mean (bold), min-max band of the
    smoothed curves over seeds; ``target`` a dashed line; ``marks`` {label: step} dotted verticals."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, (label, (steps, values)) in enumerate(series.items()):
        color = f"C{i}"
        sm = np.stack([smooth(v, window) for v in values])
        ax.plot(steps, values.mean(0), color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, sm.mean(0), color=color, linewidth=2,
                label=f"{label} (smoothed {window}" + (f", mean of {len(values)} seeds)" if len(values) > 1 else ")"))
        if len(values) > 1:
            ax.fill_between(steps, sm.min(0), sm.max(0), color=color, alpha=0.15)
        if marks and marks.get(label) is not None:
            ax.axvline(marks[label], color=color, linestyle=":", linewidth=1.2)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    return save_line_plot(fig, ax, path, "optimizer step", ylabel, title)


def seeds_note(seeds) -> str:
    """The seeds of a plot, for its title: ', 2 seeds' or ', seed 0'."""
    return f", {len(seeds)} seeds" if len(seeds) > 1 else f", seed {seeds[0]}"


def plot_gap_bands(series: dict, reference: str, path: str, title: str, window: int) -> str:
    """series: {label: (steps, values[seed, step])}: each label's loss minus ``reference``'s at the same step and
    seed (the same batch there), smoothed over ``window`` steps: the mean over seeds (bold) with its min-max band.
    Below zero = below the reference. Shows *when* a method is ahead or behind, which one ratio cannot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ref = series[reference][1]
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1, label=f"{reference} (reference)")
    for i, (label, (steps, values)) in enumerate(series.items()):
        if label == reference:
            continue
        n = min(values.shape[1], ref.shape[1])
        sm = np.stack([smooth(d, window) for d in values[:, :n] - ref[:, :n]])
        ax.plot(steps[:n], sm.mean(0), color=f"C{i}", linewidth=2,
                label=f"{label} (smoothed {window}" + (f", mean of {len(values)} seeds)" if len(values) > 1 else ")"))
        if len(values) > 1:
            ax.fill_between(steps[:n], sm.min(0), sm.max(0), color=f"C{i}", alpha=0.15)
    return save_line_plot(fig, ax, path, "optimizer step", f"training task loss minus {reference}'s, same batch",
                          title)


def plot_eval_points(series: dict, path: str, title: str, ylabel: str) -> str:
    """series: {label: {step: stats dict}}: the mean with a min-max error bar per checkpoint."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, points) in enumerate(series.items()):
        steps = sorted(points)
        mean = [points[s]["mean"] for s in steps]
        lo = [points[s]["mean"] - points[s]["min"] for s in steps]
        hi = [points[s]["max"] - points[s]["mean"] for s in steps]
        ax.errorbar(steps, mean, yerr=[lo, hi], color=f"C{i}", marker="o", capsize=3, label=label)
    return save_line_plot(fig, ax, path, "optimizer step", ylabel, title)
