"""HyperAdaLoRA on a quantized (bitsandbytes 4-bit / 8-bit) base: step time and memory against an fp32 base, and the
loss curves of HyperAdaLoRA and peft's AdaLoRA on the same 4-bit base.

Part 1, cost (one process, every configuration built from a fresh base model, their timed steps interleaved
ABC, CBA, ... so that background load hits all alike): HyperAdaLoRA (`hyperadalora train`'s defaults) on MiniLM
loaded in fp32, in 4-bit nf4 and in 8-bit, each with and without gradient checkpointing, the same real SST-2
batches. Per configuration:

- base weights (MiB): the bytes of the base model's tensors: parameters, buffers and, for 4-bit layers, the
  quantisation state (block scales, their own scales, the code book), i.e. what holding the base model costs;
- peak above base (MiB): the peak of live CPU tensor bytes allocated during adapter creation and two training
  steps, from torch's profiler (``profile_memory=True``; the same measure as benchmarks/step_time.py): adapter and
  hypernetwork tensors, activations, gradients, optimizer state, and on a quantized base the dequantized weight
  tiles that bitsandbytes builds per layer call;
- median step time (ms) and its IQR over the timed steps (forward + backward + AdamW + rank allocation).

Part 2, loss curves: `hyperadalora train` (the library's training loop, the same batches for both methods at one
seed) with ``--load-in-4bit`` (nf4) for ``--method hyperadalora`` and ``--method adalora``, on SST-2, and the same two
on the fp32 base for reference; per-step task loss (the regulariser left out) smoothed, final dev loss/accuracy.

    .venv/bin/python benchmarks/quantized.py --out docs/results/quantized          # the committed report
    .venv/bin/python benchmarks/quantized.py --quick --out /tmp/q                   # a few steps: checks that it runs

Run with one thread (``--threads 1``, the default) on a shared CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import cpu_peak_bytes, train_step  # noqa: E402

from hyperadalora import data as data_lib  # noqa: E402
from hyperadalora import quantization as Q  # noqa: E402
from hyperadalora import training as T  # noqa: E402
from hyperadalora.base_models import load_model_and_tokenizer  # noqa: E402

MiB = 2 ** 20
BASES = {"fp32": {}, "nf4": {"load_in_4bit": True, "quant_type": "nf4"}, "int8": {"load_in_8bit": True}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quantized", help="folder for report.md, results.json and loss_curves.png")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared",
                                                      "data", "glue"))
    p.add_argument("--task", default="sst2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--cost-steps", type=int, default=10, help="timed steps per configuration (part 1)")
    p.add_argument("--curve-steps", type=int, default=150, help="training steps per run (part 2)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--curve-bases", default="nf4,fp32", help="bases of part 2 (nf4 first)")
    p.add_argument("--max-eval-examples", type=int, default=300)
    p.add_argument("--runs-dir", default="runs/quantized", help="where part 2's training runs write (not committed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-curves", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 timed steps, 4 training steps, one seed")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.cost_steps, opts.curve_steps, opts.seeds, opts.max_eval_examples = 2, 6, "0", 32
    opts.data_dir = os.path.normpath(opts.data_dir)
    return opts


def base_bytes(model) -> int:
    """Bytes of the base model's tensors: parameters, buffers, and the quantisation state of its 4-bit layers."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        while state is not None:
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
        add(getattr(getattr(m, "weight", None), "SCB", None))
        add(getattr(getattr(m, "state", None), "SCB", None))
    return total


class Config:
    """One configuration of part 1: a fresh base (fp32 / nf4 / int8), HyperAdaLoRA, gradient checkpointing or not."""

    def __init__(self, base: str, checkpointing: bool, opts, batches):
        self.name = base + (" + grad. ckpt." if checkpointing else "")
        self.base, self.checkpointing = base, checkpointing
        gc.collect()
        self.args = T.TrainArgs(method="hyperadalora", task=opts.task, max_steps=10_000, batch_size=opts.batch_size,
                                progress=False, save_adapter=False, gradient_checkpointing=checkpointing,
                                **BASES[base])
        quant = T.quantization_config(self.args, "classification") if base != "fp32" else None
        model, _, _ = load_model_and_tokenizer(None, "classification", quantization=quant, device="cpu")
        if Q.is_quantized(model):
            model = Q.prepare_quantized_base(model)
        self.base_mib = base_bytes(model) / MiB
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.model, self.allocate = T.build_adapter_model(self.args, model, "SEQ_CLS")
            if checkpointing:
                Q.enable_gradient_checkpointing(self.model)
            self.model.train()
            self.opt = torch.optim.AdamW(T.param_groups(self.model, self.args), lr=self.args.lr)
            self.n = 0
            for b in batches[:2]:
                self.step(b)
        self.peak_above_mib = cpu_peak_bytes(prof) / MiB
        self.times = []

    def step(self, batch) -> None:
        self.n = train_step(self.model, self.opt, self.allocate, self.n, batch)


def real_batches(opts, n: int) -> list[dict]:
    _, tok, _ = load_model_and_tokenizer(None, "classification")
    examples = data_lib.load_examples(opts.task, "train", opts.data_dir, max_examples=n * opts.batch_size, seed=0)
    ds = data_lib.build_classification_dataset(examples, tok, opts.max_length)
    loader = data_lib.make_dataloader(ds, opts.batch_size, shuffle=False, seed=0,
                                      collate_fn=data_lib.make_collator(tok))
    return list(loader)[:n]


def part_cost(opts) -> dict:
    batches = real_batches(opts, 4)
    configs = [Config(b, ckpt, opts, batches) for b in ("fp32", "nf4", "int8") for ckpt in (False, True)]
    for c in configs:  # warm-up
        c.step(batches[2])
    for i in range(opts.cost_steps):
        order = configs if i % 2 == 0 else configs[::-1]
        for c in order:
            t = time.perf_counter()
            c.step(batches[i % len(batches)])
            c.times.append(time.perf_counter() - t)
    ref = {c.checkpointing: c for c in configs if c.base == "fp32"}
    rows = {}
    for c in configs:
        ms = np.array(c.times) * 1000
        r = ref[c.checkpointing]
        rows[c.name] = {"base": c.base, "gradient_checkpointing": c.checkpointing,
                        "base_weights_mib": round(c.base_mib, 2),
                        "peak_above_base_mib": round(c.peak_above_mib, 2),
                        "peak_total_mib": round(c.base_mib + c.peak_above_mib, 2),
                        "median_step_ms": round(float(np.median(ms)), 1),
                        "iqr_ms": [round(float(x), 1) for x in np.percentile(ms, [25, 75])],
                        "time_vs_fp32": round(float(np.median(ms) / np.median(np.array(r.times) * 1000)), 3),
                        "peak_total_vs_fp32": round((c.base_mib + c.peak_above_mib)
                                                    / (r.base_mib + r.peak_above_mib), 3),
                        "steps_timed": len(ms)}
    return rows


def part_curves(opts, out_dir: str, command: str) -> dict:
    """The training runs of part 2; runs already finished (``runs_dir/curves_partial.json``, written after every run)
    are kept and not run again, so that an interrupted benchmark continues, and later invocations add seeds / bases."""
    partial = os.path.join(opts.runs_dir, "curves_partial.json")
    runs = {}
    if os.path.isfile(partial):
        with open(partial) as f:
            runs = json.load(f)
    for seed in [int(s) for s in opts.seeds.split(",")]:
        for base in opts.curve_bases.split(","):
            for method in ("hyperadalora", "adalora"):
                name = f"{method} {base} seed{seed}"
                if name in runs:
                    continue
                args = T.TrainArgs(method=method, task=opts.task, data_dir=opts.data_dir, max_steps=opts.curve_steps,
                                   batch_size=opts.batch_size, max_length=opts.max_length, seed=seed,
                                   max_eval_examples=opts.max_eval_examples, progress=False, save_adapter=False,
                                   keep_checkpoints=0, overwrite=True,
                                   output_dir=os.path.join(opts.runs_dir, name.replace(" ", "_")), **BASES[base])
                t = time.perf_counter()
                summary = T.train(args)
                with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f]
                steps = [r for r in rows if "task_loss" in r and not r.get("final")]
                runs[name] = {"method": method, "base": base, "seed": seed,
                              "task_loss": [round(r["task_loss"], 5) for r in steps],
                              "final_eval": summary["final_eval"], "median_step_s": summary["median_step_s"],
                              "total_rank": summary["total_rank"], "wall_s": round(time.perf_counter() - t, 1),
                              "command": command}
                print(f"{name}: final eval {summary['final_eval']}, median step {summary['median_step_s']:.3f} s",
                      flush=True)
                with open(partial, "w") as f:
                    json.dump(runs, f)
    return runs


def smooth(x, k: int = 10) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return np.array([x[max(0, i - k + 1):i + 1].mean() for i in range(len(x))])


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"hyperadalora": "tab:red", "adalora": "tab:blue"}
    for name, r in runs.items():
        style = "-" if r["base"] == "nf4" else ":"
        ax.plot(range(1, len(r["task_loss"]) + 1), smooth(r["task_loss"]), style, color=colors[r["method"]],
                alpha=0.9 if r["seed"] == 0 else 0.55, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training task loss (10-step mean)")
    ax.set_title("MiniLM on SST-2: 4-bit nf4 base (solid) vs fp32 base (dotted)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def mean_over_seeds(runs: dict) -> dict:
    groups = {}
    for r in runs.values():
        groups.setdefault((r["method"], r["base"]), []).append(r)
    return {key: {"final_task_loss": float(np.mean([np.mean(r["task_loss"][-10:]) for r in rs])),
                  "dev_loss": float(np.mean([r["final_eval"]["eval_loss"] for r in rs])),
                  "dev_accuracy": float(np.mean([r["final_eval"]["accuracy"] for r in rs])), "seeds": len(rs)}
            for key, rs in groups.items()}


def report(result: dict) -> str:
    lines = ["# HyperAdaLoRA on a quantized base (bitsandbytes)", "",
             f"Machine: {result['machine']}; torch {result['torch']}, bitsandbytes {result['bitsandbytes']}, "
             f"{result['threads']} thread(s), a CPU shared with other jobs (times are noisy; steps interleaved).", ""]
    if result.get("cost"):
        lines += ["## Step time and memory (HyperAdaLoRA, MiniLM, batch "
                  f"{result['batch_size']} x {result['max_length']} tokens of SST-2)", "",
                  f"Command: `{result.get('cost_command', result['command'])}`", "",
                  "| base | base weights (MiB) | peak above base (MiB) | peak total (MiB) | "
                  "total / fp32 | median step (ms) | IQR (ms) | time / fp32 |", "|---|---|---|---|---|---|---|---|"]
        for name, r in result["cost"].items():
            lines.append(f"| {name} | {r['base_weights_mib']:.1f} | "
                         f"{r['peak_above_base_mib']:.1f} | {r['peak_total_mib']:.1f} | {r['peak_total_vs_fp32']:.2f} | "
                         f"{r['median_step_ms']:.0f} | {r['iqr_ms'][0]:.0f}-{r['iqr_ms'][1]:.0f} | "
                         f"{r['time_vs_fp32']:.2f} |")
        lines += ["", "Memory: base weights = bytes of the base model's tensors (parameters, buffers, 4-bit "
                  "quantisation state); peak above base = torch profiler's peak of live CPU tensor bytes over adapter "
                  "creation + 2 training steps (process RSS deltas were tried and left out: "
                  "one-time library initialisation and allocator reuse dominate them at this size). "
                  "`/ fp32` compares with the fp32 row of the same checkpointing setting. Steps interleaved across "
                  "configurations.", ""]
    if result.get("curves"):
        lines += ["## Loss curves: HyperAdaLoRA vs peft's AdaLoRA on the same base", "",
                  "Commands (the runs of one or more invocations; each run's own is in results.json):", "",
                  *[f"- `{c}`" for c in sorted({r.get("command", result["command"]) for r in result["curves"].values()})],
                  *([f"", result["notes"]] if result.get("notes") else []), "",
                  "![loss curves](loss_curves.png)", "",
                  "| run | final task loss (last 10 steps) | dev loss | dev accuracy | median step (s) | final total "
                  "rank |", "|---|---|---|---|---|---|"]
        for name, r in result["curves"].items():
            ev = r["final_eval"]
            lines.append(f"| {name} | {np.mean(r['task_loss'][-10:]):.4f} | {ev.get('eval_loss', float('nan')):.4f} | "
                         f"{ev.get('accuracy', float('nan')):.3f} | {r['median_step_s']:.3f} | {r['total_rank']} |")
        lines += ["", "Mean over seeds:", "", "| method | base | final task loss (last 10 steps) | dev loss | "
                  "dev accuracy |", "|---|---|---|---|---|"]
        for (method, base), rs in mean_over_seeds(result["curves"]).items():
            lines.append(f"| {method} | {base} | {rs['final_task_loss']:.4f} | {rs['dev_loss']:.4f} | "
                         f"{rs['dev_accuracy']:.3f} |")
        lines += ["", f"{result['curve_steps']} steps, batch {result['batch_size']}, max length {result['max_length']}, "
                  f"lr 1e-3 (linear decay), `hyperadalora train` defaults otherwise; dev = {result['max_eval_examples']} "
                  f"SST-2 dev examples. The two methods of one seed see the same batches. The median step times of this "
                  f"table come from runs that shared the CPU with other jobs (part 1 compares times properly).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    os.makedirs(opts.out, exist_ok=True)
    import bitsandbytes

    result = {"command": "python benchmarks/quantized.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "threads": opts.threads,
              "batch_size": opts.batch_size, "max_length": opts.max_length, "curve_steps": opts.curve_steps,
              "max_eval_examples": opts.max_eval_examples,
              "memory_method": "base: tensor bytes; peak: torch.profiler profile_memory (live CPU tensor bytes)"}
    previous = os.path.join(opts.out, "results.json")
    if (opts.skip_cost or opts.skip_curves) and os.path.isfile(previous):  # keep the other part of an earlier run
        with open(previous) as f:
            old = json.load(f)
        result["notes"] = old.get("notes")
        for part in ("cost", "curves"):
            if part in old:
                result[part] = old[part]
                result[part + "_command"] = old.get(part + "_command", old["command"])
        if opts.skip_curves and "curves" in old:
            result.update({k: old[k] for k in ("curve_steps", "max_eval_examples")})
    if not opts.skip_cost:
        result["cost"] = part_cost(opts)
        result["cost_command"] = result["command"]
        print(json.dumps(result["cost"], indent=1), flush=True)
    if not opts.skip_curves:
        result["curves"] = part_curves(opts, opts.out, result["command"])
        result["curves_command"] = "; ".join(sorted({r.get("command", result["command"])
                                                     for r in result["curves"].values()}))
    if result.get("curves"):
        plot(result["curves"], os.path.join(opts.out, "loss_curves.png"))
    with open(os.path.join(opts.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(opts.out, "report.md"), "w") as f:
        f.write(report(result))
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
