"""``formulation``: the search for a HyperAdaLoRA formulation that converges faster than AdaLoRA.

METHOD.md section 2 records that the paper's reading (recurrent ``X_{t+1} = H(X_t)`` with a zero-initialised
output projection) runs away or learns slower than AdaLoRA. This experiment trains every formulation we tried,
side by side with peft's AdaLoRA (same seeds, data order, learning rate, budget schedule and steps; only the
way P, lambda and Q are produced differs), and reports per variant: the final smoothed training task loss,
steps and wall-clock to AdaLoRA's final smoothed loss and their ratios, the dev metric, the median step time,
and the largest orthogonal penalty and generated norm seen (a run-away shows there).

``--variants a,b,c`` runs a subset (labels of `VARIANTS`); ``adalora`` (the reference) is always run.
``--variant NAME:KEY=VALUE,...`` (repeatable) adds a formulation of one's own: the library default with the given
HyperAdaLoRA options (the names of `HyperAdaLoraConfig`'s fields / the train flags, e.g.
``--variant rows10:feature_lr_ratio=10,hypernet=mlp``) and ``lr_scale`` (the run's lr times it); without
``--variants`` it runs beside ``adalora`` and ``default``.
"""

from __future__ import annotations

import os
import re
import typing

from ..config import HyperAdaLoraConfig
from ..training import HYPER_FIELDS
from .convergence import convergence, curves, loss_per_epoch, primary_metric
from .goal import CLASSIFICATION_BOUND, goal_check, goal_section
from .options import as_options
from .plots import plot_gap_bands, plot_loss_bands
from .report import (curves_json, epoch_section, fmt_stat, gap_note, markdown_table, report_header, settings_of,
                     write_outputs)
from .runs import run_index, run_variants
from .task_setup import output_dir, single_task_setup

NAME = "formulation"
DEFAULTS = dict(task="sst2", steps=200, batch_size=16, lr=3e-3, max_length=64, max_eval_examples=300, seeds=1)

# label -> (TrainArgs overrides, what it tests). Every hyperadalora variant sets all formulation options explicitly,
# starting from the paper's reading (recurrent, zero-initialised output, module context, random orthonormal seed
# state, increment in the state's units).
PAPER = {"generation": "recurrent", "identity": "zero_output", "context": "module", "init": "orthonormal",
         "increment_scale": "state", "momentum": 1.0, "hypernet": "attention", "center_increment": False,
         "hypernet_lr_ratio": 1.0, "feature_lr_ratio": None, "hypernet_dim": 32, "lambda_codes": False}
OFFSET = {**PAPER, "generation": "static", "identity": "offset"}
PREVIOUS = {**OFFSET, "context": "feature", "increment_scale": "width", "init": "principal"}  # the default until commit c075bb0
LAYER = {**PREVIOUS, "context": "layer_feature"}
CENTRED = {**LAYER, "center_increment": True}
CNN_LR10 = {**CENTRED, "hypernet": "cnn", "hypernet_lr_ratio": 10.0}  # the default until the split learning rates
SPLIT = {**CNN_LR10, "hypernet_lr_ratio": 1.0, "feature_lr_ratio": 30.0}  # the default until hypernet_dim 8
WIDTH8 = {**SPLIT, "hypernet_dim": 8, "feature_dim": None}  # the default until feature_dim 4
ROWS4 = {**WIDTH8, "feature_dim": 4}  # the default until lambda_codes
DEFAULT = {**ROWS4, "lambda_codes": True}  # = HyperAdaLoraConfig's defaults
NO_PRUNING = object()  # a variant's tinit: the run's steps - 1 (with tfinal 0 and a huge deltaT nothing is pruned)

VARIANTS = {
    "adalora": ({"method": "adalora"}, "peft's AdaLoRA: the reference"),
    "paper": ({"hyper": dict(PAPER)},
              "the paper's recurrence X_{t+1} = X_t + H(X_t), zero-initialised output projection"),
    "damped": ({"hyper": {**PAPER, "momentum": 0.5}},
               "recurrent, the carried-over increment damped by momentum 0.5"),
    "damped+width": ({"hyper": {**PAPER, "momentum": 0.5, "increment_scale": "width"}},
                     "damped, increment in units of 1/hypernet_dim (an Adam step moves an entry by ~lr)"),
    "static": ({"hyper": {**PAPER, "generation": "static"}}, "static X = X_0 + H(X_0)"),
    "feature": ({"hyper": {**PAPER, "momentum": 0.5, "context": "feature"}},
                "damped + a learned embedding of each row's feature, shared by layers of that dimension"),
    "offset+feature": ({"hyper": {**OFFSET, "context": "feature"}},
                       "static, random output projection with its initial output subtracted, feature context"),
    "offset+feature+width": ({"hyper": {**OFFSET, "context": "feature", "increment_scale": "width"}},
                             "offset + feature context + width-scaled increment"),
    "offset+feature+width+principal": ({"hyper": dict(PREVIOUS)},
                                       "+ seed state = top singular vectors of W0 (the previous default)"),
    "previous+lr10": ({"hyper": {**PREVIOUS, "hypernet_lr_ratio": 10.0}},
                      "the previous default, hypernetworks at 10x the learning rate"),
    "layer-feature": ({"hyper": dict(LAYER)},
                      "previous default, but a learned embedding of every row of every layer (not shared)"),
    "layer-feature+center": ({"hyper": dict(CENTRED)},
                             "layer-feature, the row mean of each P / Q increment removed"),
    "layer-feature+center+cnn": ({"hyper": {**CENTRED, "hypernet": "cnn"}},
                                 "layer-feature+center with the CNN hypernetwork"),
    "layer-feature+center+cnn+lr3": ({"hyper": {**CNN_LR10, "hypernet_lr_ratio": 3.0}},
                                     "+ hypernetworks at 3x the learning rate"),
    "layer-feature+center+cnn+lr10": ({"hyper": dict(CNN_LR10)},
                                      "+ hypernetworks at 10x the learning rate (the default before the split below)"),
    "split-body1-rows10": ({"hyper": {**CNN_LR10, "hypernet_lr_ratio": 1.0, "feature_lr_ratio": 10.0}},
                           "split learning rates: hypernetwork bodies at 1x, the per-row embeddings at 10x"),
    "split-body3-rows30": ({"hyper": {**CNN_LR10, "hypernet_lr_ratio": 3.0, "feature_lr_ratio": 30.0}},
                           "bodies at 3x, per-row embeddings at 30x"),
    "split-body10-rows30": ({"hyper": {**CNN_LR10, "hypernet_lr_ratio": 10.0, "feature_lr_ratio": 30.0}},
                            "bodies at 10x, per-row embeddings at 30x"),
    "split-body3-rows100": ({"hyper": {**CNN_LR10, "hypernet_lr_ratio": 3.0, "feature_lr_ratio": 100.0}},
                            "bodies at 3x, per-row embeddings at 100x"),
    "split-width32": ({"hyper": dict(SPLIT)},
                      "layer-feature+center+cnn, hypernetwork bodies at 1x the learning rate, per-row embeddings at "
                      "30x, width 32 (the default before hypernet_dim 8)"),
    "split-width32+feature-dim8": ({"hyper": {**SPLIT, "feature_dim": 8}},
                                   "split-width32 with 8-wide per-row embeddings mapped to the width 32 (memory)"),
    "split-width16": ({"hyper": {**SPLIT, "hypernet_dim": 16}},
                      "split-width32 with hypernetworks (and per-row embeddings) of width 16"),
    "split-width8": ({"hyper": dict(WIDTH8)},
                     "split-width32 with hypernetworks (and per-row embeddings) of width 8 (the default before "
                     "feature_dim 4)"),
    "default": ({"hyper": dict(DEFAULT)},
                "the library default: split-width8 with 4-wide per-row embeddings mapped to the width 8, and a "
                "learned code per singular value of every layer for H_lambda (lambda_codes)"),
    "default-no-lambda-codes": ({"hyper": dict(ROWS4)},
                                "the default before lambda_codes: lambda's tokens carry only the module and "
                                "rank-position embeddings"),
    "default-rows10": ({"hyper": {**ROWS4, "feature_lr_ratio": 10.0}},
                       "the default with the per-row embeddings at 10x the learning rate (not 30x)"),
    "default-body3": ({"hyper": {**ROWS4, "hypernet_lr_ratio": 3.0}},
                      "the default with the hypernetwork bodies (and module / rank embeddings) at 3x"),
    "default-body3-rows10": ({"hyper": {**ROWS4, "hypernet_lr_ratio": 3.0, "feature_lr_ratio": 10.0}},
                             "the default with the bodies at 3x and the per-row embeddings at 10x"),
    "default-body10": ({"hyper": {**ROWS4, "hypernet_lr_ratio": 10.0}},
                       "the default with the hypernetwork bodies (and module / rank embeddings) at 10x"),
    "default-rows100": ({"hyper": {**ROWS4, "feature_lr_ratio": 100.0}},
                        "the default with the per-row embeddings at 100x the learning rate (not 30x)"),
    "default-body3-rows100": ({"hyper": {**ROWS4, "hypernet_lr_ratio": 3.0, "feature_lr_ratio": 100.0}},
                              "the default with the hypernetwork bodies at 3x and the per-row embeddings at 100x"),
    "default-rows-decay1": ({"hyper": {**ROWS4, "feature_lr_ratio_final": 1.0}},
                            "the default with the per-row embeddings' ratio falling geometrically from 30x to 1x "
                            "over the run"),
    "default-rows-decay3": ({"hyper": {**ROWS4, "feature_lr_ratio_final": 3.0}},
                            "the default with the per-row embeddings' ratio falling geometrically from 30x to 3x "
                            "over the run"),
    "default-orthonormal": ({"hyper": {**ROWS4, "init": "orthonormal"}},
                            "the default with P and Q seeded at random orthonormal columns (AdaLoRA's random start), "
                            "not the frozen weight's top singular vectors"),
    "default-nocenter": ({"hyper": {**ROWS4, "center_increment": False}},
                         "the default without removing the row (column) mean of the generated P (Q) increments"),
    "default-sensitivity": ({"hyper": {**ROWS4, "importance": "sensitivity"}},
                            "the default with AdaLoRA's importance score (smoothed sensitivity of the generated "
                            "lambda) in place of its magnitude"),
    "default-basis-unit": ({"hyper": {**ROWS4, "basis": "unit"}},
                           "the default with every generated column of P (row of Q) scaled to norm 1: lambda "
                           "alone carries the scale"),
    "default-basis-orthonormal": ({"hyper": {**ROWS4, "basis": "orthonormal"}},
                                  "the default with the generated P and Q orthonormalised (QR): the singular "
                                  "values are exactly lambda, the orthogonal regulariser has nothing left to do"),
    "default-mlp": ({"hyper": {**ROWS4, "hypernet": "mlp"}},
                    "the default with the MLP body: no convolution couples neighbouring rows of a matrix"),
    "default-lambda-codes": ({"hyper": {**ROWS4, "lambda_codes": True}},
                             "the default with a learned code per singular value of every layer for H_lambda "
                             "(at the row embeddings' 30x lr): lambda gets per-layer parameters as P and Q do "
                             "(= `default` since lambda_codes became the default)"),
    "default-rows-rise": ({"hyper": {**DEFAULT, "feature_lr_ratio_final": 300.0}},
                          "the default with the per-row embeddings' ratio rising geometrically from 30x to 300x over "
                          "the run: their step shrinks less than the run's linear decay late in the run"),
    "default-rows100-codes": ({"hyper": {**DEFAULT, "feature_lr_ratio": 100.0}},
                              "the default (with lambda codes) with the per-row embeddings and codes at 100x the "
                              "learning rate (not 30x)"),
    "default-rows10-codes": ({"hyper": {**DEFAULT, "feature_lr_ratio": 10.0}},
                             "the default (with lambda codes) with the per-row embeddings and codes at 10x the "
                             "learning rate (not 30x)"),
    "default-body3-codes": ({"hyper": {**DEFAULT, "hypernet_lr_ratio": 3.0}},
                            "the default (with lambda codes) with the hypernetwork bodies (and module / rank "
                            "embeddings) at 3x"),
    "split-width8+ffn0": ({"hyper": {**WIDTH8, "hypernet_ffn_mult": 0}},
                          "split-width8 without the hypernetworks' feed-forward block (speed)"),
    "split-width8+ffn0+feature-dim4": ({"hyper": {**WIDTH8, "hypernet_ffn_mult": 0, "feature_dim": 4}},
                                       "split-width8+ffn0 with 4-wide per-row embeddings mapped to the width 8"),
    "split-width8+feature-dim2": ({"hyper": {**WIDTH8, "feature_dim": 2}},
                                  "split-width8 with 2-wide per-row embeddings mapped to the width 8 (memory)"),
    "default-lr3x": ({"hyper": dict(ROWS4), "lr_scale": 3.0}, "check: the default at 3x the run's learning rate"),
    "default-lr10x": ({"hyper": dict(ROWS4), "lr_scale": 10.0}, "check: the default at 10x the run's learning rate"),
    "default-rows-decay1-lr10x": ({"hyper": {**ROWS4, "feature_lr_ratio_final": 1.0}, "lr_scale": 10.0},
                                  "check: default-rows-decay1 at 10x the run's learning rate"),
    # no pruning: the budget phase starts at the last step and masks only every 10**6 steps (peft's AdaLoRA refuses
    # init_r == target_r: kthvalue with k = 0)
    "adalora-no-pruning": ({"method": "adalora", "tinit": NO_PRUNING, "tfinal": 0, "deltaT": 10 ** 6},
                           "check: AdaLoRA keeping all init_r ranks (no rank is pruned during the run)"),
    "default-no-pruning": ({"hyper": dict(ROWS4), "tinit": NO_PRUNING, "tfinal": 0, "deltaT": 10 ** 6},
                           "check: the default keeping all init_r ranks (compare with adalora-no-pruning)"),
    "adalora-lr3x": ({"method": "adalora", "lr_scale": 3.0},
                     "check: AdaLoRA itself at 3x the learning rate (is a larger step all it takes?)"),
    "adalora-lr10x": ({"method": "adalora", "lr_scale": 10.0},
                      "check: AdaLoRA itself at 10x the learning rate"),
}

FULL_SIZE = """\
## Full-size run

On a GPU with the paper's models (RoBERTa-base / DeBERTa-v3-base, batch 64) and all tasks:

```
hyperadalora experiment formulation --model /path/to/roberta-base --data-dir /path/to/glue --tasks mnli \\
    --steps 3000 --batch-size 64 --max-length 256 --seeds 3 --device cuda --output-dir runs/experiments/formulation-full
```
"""


# The default-* variants measured before lambda_codes became the default keep the default of their time (ROWS4),
# so that their committed reports stay reproducible; their "the default" is that one, and the reports say so.
for _label, (_overrides, _what) in list(VARIANTS.items()):
    if _label.startswith("default-") and _overrides.get("hyper", {}).get("lambda_codes") is False \
            and _label != "default-no-lambda-codes":
        VARIANTS[_label] = (_overrides, _what + " [on the default before lambda_codes]")


def _resolve(overrides: dict, steps: int) -> dict:
    """A variant's overrides for a run of ``steps`` steps (NO_PRUNING: the budget phase starts at the last step)."""
    return {k: (steps - 1 if v is NO_PRUNING else v) for k, v in overrides.items()}


VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


OPTION_TYPES = typing.get_type_hints(HyperAdaLoraConfig)  # {option: its type, e.g. int, bool, Optional[float]}


def parse_option(key: str, text: str):
    """The value of HyperAdaLoRA option ``key`` from its command-line text, read as ``hyperadalora train --KEY TEXT``
    reads it: by the type of the option's field in `HyperAdaLoraConfig` (true / false for a switch; none / null for
    an option that may be None). A text the type does not take -> ValueError."""
    kinds = typing.get_args(OPTION_TYPES[key]) or (OPTION_TYPES[key],)  # Optional[X]: (X, NoneType)
    kind = kinds[0]
    nullable = type(None) in kinds
    if nullable and text.strip().lower() in ("none", "null"):
        return None
    if kind is bool:
        value = text.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} takes true or false, got {text!r}.")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key} takes {'an integer' if kind is int else 'a number'}{' or none' if nullable else ''}, "
                         f"got {text!r}.") from None


def parse_variant(spec: str) -> tuple[str, tuple[dict, str]]:
    """``NAME:KEY=VALUE,...`` -> (NAME, (overrides, description)): the library default with those HyperAdaLoRA
    options (values parsed as the train flags parse them) and ``lr_scale``. Bad input -> ValueError / TypeError
    saying what to change, before anything runs."""
    example = "e.g. --variant rows10:feature_lr_ratio=10,hypernet=mlp"
    name, sep, body = spec.partition(":")
    name = name.strip()
    if not sep or not body.strip():
        raise ValueError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] ({example}).")
    if not VARIANT_NAME.match(name):
        raise ValueError(f"--variant {spec!r}: the name {name!r} must start with a letter or digit and contain only "
                         f"letters, digits and _ . + - (it names the run directory).")
    if name == "adalora" or name in VARIANTS:
        raise ValueError(f"--variant {spec!r}: {name!r} is a built-in variant; choose another name.")
    hyper, lr_scale = {}, None
    for item in body.split(","):
        key, eq, text = item.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not eq or not key or not text:
            raise ValueError(f"--variant {name}: {item.strip()!r} is not KEY=VALUE ({example}).")
        if key == "lr_scale":
            try:
                lr_scale = float(text)
            except ValueError:
                raise ValueError(f"--variant {name}: lr_scale takes a number, got {text!r}.") from None
            if not lr_scale > 0:
                raise ValueError(f"--variant {name}: lr_scale={lr_scale} must be > 0.")
            continue
        if key not in HYPER_FIELDS:
            raise ValueError(f"--variant {name}: unknown option {key!r}; valid: lr_scale, {', '.join(HYPER_FIELDS)}.")
        try:
            hyper[key] = parse_option(key, text)
        except ValueError as e:
            raise ValueError(f"--variant {name}: {key}={text!r}: {e}") from None
    try:  # the config's own checks, before anything runs
        HyperAdaLoraConfig(**{**DEFAULT, **hyper})
    except (ValueError, TypeError) as e:
        raise type(e)(f"--variant {name}: {e}") from None
    overrides = {"hyper": {**DEFAULT, **hyper}, **({"lr_scale": lr_scale} if lr_scale is not None else {})}
    changes = [f"{k}={v}" for k, v in hyper.items()] + ([f"lr x{lr_scale:g}"] if lr_scale is not None else [])
    return name, (overrides, "your variant: the library default with " + ", ".join(changes))


def run_formulation(opts=None) -> dict:
    opts = as_options(opts)
    custom = {}  # bad input fails before anything is written
    for spec in opts.variant:
        name, variant = parse_variant(spec)
        if name in custom:
            raise ValueError(f"--variant {name} is given twice; give each of your variants its own name.")
        custom[name] = variant
    out = output_dir(opts, NAME)
    task, data_dir, steps, seeds, window, command, env, base = single_task_setup(opts, NAME, DEFAULTS,
                                                                                 method="hyperadalora")
    table = {**VARIANTS, **custom}
    chosen = list(opts.variants or (["default"] if custom else VARIANTS)) + list(custom)
    unknown = [v for v in chosen if v not in table]
    if unknown:
        raise ValueError(f"formulation: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)} "
                         f"(or add your own with --variant NAME:KEY=VALUE,...).")
    labels = ["adalora"] + list(dict.fromkeys(v for v in chosen if v != "adalora"))
    variants = {label: _resolve(table[label][0], steps) for label in labels}
    runs = run_variants(base, variants, out, seeds, reuse=opts.reuse)
    conv = convergence(runs, window, reference="adalora")
    metric = primary_metric(runs[seeds[0]]["adalora"]["summary"]["final_eval"]) or "accuracy"
    health = {}
    for label in labels:
        rows = [r for seed in seeds for r in runs[seed][label]["rows"]]
        health[label] = {"max_orth_penalty": max((r["orth_penalty"] for r in rows if "orth_penalty" in r), default=None),
                         "max_gen_norm": max((r["gen_norm"] for r in rows if "gen_norm" in r), default=None)}
    series = {label: curves(runs, label) for label in labels}
    png = plot_loss_bands(series, os.path.join(out, "loss_curves.png"),
                          f"HyperAdaLoRA formulations vs AdaLoRA on {task} ({steps} steps)", window,
                          conv["target_loss"]["mean"],
                          {label: conv["methods"][label]["steps_to_target"]["mean"] for label in labels})
    gap_png = plot_gap_bands(series, "adalora", os.path.join(out, "loss_gap.png"),
                             f"Loss gap to AdaLoRA on {task}, same batches ({steps} steps)", window)
    rows = []
    for label in labels:
        m = conv["methods"][label]
        h = health[label]
        rows.append([f"`{label}`", table[label][1], fmt_stat(m["final_smoothed_task_loss"]),
                     fmt_stat(m["steps_to_target"], "{:.1f}"), fmt_stat(m["steps_ratio"], "{:.2f}"),
                     fmt_stat(m["time_ratio"], "{:.2f}"), fmt_stat(m.get("loss_gap"), "{:.4f}"),
                     fmt_stat(m.get("steps_below"), "{:.2f}"), fmt_stat(m.get(f"dev_{metric}")),
                     fmt_stat(m["median_step_s"], "{:.3f}"),
                     "-" if h["max_orth_penalty"] is None else f"{h['max_orth_penalty']:.3g}",
                     "-" if h["max_gen_norm"] is None else f"{h['max_gen_norm']:.3g}"])
    goals = {label: goal_check(conv, label, {metric: CLASSIFICATION_BOUND}) for label in labels if label != "adalora"}
    per_epoch = loss_per_epoch(runs, labels, "adalora")
    results = {"experiment": NAME, "command": command, "env": env, "task": task, "seeds": seeds, "window": window,
               "args": base, "variants": {label: {"overrides": table[label][0], "what": table[label][1]}
                                          for label in labels},
               "convergence": conv, "goal_check": goals, "loss_per_epoch": per_epoch, "health": health, "plot": os.path.basename(png),
               "gap_plot": os.path.basename(gap_png),
               "curves": curves_json(series),
               "runs": run_index(runs)}
    settings = settings_of(base)
    settings.update({"seeds": ", ".join(map(str, seeds)), "smoothing window": window, "data dir": data_dir})
    lines = report_header(
        "HyperAdaLoRA formulations vs AdaLoRA", command, env, settings,
        "Every HyperAdaLoRA formulation we tried, each against peft's AdaLoRA with the same seeds, data order, "
        "learning rate, budget schedule and steps. Target: AdaLoRA's final smoothed training task loss; "
        "ratios are variant / AdaLoRA (below 1 = faster). A ratio of n/a means the variant never reached the target. "
        + gap_note(window))
    lines += ["## Summary", "",
              f"Target: AdaLoRA's final smoothed training task loss = {fmt_stat(conv['target_loss'])} "
              f"(window {window}).", "",
              markdown_table(["variant", "what it changes", "final smoothed loss", "steps to target", "steps ratio",
                              "time ratio", "loss gap, same batches", "steps below AdaLoRA's loss",
                              f"dev {metric}", "median step (s)", "max orth penalty",
                              "max generated norm"], rows), "",
              *goal_section({f"`{label}`": g for label, g in goals.items()}, f"final dev {metric} within 1 point"),
              *epoch_section(per_epoch, labels, "adalora"),
              "![loss curves](loss_curves.png)", "", "![loss gap to AdaLoRA](loss_gap.png)", "", FULL_SIZE]
    return write_outputs(out, results, lines)
