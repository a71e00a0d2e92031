"""The `transformers.Trainer` path vs the library's own training loop, side by side in one run.

Same base model, data, steps, batch size, learning rate and adapter config (`training.build_adapter_model` with the
same `TrainArgs`) for every row:

- ``loop``: HyperAdaLoRA trained by `hyperadalora.training.train` (what `hyperadalora train` runs);
- ``HyperAdaLoraTrainer``: HyperAdaLoRA under `ha.HyperAdaLoraTrainer` (optimizer from
  `model.optimizer_param_groups`: the hypernetworks' own learning rates);
- ``Trainer, default optimizer``: HyperAdaLoRA under a plain `transformers.Trainer` with `ha.RankAllocationCallback`
  and Trainer's own optimizer, which puts every parameter at the run's lr (the callback warns);
- ``AdaLoRA, Trainer``: peft's AdaLoRA under a plain Trainer with `ha.RankAllocationCallback`, the reference;
- ``AdaLoRA, loop``: peft's AdaLoRA trained by `hyperadalora.training.train`.

Trainer's sampler and the loop's do not draw the same batches, so the table compares the mean training loss
(task loss + orthogonal penalty, as each run logs it) over windows of steps, not step by step. The penalty is
larger for AdaLoRA, whose P and Q start random, than for HyperAdaLoRA's orthonormal start: compare the rows of
one method with each other, not HyperAdaLoRA's with AdaLoRA's (the experiments compare task losses). Dev accuracy is on
the task's dev split after the last step. The Trainer runs use the loop's settings: linear decay, no warm-up, no
clipping (``max_grad_norm=0``), AdamW with torch's defaults.

    python benchmarks/trainer_path.py                      # MiniLM, the embedded sentiment task, 200 steps
    python benchmarks/trainer_path.py --steps 20 --max-eval 64   # a quick check that it runs
    python benchmarks/trainer_path.py --task sst2 --data-dir ../shared/data/glue --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import hyperadalora as ha  # noqa: E402
from hyperadalora import data as data_lib  # noqa: E402
from hyperadalora import training as train_lib  # noqa: E402
from hyperadalora.base_models import load_model_and_tokenizer  # noqa: E402

ROWS = ("loop", "HyperAdaLoraTrainer", "Trainer, default optimizer", "AdaLoRA, Trainer", "AdaLoRA, loop")


def trainer_run(label, args, model, tokenizer, train_ds, eval_ds, out_dir):
    """One Trainer run: its per-step training losses, dev accuracy and time."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=out_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                              per_device_eval_batch_size=args.batch_size, learning_rate=args.lr,
                              weight_decay=args.weight_decay, lr_scheduler_type="linear", warmup_steps=0,
                              max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
                              remove_unused_columns=False, disable_tqdm=True, seed=args.seed,
                              dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    kw = dict(model=model, args=targs, train_dataset=train_ds, data_collator=data_lib.make_collator(tokenizer))
    if label == "HyperAdaLoraTrainer":
        trainer = ha.HyperAdaLoraTrainer(**kw)
    else:
        trainer = Trainer(**kw, callbacks=[ha.RankAllocationCallback()])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts on stdout
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    seconds = time.perf_counter() - start
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]
    pred = trainer.predict(eval_ds)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    accuracy = float((np.argmax(logits, -1) == pred.label_ids).mean())
    flagged = any("no parameter group" in str(w.message) for w in caught)
    return {"losses": losses, "dev_accuracy": accuracy, "seconds": seconds, "optimizer_warning": flagged,
            "groups": sorted({g.get("name", "-") for g in trainer.optimizer.param_groups})}


def loop_run(args, model, tokenizer, train_examples, eval_examples):
    start = time.perf_counter()
    summary = train_lib.train(args, model=model, tokenizer=tokenizer, train_examples=train_examples,
                              eval_examples=eval_examples)
    seconds = time.perf_counter() - start
    rows, _ = train_lib.read_metrics(summary["metrics"])
    return {"losses": [r["loss"] for r in rows], "dev_accuracy": summary["final_eval"].get("accuracy"),
            "seconds": seconds, "optimizer_warning": False, "groups": []}


def windows(losses, size):
    return [float(np.mean(losses[i:i + size])) for i in range(0, len(losses), size)]


def main(argv=None) -> dict:
    """Run every row; print the table; return {'results': {row: run}, 'report': the Markdown table}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: MiniLM)")
    p.add_argument("--task", default=train_lib.DEFAULT_TASK)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--window", type=int, default=25, help="steps per loss window in the table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    opts = p.parse_args(argv)

    train_examples = data_lib.load_examples(opts.task, "train", opts.data_dir, seed=opts.seed)
    eval_examples = data_lib.load_examples(opts.task, "dev", opts.data_dir, max_examples=opts.max_eval, seed=opts.seed)
    spec = data_lib.get_task(opts.task)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ROWS:
            method = "adalora" if label.startswith("AdaLoRA") else "hyperadalora"
            args = train_lib.TrainArgs(method=method, model=opts.model, task=opts.task, data_dir=opts.data_dir,
                                       max_steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
                                       max_length=opts.max_length, seed=opts.seed, progress=False,
                                       save_adapter=False, keep_checkpoints=0, max_eval_examples=opts.max_eval,
                                       output_dir=os.path.join(tmp, label.replace(" ", "_").replace(",", "")))
            train_lib.set_seed(opts.seed)
            base, tokenizer, _ = load_model_and_tokenizer(opts.model, spec.kind, num_labels=max(spec.num_labels, 2))
            print(f"[{label}] {method}, {opts.steps} steps", file=sys.stderr)
            if label.endswith("loop"):
                results[label] = loop_run(args, base, tokenizer, train_examples, eval_examples)
                continue
            model, _ = train_lib.build_adapter_model(args, base, "SEQ_CLS")
            train_ds = data_lib.build_classification_dataset(train_examples, tokenizer, opts.max_length)
            eval_ds = data_lib.build_classification_dataset(eval_examples, tokenizer, opts.max_length)
            results[label] = trainer_run(label, args, model, tokenizer, train_ds, eval_ds, os.path.join(tmp, "hf"))

    size = opts.window
    n_windows = len(windows(results[ROWS[0]]["losses"], size))
    heads = [f"loss {i * size + 1}-{min((i + 1) * size, opts.steps)}" for i in range(n_windows)]
    lines = [f"# Trainer path vs the library's loop: {opts.task}, {opts.steps} steps, batch {opts.batch_size}, "
             f"lr {opts.lr:g}, max_length {opts.max_length}, seed {opts.seed}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads). Command: `python benchmarks/{os.path.basename(__file__)} "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| run | " + " | ".join(heads) + " | dev accuracy | time (s) | optimizer groups | warned |",
             "|---|" + "---|" * (len(heads) + 4)]
    for label in ROWS:
        r = results[label]
        w = windows(r["losses"], size)
        warned = "yes" if r["optimizer_warning"] else "no"
        lines.append(f"| {label} | " + " | ".join(f"{x:.4f}" for x in w) + f" | {r['dev_accuracy']:.4f} | "
                     f"{r['seconds']:.1f} | {', '.join(r['groups']) or '-'} | {warned} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(report)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"options": vars(opts), "results": results}, f, indent=1)
    return {"results": results, "report": report}


if __name__ == "__main__":
    main()
