"""``ablation-hypernet`` (the paper's Figure 3): the hypernetwork architecture, attention vs CNN vs MLP.

HyperAdaLoRA with ``hyper={"hypernet": "attention" | "cnn" | "mlp"}`` (all other options at the library's
defaults) and an AdaLoRA reference run, same seeds, data order, schedule and steps. Reported: the loss curves,
steps-to-target with two targets (the attention variant's final smoothed training loss, and AdaLoRA's), the dev
metrics, and the parameter count of each set of hypernetworks (per role P / lambda / Q, counted on a freshly
built model).
"""

from __future__ import annotations

import dataclasses
import os

from ..methods import AdapterModel
from ..base_models import load_model_and_tokenizer
from ..training import build_adapter_model, task_type_of
from .convergence import convergence, curves, primary_metric
from .options import as_options
from .plots import plot_loss_bands
from .report import (convergence_table, curves_json, fmt_stat, markdown_table, report_header, settings_of,
                     write_outputs)
from .runs import run_index, run_variants
from .task_setup import output_dir, single_task_setup

NAME = "ablation-hypernet"
DEFAULTS = dict(task="sst2", steps=200, batch_size=16, lr=3e-3, max_length=64, max_eval_examples=300, seeds=1)
HYPERNETS = ("attention", "cnn", "mlp")
VARIANTS = {**{h: {"method": "hyperadalora", "hyper": {"hypernet": h}} for h in HYPERNETS},
            "adalora": {"method": "adalora"}}

FULL_SIZE = """\
## Full-size run (the paper's setting)

The paper's ablation uses its NLU setting (RoBERTa-base / DeBERTa-v3-base, batch 64, lr 1e-5, r = 3,
gamma 0.1) and finds attention > CNN > MLP in convergence speed. On a GPU:

```
hyperadalora experiment ablation-hypernet --model /path/to/roberta-base --data-dir /path/to/glue \\
    --tasks mnli --steps 5000 --batch-size 64 --lr 1e-5 --max-length 256 --seeds 3 --device cuda \\
    --output-dir runs/experiments/ablation-hypernet-full
```
"""


def parameter_counts(args, kind: str = "classification") -> dict:
    """Trainable parameters of the adapter built from ``args`` on a fresh base model: HyperAdaLoRA per
    hypernetwork role (P, lambda, Q) and in total; AdaLoRA / LoRA: the adapter matrices. ``heads``: the
    trained task head (the same for every method)."""
    base, _, _ = load_model_and_tokenizer(args.model, kind, num_labels=2)
    wrapped, _ = build_adapter_model(args, base, task_type_of(kind))
    if isinstance(wrapped, AdapterModel):
        # per generated role (HyperAdaLoRA: P, lambda, Q), the hypernetworks in all, the layers' trained parameters
        roles = {role: sum(p.numel() for p in wrapped.generators[role].parameters()) for role in wrapped.generated}
        hyper = sum(p.numel() for p in wrapped.hypernetwork_parameters())
        trained = sum(p.numel() for p in wrapped.adapter_parameters())
        heads = sum(p.numel() for p in wrapped.base_model.parameters() if p.requires_grad) - trained
        return {**roles, "hypernetworks": hyper, "adapter": hyper + trained, "heads": heads,
                "n_layers": wrapped.n_layers}
    adapter = sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" in n)
    heads = sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n)
    n_layers = sum(1 for m in wrapped.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    return {"P": None, "lambda": None, "Q": None, "hypernetworks": None, "adapter": adapter, "heads": heads,
            "n_layers": n_layers}


def run_ablation_hypernet(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    task, data_dir, steps, seeds, window, command, env, base = single_task_setup(opts, NAME, DEFAULTS,
                                                                                 method="hyperadalora")
    runs = run_variants(base, VARIANTS, out, seeds, reuse=opts.reuse)
    conv_attn = convergence(runs, window, reference="attention")
    conv_ada = convergence(runs, window, reference="adalora")
    metric = primary_metric(runs[seeds[0]]["attention"]["summary"]["final_eval"]) or "accuracy"
    counts = {}
    for label, overrides in VARIANTS.items():
        ov = dict(overrides)
        counts[label] = parameter_counts(dataclasses.replace(base, hyper={**base.hyper, **ov.pop("hyper", {})}, **ov))
    series = {label: curves(runs, label) for label in VARIANTS}
    png = plot_loss_bands(series, os.path.join(out, "loss_curves.png"),
                          f"hypernetwork ablation on {task} ({steps} steps)", window, conv_attn["target_loss"]["mean"],
                          {label: conv_attn["methods"][label]["steps_to_target"]["mean"] for label in VARIANTS})
    results = {"experiment": NAME, "command": command, "env": env, "task": task, "seeds": seeds, "window": window,
               "args": base, "variants": VARIANTS, "convergence_vs_attention": conv_attn,
               "convergence_vs_adalora": conv_ada, "parameter_counts": counts, "plot": os.path.basename(png),
               "curves": curves_json(series),
               "runs": run_index(runs)}
    count_rows = [[label, *(f"{c[k]:,}" if c[k] is not None else "-" for k in ("P", "lambda", "Q", "hypernetworks")),
                   f"{c['adapter']:,}", f"{c['heads']:,}"] for label, c in counts.items()]
    summary_rows = []
    for label in VARIANTS:
        a, b = conv_attn["methods"][label], conv_ada["methods"][label]
        summary_rows.append([label, fmt_stat(a["final_smoothed_task_loss"]), fmt_stat(a["steps_to_target"], "{:.1f}"),
                             fmt_stat(a["steps_ratio"], "{:.2f}"), fmt_stat(b["steps_to_target"], "{:.1f}"),
                             fmt_stat(b["steps_ratio"], "{:.2f}"), fmt_stat(a.get(f"dev_{metric}")),
                             fmt_stat(a["median_step_s"], "{:.3f}")])
    settings = settings_of(base)
    settings.update({"seeds": ", ".join(map(str, seeds)), "smoothing window": window, "data dir": data_dir})
    lines = report_header("Hypernetwork ablation: attention vs CNN vs MLP (paper Figure 3)", command, env, settings,
                          "HyperAdaLoRA with each hypernetwork architecture (all other HyperAdaLoRA options at the "
                          "library defaults) and an AdaLoRA reference; same seeds, data order, schedule and steps.")
    lines += ["## Summary", "",
              f"Target A: the attention variant's final smoothed training task loss = "
              f"{fmt_stat(conv_attn['target_loss'])}; target B: AdaLoRA's = {fmt_stat(conv_ada['target_loss'])} "
              f"(window {window}). Ratios: variant / reference.", "",
              markdown_table(["variant", "final smoothed loss", "steps to target A", "ratio to attention",
                              "steps to target B", "ratio to adalora", f"dev {metric}", "median step (s)"],
                             summary_rows), "",
              "## Parameter counts", "",
              "Trainable parameters on the base model (HyperAdaLoRA: the hypernetworks of each role, shared by all "
              f"{counts['attention']['n_layers']} adapted layers; AdaLoRA: its P, lambda, Q matrices). `heads`: the "
              "task head trained in full by every method.", "",
              markdown_table(["variant", "H_P", "H_lambda", "H_Q", "hypernetworks", "adapter total", "heads"],
                             count_rows), "",
              "## Convergence to target A (attention)", "", convergence_table(conv_attn, [metric]), "",
              "## Convergence to target B (adalora)", "", convergence_table(conv_ada, [metric]), "",
              "![loss curves](loss_curves.png)", "", FULL_SIZE]
    return write_outputs(out, results, lines)
