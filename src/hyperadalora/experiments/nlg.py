"""``nlg`` (the paper's Tables 1 and 3): instruction tuning of a causal LM with AdaLoRA and HyperAdaLoRA.

For each instruction data file (the Alpaca demo set by default, plus every --data-path), both methods train
with the same seeds, data order, hyperparameters and steps. Reported: BLEU-4 and ROUGE-1 of greedy generations
on the held-out split (`training.train` generates for ``gen_eval_examples`` held-out prompts at the end), the dev
loss, the total training time (steps only) and its ratio, and the steps / training time to the target loss
(AdaLoRA's final smoothed training loss). The dev loss is also evaluated every tenth of the run: the steps and
training time to AdaLoRA's final dev loss (`convergence.dev_speed`) measure speed where the training loss of a short
run does not come down beyond the noise of its batches.
"""

from __future__ import annotations

import os

from .convergence import convergence, curves, dev_speed, eval_points, train_time_at
from .goal import GENERATION_QUALITY, goal_check, goal_section
from .options import as_options, pick
from .plots import plot_eval_points, plot_gap_bands, plot_loss_bands, seeds_note
from .report import (convergence_table, curves_json, fmt, fmt_stat, gap_note, markdown_table, report_header,
                     settings_of, write_outputs)
from .runs import base_args, run_index, run_variants
from .stats import stats
from .task_setup import DEFAULT_ALPACA_FILE, experiment_setup, output_dir, repo_path

NAME = "nlg"
DEFAULTS = dict(steps=50, batch_size=4, lr=1e-3, max_length=256, max_eval_examples=16, gen_eval_examples=16,
                max_new_tokens=48, seeds=1, model="smollm2")
METHODS = {"adalora": {"method": "adalora"}, "hyperadalora": {"method": "hyperadalora"}}

FULL_SIZE = """\
## Full-size run (the paper's setting)

The paper fine-tunes LLaMA3.1-8B and Qwen2.5-7B on Alpaca (52k), Magpie and OpenPlatypus with batch 64,
lr 1e-5, r = 3, gamma 0.1, and reports BLEU-4 / ROUGE-1 (equal within 0.1) and the total training time
(13-27 % lower). On a GPU with local copies of the model and the data:

```
hyperadalora experiment nlg --model /path/to/Llama-3.1-8B --data-path /path/to/alpaca_data.json \\
    /path/to/magpie.json /path/to/open_platypus.json --steps 2000 --batch-size 64 --lr 1e-5 \\
    --max-length 512 --max-eval-examples 500 --seeds 3 --device cuda --output-dir runs/experiments/nlg-full
```

(The default Alpaca demo file is always included; `--batch-size 64` of 8B-model sequences needs gradient
accumulation or a large GPU: run `hyperadalora train` with `--grad-accum` for single runs.)
"""


def _datasets(opts) -> list[str]:
    files = []
    default = repo_path(DEFAULT_ALPACA_FILE)
    if default is not None:
        files.append(default)
    for p in opts.data_path or []:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--data-path {p!r} does not exist.")
        if os.path.realpath(p) not in {os.path.realpath(f) for f in files}:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"No instruction data: {DEFAULT_ALPACA_FILE} (relative to the repository root) does "
                                f"not exist; pass --data-path FILE (Alpaca-style JSON / JSONL).")
    return files


def _label(path: str, taken: set) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    label, i = stem, 2
    while label in taken:
        label, i = f"{stem}-{i}", i + 1
    taken.add(label)
    return label


def run_nlg(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    steps, seeds, window, command, env = experiment_setup(opts, NAME, DEFAULTS)
    results = {"experiment": NAME, "command": command, "env": env, "seeds": seeds, "window": window, "datasets": {}}
    sections, summary_rows, speed_rows, taken, goals = [], [], [], set(), {}
    for path in _datasets(opts):
        label = _label(path, taken)
        max_eval = pick(opts.max_eval_examples, DEFAULTS["max_eval_examples"])
        base = base_args(opts, method="adalora", task="alpaca", data_path=path, model=DEFAULTS["model"],
                         max_steps=steps, batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"],
                         max_length=DEFAULTS["max_length"], max_eval_examples=DEFAULTS["max_eval_examples"],
                         gen_eval_examples=min(DEFAULTS["gen_eval_examples"], max_eval),
                         max_new_tokens=DEFAULTS["max_new_tokens"], eval_every=max(1, steps // 10))
        runs = run_variants(base, METHODS, os.path.join(out, label), seeds, reuse=opts.reuse)
        conv = convergence(runs, window, reference="adalora")
        def after_first(run):  # the run's training time without its first step (`train_time_at`)
            return train_time_at(run["rows"], run["rows"][-1]["step"])

        train_ratio = stats([after_first(rs["hyperadalora"]) / after_first(rs["adalora"]) for rs in runs.values()])
        series = {m: curves(runs, m) for m in METHODS}
        png = plot_loss_bands(series, os.path.join(out, f"loss_{label}.png"),
                              f"{label}: training loss ({steps} steps)", window, conv["target_loss"]["mean"],
                              {m: conv["methods"][m]["steps_to_target"]["mean"] for m in METHODS})
        note = seeds_note(seeds)
        gap_png = plot_gap_bands(series, "adalora", os.path.join(out, f"gap_{label}.png"),
                                 f"{label}: HyperAdaLoRA's loss minus AdaLoRA's, same batches{note}", window)
        goals[label] = goal_check(conv, "hyperadalora", GENERATION_QUALITY, speed=False)  # the goal: quality
        # with --eval-every 0 the only evaluation is the last: no speed to read from it
        speed = dev_speed(runs, "adalora", "hyperadalora") if base.eval_every else None
        dev = {m: eval_points(runs, m, "eval_loss") for m in METHODS}
        dev_png = plot_eval_points(dev, os.path.join(out, f"dev_{label}.png"),
                                   f"{label}: dev loss at checkpoints{note}", "dev loss")
        results["datasets"][label] = {
            "data_path": path, "args": base, "convergence": conv, "goal_check": goals[label],
            "train_time_ratio": train_ratio, "dev_speed": speed, "dev_loss_at_checkpoints": dev,
            "plot": os.path.basename(png), "gap_plot": os.path.basename(gap_png),
            "dev_plot": os.path.basename(dev_png),
            "curves": curves_json(series), "runs": run_index(runs, ("final_eval", "train_time_s", "median_step_s")),
        }
        rows = []
        for m in METHODS:
            c = conv["methods"][m]
            rows.append([m, fmt_stat(c.get("dev_bleu4"), "{:.2f}"), fmt_stat(c.get("dev_rouge1"), "{:.2f}"),
                         fmt_stat(c.get("dev_eval_loss")), fmt_stat(c["train_time_s"], "{:.1f}"),
                         fmt_stat(c["median_step_s"], "{:.3f}"), fmt_stat(c["steps_to_target"], "{:.1f}"),
                         fmt_stat(c["time_to_target_s"], "{:.1f}"), fmt_stat(c["time_ratio"], "{:.2f}"),
                         fmt_stat(c.get("loss_gap"), "{:.4f}"), fmt_stat(c.get("steps_below"), "{:.2f}")])
            summary_rows.append([label, m, fmt_stat(c.get("dev_bleu4"), "{:.2f}"),
                                 fmt_stat(c.get("dev_rouge1"), "{:.2f}"), fmt_stat(c.get("dev_eval_loss")),
                                 fmt_stat(c.get("loss_gap"), "{:.4f}"), fmt_stat(c["train_time_s"], "{:.1f}"),
                                 fmt_stat(c["time_to_target_s"], "{:.1f}")])
        if speed is None:
            speed_rows.append([label, "n/a: --eval-every 0 evaluates only at the end", "", "", "", ""])
        else:
            per_seed = speed["per_seed"].values()
            speed_rows.append([label, fmt_stat(stats([p["target"] for p in per_seed])),
                               ", ".join(fmt(p["reference_steps"], "{:d}") for p in per_seed),
                               ", ".join(fmt(p["steps"], "{:d}", "never") for p in per_seed),
                               fmt_stat(speed["steps_ratio"], "{:.2f}"), fmt_stat(speed["time_ratio"], "{:.2f}")])
        n_gen = runs[seeds[0]]["adalora"]["summary"]["final_eval"].get("n_generated")
        sections += [f"## {label}", "", f"Data: `{path}`; BLEU-4 / ROUGE-1 (0-100) of greedy generations "
                     f"({base.max_new_tokens} new tokens) for {n_gen} held-out prompts; dev loss on "
                     f"{base.max_eval_examples} held-out examples. Target: AdaLoRA's final smoothed training loss "
                     f"= {fmt_stat(conv['target_loss'])} (window {window}).", "",
                     markdown_table(["method", "BLEU-4", "ROUGE-1", "dev loss", "train time (s)", "median step (s)",
                                     "steps to target", "train time to target (s)", "time-to-target ratio",
                                     "loss gap to AdaLoRA, same batches", "steps below AdaLoRA's loss"], rows),
                     "", f"Total training time HyperAdaLoRA / AdaLoRA (from the end of step 1): {fmt_stat(train_ratio, '{:.3f}')}.", "",
                     "All convergence numbers:", "", convergence_table(conv), "",
                     f"![{label} loss]({os.path.basename(png)})", "",
                     f"![{label} loss gap to AdaLoRA]({os.path.basename(gap_png)})", "",
                     f"![{label} dev loss at checkpoints]({os.path.basename(dev_png)})", ""]
    settings = settings_of(base, "model", "max_steps", "batch_size", "lr", "max_length", "init_r", "target_r", "tinit",
                           "tfinal", "deltaT", "orth_reg_weight", "eval_every", "max_eval_examples",
                           "gen_eval_examples", "max_new_tokens")
    settings.update({"seeds": ", ".join(map(str, seeds)), "smoothing window": window})
    lines = report_header("Instruction tuning (NLG): AdaLoRA vs HyperAdaLoRA (paper Tables 1 and 3)", command, env,
                          settings, "Same seeds, data order, hyperparameters and steps for both methods; the "
                          "held-out split is fixed by a hash of each record (10 %). Train time: the optimizer steps "
                          "only (no evaluation or generation). " + gap_note(window))
    lines += ["## Summary", "", markdown_table(["data", "method", "BLEU-4", "ROUGE-1", "dev loss",
                                                "loss gap to AdaLoRA, same batches", "train time (s)",
                                                "train time to target (s)"], summary_rows), "",
              *goal_section(goals, "BLEU-4 and ROUGE-1 of the greedy generations within 0.5 of AdaLoRA's "
                                   "on instruction tuning"),
              "## Speed on the dev loss", "",
              f"The steps (and training time) to AdaLoRA's final dev loss, read at the dev evaluations (every "
              f"{base.eval_every} step(s), the resolution of this measure). The dev set is the same at every "
              f"evaluation, so this speed has no batch noise: it measures runs whose training loss does not come "
              f"down beyond the noise of its batches (where the goal check's steps ratio is n/a). Per seed, "
              f"then the ratios HyperAdaLoRA / AdaLoRA over the seeds (n/a: never reached).", "",
              markdown_table(["data", "AdaLoRA's final dev loss", "AdaLoRA's steps to it, per seed",
                              "HyperAdaLoRA's steps to it, per seed", "steps ratio", "time ratio"], speed_rows), ""]
    lines += sections + [FULL_SIZE]
    return write_outputs(out, results, lines)
