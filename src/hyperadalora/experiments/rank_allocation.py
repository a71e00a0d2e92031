"""``rank-allocation``: which adapted layers keep how much rank over training, AdaLoRA vs HyperAdaLoRA.

Both methods train with the same seeds, data order, budget schedule and steps; after every optimizer step
(after ``update_and_allocate``) the per-layer rank is recorded: HyperAdaLoRA's ``model.rank_pattern``; peft
AdaLoRA's ``peft_config["default"].rank_pattern`` (kept ranks per ``lora_E``; ``init_r`` everywhere until the
first masking). Written: a heatmap (layer x step) per method, the total rank (budget) over training, and the
final rank pattern by layer, by depth and by module type.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..methods import AdapterModel
from ..plotting import pyplot, save_figure
from .convergence import convergence, curves, primary_metric
from .options import as_options
from .plots import plot_loss_bands, save_line_plot
from .report import convergence_table, markdown_table, report_header, settings_of, write_outputs
from .runs import AdapterRecorder, run_variants
from .task_setup import output_dir, single_task_setup

NAME = "rank-allocation"
DEFAULTS = dict(task="sst2", steps=200, batch_size=16, lr=3e-3, max_length=64, max_eval_examples=300, seeds=1)
METHODS = {"adalora": {"method": "adalora"}, "hyperadalora": {"method": "hyperadalora"}}
SHORT = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attn.out", "intermediate.dense": "ffn.in", "output.dense": "ffn.out"}

FULL_SIZE = """\
## Full-size run (the paper's setting)

With the paper's NLU models (RoBERTa-base / DeBERTa-v3-base: 12 layers x 6 projections), batch 64, lr 1e-5,
r = 3 (init_r 3 -> target_r 2), gamma 0.1, on a GPU:

```
hyperadalora experiment rank-allocation --model /path/to/roberta-base --data-dir /path/to/glue --tasks mnli \\
    --steps 5000 --batch-size 64 --lr 1e-5 --max-length 256 --seeds 3 --device cuda \\
    --output-dir runs/experiments/rank-allocation-full
```
"""


def layer_ranks(wrapped) -> dict:
    """{adapted module name (in the transformers model): current rank} of a HyperAdaLoRA or peft AdaLoRA model."""
    if isinstance(wrapped, AdapterModel):
        return {k: int(v) for k, v in wrapped.rank_pattern.items()}
    cfg = wrapped.peft_config["default"]
    names = [n for n, m in wrapped.get_base_model().named_modules()
             if hasattr(m, "lora_E") and "default" in getattr(m, "lora_E", {})]
    if not cfg.rank_pattern:
        return {n: int(cfg.init_r) for n in names}
    pattern = {}
    for key, bits in cfg.rank_pattern.items():
        for suffix in (".lora_E.default", ".lora_E"):
            if key.endswith(suffix):
                key = key[: -len(suffix)]
                break
        pattern[key] = int(sum(bool(b) for b in bits))
    return {n: pattern.get(n, int(cfg.init_r)) for n in names}


def split_name(name: str) -> tuple[int, str]:
    """(layer index, short module type) of e.g. ``bert.encoder.layer.3.attention.self.query`` -> (3, "query")."""
    m = re.search(r"\.(\d+)\.(.+)$", name)
    if not m:
        return -1, name
    rest = m.group(2)
    if rest in SHORT:
        return int(m.group(1)), SHORT[rest]
    last = rest.split(".")[-1]   # e.g. self_attn.q_proj -> q_proj
    return int(m.group(1)), rest if last in ("dense", "weight") else last


def short_name(name: str) -> str:
    idx, typ = split_name(name)
    return f"L{idx}.{typ}" if idx >= 0 else typ


def _heatmap(matrix: np.ndarray, names: list[str], steps: np.ndarray, path: str, title: str, vmax: int) -> str:
    plt = pyplot()
    height = max(3.5, 0.16 * len(names) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height), dpi=110)
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax,
                   extent=[steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([short_name(n) for n in names], fontsize=6)
    ax.set_xlabel("optimizer step")
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, ticks=range(vmax + 1))
    cbar.set_label("rank")
    return save_figure(fig, path)


def _total_plot(totals: dict, steps: np.ndarray, path: str, title: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for i, (label, t) in enumerate(totals.items()):
        ax.plot(steps, t, color=f"C{i}", linewidth=2 if i == 0 else 1.2, linestyle="-" if i == 0 else "--",
                label=label)
    return save_line_plot(fig, ax, path, "optimizer step", "total rank (all adapted layers)", title)


def run_rank_allocation(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    task, data_dir, steps, seeds, window, command, env, base = single_task_setup(opts, NAME, DEFAULTS,
                                                                                 method="adalora")
    records = {label: {} for label in METHODS}   # label -> seed -> [(step, {name: rank})]

    recorder = AdapterRecorder()  # every run's adapter model, the current one last

    def factory(label, seed):
        rec = records[label].setdefault(seed, [])
        first = {"done": False}

        def on_step(step, row):
            model = recorder.built[-1]
            if not first["done"]:
                rec.append((0, {n: base.init_r for n in layer_ranks(model)}))
                first["done"] = True
            rec.append((step, layer_ranks(model)))
        return on_step

    runs = run_variants(base, METHODS, out, seeds, on_step_factory=factory, build_adapter=recorder)

    names = list(records["hyperadalora"][seeds[0]][0][1])
    other = [n for n in records["adalora"][seeds[0]][0][1] if n not in names]
    names += other
    step_axis = np.asarray([s for s, _ in records["adalora"][seeds[0]]])
    matrices, totals, final = {}, {}, {}
    for label in METHODS:
        per_seed = [np.asarray([[r.get(n, np.nan) for _, r in records[label][seed]] for n in names], dtype=float)
                    for seed in seeds]
        mat = np.nanmean(np.stack(per_seed), axis=0) if len(per_seed) > 1 else per_seed[0]
        matrices[label] = mat
        totals[label] = np.nansum(mat, axis=0)
        final[label] = mat[:, -1]
    budget_title = f"total rank over training on {task} ({steps} steps; init_r {base.init_r}, target_r {base.target_r})"
    pngs = [_heatmap(matrices[label], names, step_axis, os.path.join(out, f"ranks_{label}.png"),
                     f"{label}: rank per adapted layer on {task}" + (f" (mean of {len(seeds)} seeds)"
                                                                      if len(seeds) > 1 else ""), base.init_r)
            for label in METHODS]
    pngs.append(_total_plot({k: v for k, v in totals.items()}, step_axis, os.path.join(out, "total_rank.png"),
                            budget_title))
    conv = convergence(runs, window, reference="adalora")
    series = {label: curves(runs, label) for label in METHODS}
    pngs.append(plot_loss_bands(series, os.path.join(out, "loss_curves.png"), f"training loss on {task}", window,
                                conv["target_loss"]["mean"]))
    metric = primary_metric(runs[seeds[0]]["adalora"]["summary"]["final_eval"]) or "accuracy"
    # tables
    cell = (lambda v: f"{v:.2f}") if len(seeds) > 1 else (lambda v: "-" if np.isnan(v) else str(int(v)))
    layer_rows = [[short_name(n), *(cell(final[m][i]) for m in METHODS)] for i, n in enumerate(names)]
    parts = [split_name(n) for n in names]
    depths = sorted({d for d, _ in parts})
    types = list(dict.fromkeys(t for _, t in parts))

    def grouped(key_fn, keys):
        rows = []
        for k in keys:
            idx = [i for i, p in enumerate(parts) if key_fn(p) == k]
            rows.append([k, *(f"{final[m][idx].sum():.4g}" for m in METHODS), len(idx) * base.init_r])
        return rows

    a, h = final["adalora"], final["hyperadalora"]
    agree = {"same_rank_fraction": float(np.mean(a == h)),
             "pearson": float(np.corrcoef(a, h)[0, 1]) if a.std() > 0 and h.std() > 0 else None}
    changes = {m: int(np.sum(np.abs(np.diff(matrices[m], axis=1)) > 0)) for m in METHODS}
    results = {"experiment": NAME, "command": command, "env": env, "task": task, "seeds": seeds, "args": base,
               "layers": names, "steps": step_axis.tolist(),
               "rank_matrix": {m: matrices[m].tolist() for m in METHODS},
               "total_rank": {m: totals[m].tolist() for m in METHODS},
               "final_rank_pattern": {m: dict(zip(names, final[m].tolist())) for m in METHODS},
               "per_seed_final": {m: {str(s): records[m][s][-1][1] for s in seeds} for m in METHODS},
               "agreement": agree, "rank_changes": changes, "convergence": conv,
               "plots": [os.path.basename(p) for p in pngs]}
    settings = settings_of(base)
    settings.update({"seeds": ", ".join(map(str, seeds)), "data dir": data_dir})
    lines = report_header("Rank allocation over training: AdaLoRA vs HyperAdaLoRA", command, env, settings,
                          "Per-layer rank after each optimizer step (after update_and_allocate). HyperAdaLoRA "
                          "masks by the magnitude of the generated lambda (library default importance), peft's "
                          "AdaLoRA by its smoothed sensitivity; the budget schedule is the same.")
    lines += ["## Final rank pattern", "",
              f"Layers with the same final rank in both methods: {agree['same_rank_fraction']:.1%}; Pearson "
              f"correlation of the final ranks: {'n/a' if agree['pearson'] is None else format(agree['pearson'], '.3f')}"
              f"; rank changes (layer x step cells that changed): " + ", ".join(f"{m} {c}" for m, c in changes.items())
              + ".", "",
              "By depth (sum of the ranks of the layer's projections; last column: the initial budget):", "",
              markdown_table(["layer", *METHODS, "initial"], grouped(lambda p: p[0], depths)), "",
              "By module type (sum over layers):", "",
              markdown_table(["module", *METHODS, "initial"], grouped(lambda p: p[1], types)), "",
              "![total rank](total_rank.png)", "", "![adalora ranks](ranks_adalora.png)", "",
              "![hyperadalora ranks](ranks_hyperadalora.png)", "",
              "Per layer:", "", markdown_table(["layer", *METHODS], layer_rows), "",
              "## Training", "", convergence_table(conv, [metric]), "", "![loss curves](loss_curves.png)", "",
              FULL_SIZE]
    return write_outputs(out, results, lines)
