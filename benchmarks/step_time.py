"""Training-step time and peak memory of HyperAdaLoRA vs peft's AdaLoRA and LoRA, side by side, in one run.

Every method wraps a fresh copy of the same base model through `hyperadalora.training.build_adapter_model` with
the same `TrainArgs` (init_r=3, target_r=2, the same target modules, max_steps=10_000 so that no rank masking
happens while measuring unless --allocate-during), and trains with AdamW on `training.param_groups`. One step =
forward on a synthetic batch (random token ids, attention mask of ones, random labels) + backward +
optimizer.step + allocate(step) (HyperAdaLoRA, AdaLoRA) + zero_grad.

Time: the methods' steps are interleaved (step i runs every method once, in the order ABC, then CBA, ...), so
drifting background load hits all methods alike; the table gives the median and the inter-quartile range of
the measured steps (after --warmup steps), in ms. CUDA steps are synchronised before and after.

Peak memory: the tensor memory of a training step, i.e. the frozen base-model weights (the same for every
method) + the peak, over adapter creation and --mem-steps full training steps, of all tensor memory allocated
above them: adapter / hypernetwork parameters and state, activations, gradients and optimizer state. On CUDA
this is `torch.cuda.max_memory_allocated` (reset before each method) minus the memory allocated before the
adapter is created; on the CPU, torch's profiler (`profile_memory=True`) records every tensor allocation and
free with its address: the peak of the live bytes allocated inside that window (frees of older blocks are
ignored). The memory steps are not timed (the profiler slows them down); they also count as warm-up.

Targets (issue 4), checked at the end for every batch size >= 8: HyperAdaLoRA / AdaLoRA <= 1.00 in median
step time and in peak memory; HyperAdaLoRA / LoRA <= 1.10 in median step time. The summary also gives the
paired ratio (median over iterations of HyperAdaLoRA's step / AdaLoRA's step of the same iteration) with a 95%
bootstrap interval: when that interval contains 1.00 the run cannot tell the two step times apart.

    python benchmarks/step_time.py --batch-sizes 1,2,4,8,16,32 --steps 20 --json step_time.json
    python benchmarks/step_time.py --device cuda --dtype bfloat16 --hyper attention=full --markdown out.md
    python benchmarks/step_time.py --quick          # batch 1 and 8, 16 tokens, 2 steps: checks that it runs

LLM token counts (issue 33): ``--seq-lens 512,1024`` runs every (sequence length, batch size) cell in one run and
writes one table (``cells`` in the JSON) with the paired ratios against AdaLoRA and LoRA and the goal (HyperAdaLoRA
<= AdaLoRA, <= 1.05 x LoRA); ``--llama-width 2048`` builds a random-weight Llama-style stack (``--llama-layers``
decoder layers, intermediate 8/3 x width rounded to 256, head dim 128, vocabulary ``--llama-vocab``) instead of
``--model``; ``--no-memory`` skips the profiled memory window (its steps still warm up). ``--models`` runs several
models (aliases, or ``llama-2048`` / ``llama-4096`` for the random stacks) into the same table:

    python benchmarks/step_time.py --kind instruction --models smollm2,llama-2048,llama-4096 --seq-lens 512,1024 \
        --batch-sizes 1,4 --steps 4 --warmup 1 --no-memory --json llm.json --markdown llm.md
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import platform
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig

from hyperadalora import training as T
from hyperadalora.base_models import load_model_and_tokenizer, resolve_model_path

MiB = 2 ** 20


def _value(text: str):
    try:  # numbers (and True/False/None); anything else stays a string
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (SmolLM2 with --kind instruction)")
    p.add_argument("--kind", default="classification", choices=["classification", "instruction"],
                   help="classification (SEQ_CLS, 2 labels) or instruction (CAUSAL_LM, labels = input ids)")
    p.add_argument("--batch-sizes", default="16", help="comma list, e.g. 1,2,4,8,16,32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="measured steps per method and batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the measured ones (after --mem-steps)")
    p.add_argument("--mem-steps", type=int, default=2, help="training steps inside the memory measurement (>= 2)")
    p.add_argument("--methods", default="hyperadalora,adalora,lora")
    p.add_argument("--hyper", action="append", default=[], metavar="KEY=VALUE",
                   help=f"HyperAdaLoRA option (repeatable), one of: {', '.join(T.HYPER_FIELDS)}")
    p.add_argument("--init-r", type=int, default=3)
    p.add_argument("--target-r", type=int, default=2)
    p.add_argument("--allocate-during", action="store_true",
                   help="short schedule (max_steps=2*total steps, tinit=0, deltaT=1): masking on every measured step")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-init", action="store_true",
                   help="build the model from its config with random weights (same timing; no weights file needed)")
    p.add_argument("--quick", action="store_true", help="batch sizes 1,8, --seq-len 16, 2 steps, 1 warm-up")
    p.add_argument("--seq-lens", default=None, help="comma list: every (sequence length, batch size) cell, one table")
    p.add_argument("--models", default=None, help="comma list of models for the cells table (aliases, directories, or "
                                                   "llama-WIDTH: a random-weight Llama-style stack)")
    p.add_argument("--llama-width", type=int, default=None, help="random-weight Llama-style stack of this width")
    p.add_argument("--llama-layers", type=int, default=2)
    p.add_argument("--smollm2-layers", type=int, default=30,
                   help="smollm2-arch: keep this many of SmolLM2-135M's 30 decoder layers (a busy CPU's budget)")
    p.add_argument("--llama-vocab", type=int, default=4096)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement (faster on big models)")

    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--markdown", default=None, metavar="OUT.md")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_sizes, a.seq_len, a.steps, a.warmup = "1,8", 16, 2, 1
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    a.seq_lens = [int(x) for x in a.seq_lens.split(",") if x.strip()] if a.seq_lens else None
    a.models = [x.strip() for x in a.models.split(",") if x.strip()] if a.models else None
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in T.METHODS]
    if bad or not a.methods:
        p.error(f"--methods: unknown {bad}; choose from {T.METHODS}")
    if a.mem_steps < 2 or a.steps < 1 or a.warmup < 0 or min(a.batch_sizes, default=0) < 1:
        p.error("need --mem-steps >= 2 (optimizer state appears at step 1), --steps >= 1, --warmup >= 0 "
                "and batch sizes >= 1")
    if any("=" not in item for item in a.hyper):
        p.error("--hyper takes KEY=VALUE")
    a.hyper = {k.strip(): _value(v.strip()) for k, v in (item.split("=", 1) for item in a.hyper)}
    return a


def train_args(method: str, opts) -> T.TrainArgs:
    total = opts.mem_steps + opts.warmup + opts.steps
    schedule = (dict(max_steps=max(10, 2 * total), tinit=0, tfinal=1, deltaT=1) if opts.allocate_during
                else dict(max_steps=10_000))
    return T.TrainArgs(method=method, model=opts.model, init_r=opts.init_r, target_r=opts.target_r, seed=opts.seed,
                       dtype=opts.dtype, hyper=dict(opts.hyper), progress=False, save_adapter=False, **schedule)


class Runner:
    """One method: its wrapped model, optimizer, allocate callable and step counter."""

    def __init__(self, method: str, opts, base, device: torch.device):
        self.args = train_args(method, opts)
        task_type = "SEQ_CLS" if opts.kind == "classification" else "CAUSAL_LM"
        self.model, self.allocate = T.build_adapter_model(self.args, base, task_type)
        self.model.to(device).train()
        self.opt = T.make_optimizer(self.model, self.args)
        self.trainable = sum(p.numel() for g in self.opt.param_groups for p in g["params"])
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if opts.dtype == "bfloat16" \
            else contextlib.nullcontext
        self.n = 0

    def step(self, batch: dict) -> None:
        self.n = train_step(self.model, self.opt, self.allocate, self.n, batch, self.autocast)


def train_step(model, opt, allocate, n: int, batch: dict, autocast=contextlib.nullcontext) -> int:
    """One training step as `hyperadalora train` takes it: forward (under ``autocast()``) + backward +
    ``opt.step()`` + ``allocate(n + 1)`` (rank allocation / recurrent commit; None: nothing) + ``zero_grad``.
    ``n``: optimizer steps done before it; returns the count after it (``n + 1``). The step this benchmark and
    benchmarks/quantized.py time."""
    with autocast():
        out = model(**batch)
    out.loss.backward()
    opt.step()
    n += 1
    if allocate is not None:
        allocate(n)
    opt.zero_grad(set_to_none=True)
    return n


def make_batches(opts, vocab: int, batch_size: int, device, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(opts.seed + batch_size)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, opts.seq_len), generator=g)
        labels = ids.clone() if opts.kind == "instruction" else torch.randint(0, 2, (batch_size,), generator=g)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": labels.to(device)})
    return batches


def cpu_peak_bytes(prof) -> int:
    """Peak of the live CPU tensor bytes allocated inside the profiled window (allocation events of the
    profiler's event tree; frees of blocks allocated before the window are ignored)."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
              if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"]
    live, running, peak = {}, 0, 0
    for n in sorted(events, key=lambda n: n.start_time_ns):
        ptr, size = n.extra_fields.ptr, n.extra_fields.alloc_size
        if size > 0:
            live[ptr] = size
            running += size
        elif ptr in live:
            running -= live.pop(ptr)
        peak = max(peak, running)
    return peak


def build_and_measure_memory(method: str, opts, device, batches) -> tuple[Runner, int, int, dict]:
    """A fresh base model wrapped with ``method``: (runner, base-weight bytes, peak bytes above them, info)."""
    T.set_seed(opts.seed)
    if opts.model == "smollm2-arch":
        base = smollm2_architecture(opts.smollm2_layers)
        path = (f"SmolLM2-135M's architecture (its config; {opts.smollm2_layers} of its 30 decoder layers), random "
                f"weights: a step costs what it costs with the real weights")
    elif opts.llama_width:
        base = random_llama(opts.llama_width, opts.llama_layers, opts.llama_vocab)
        path = f"random Llama-style stack: width {opts.llama_width}, {opts.llama_layers} layers"
    elif opts.random_init:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        path = resolve_model_path(opts.model, opts.kind)
        config = AutoConfig.from_pretrained(path, num_labels=2)
        auto = AutoModelForCausalLM if opts.kind == "instruction" else AutoModelForSequenceClassification
        base = auto.from_config(config)
        path += " (random weights)"
    else:
        base, _, path = load_model_and_tokenizer(opts.model, opts.kind, num_labels=2)
    base.to(device)
    base_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    targets = T.default_target_modules(base)
    gc.collect()
    if device.type == "cuda":
        with torch.no_grad():   # allocate the cuBLAS workspace etc. before the window, for every method alike
            base(**{k: v for k, v in batches[0].items() if k != "labels"})
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        runner = Runner(method, opts, base, device)
        for i in range(opts.mem_steps):
            runner.step(batches[i % len(batches)])
        torch.cuda.synchronize()
        added = torch.cuda.max_memory_allocated() - start
    elif opts.no_memory:
        runner = Runner(method, opts, base, device)
        for i in range(opts.mem_steps):
            runner.step(batches[i % len(batches)])
        added = float("nan")
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner = Runner(method, opts, base, device)
            for i in range(opts.mem_steps):
                runner.step(batches[i % len(batches)])
        added = cpu_peak_bytes(prof)
    return runner, base_bytes, added, {"model": path, "targets": targets}


def run_batch_size(opts, batch_size: int, device) -> tuple[dict, dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    vocab = (opts.llama_vocab if opts.llama_width else SMOLLM2_135M["vocab_size"] if opts.model == "smollm2-arch" else
             AutoConfig.from_pretrained(resolve_model_path(opts.model, opts.kind)).vocab_size)
    batches = make_batches(opts, vocab, batch_size, device)
    runners, results, info = {}, {}, {}
    for method in opts.methods:
        runner, base_bytes, added, info = build_and_measure_memory(method, opts, device, batches)
        runners[method] = runner
        results[method] = {"base_weights_mib": base_bytes / MiB, "added_peak_mib": added / MiB,
                           "peak_mib": (base_bytes + added) / MiB, "trainable_params": runner.trainable}
    times = {m: [] for m in opts.methods}
    gc.collect()
    for i in range(opts.warmup + opts.steps):
        order = opts.methods if i % 2 == 0 else opts.methods[::-1]
        for method in order:
            batch = batches[i % len(batches)]
            sync()
            t0 = time.perf_counter()
            runners[method].step(batch)
            sync()
            if i >= opts.warmup:
                times[method].append((time.perf_counter() - t0) * 1000)
    for method in opts.methods:
        t = np.array(times[method])
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        results[method].update(median_ms=float(med), iqr_ms=float(q3 - q1), times_ms=t.round(3).tolist(),
                               total_rank=T.total_rank(runners[method].model), steps_done=runners[method].n)
    for method in opts.methods:
        for ref in ("adalora", "lora"):
            r = results.get(ref)
            results[method][f"time_vs_{ref}"] = results[method]["median_ms"] / r["median_ms"] if r else None
            results[method][f"mem_vs_{ref}"] = results[method]["peak_mib"] / r["peak_mib"] if r else None
            results[method][f"paired_vs_{ref}"] = paired_ratio(times[method], times[ref]) if r else None
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, info


# SmolLM2-135M(-Instruct)'s config (the `smollm2` alias's model): for a machine where its weights are not installed,
# ``--models smollm2-arch`` builds the same architecture with random weights (a step costs the same)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)


def smollm2_architecture(layers: int = 30):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})).eval()


def random_llama(width: int, layers: int, vocab: int):
    """A random-weight Llama-style decoder stack: ``layers`` layers of width ``width`` (Llama-2-7B's shapes at 4096:
    intermediate 11008, 32 heads of 128), a ``vocab``-token embedding and head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    inter = {4096: 11008, 8192: 28672}.get(width, int(round(width * 8 / 3 / 256)) * 256)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=width // 128, num_key_value_heads=width // 128, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


GOAL = {"paired_vs_adalora": 1.00, "paired_vs_lora": 1.05}  # issue 33: per cell, on the paired median ratio


def run_cells(opts, device, partial=None) -> list[dict]:
    """Every (model, sequence length, batch size) cell: one `run_batch_size` each, the methods interleaved.
    ``partial(cells)`` is called after each cell (the JSON so far: a long run that is stopped keeps its cells)."""
    import copy

    cells = []
    for model in opts.models or [opts.model]:
        for seq in opts.seq_lens:
            for batch in opts.batch_sizes:
                o = copy.copy(opts)
                o.seq_len = seq
                if model and model.startswith("llama-"):
                    o.llama_width, o.model = int(model.split("-", 1)[1]), None
                elif model:
                    o.model = model
                t0 = time.perf_counter()
                results, info = run_batch_size(o, batch, device)
                cell = {"model": model or "default", "model_info": info, "seq_len": seq, "batch": batch,
                        "tokens": seq * batch, "dtype": opts.dtype, "results": results,
                        "wall_s": time.perf_counter() - t0}
                cells.append(cell)
                print(cell_table([cell], header=False), flush=True)
                if partial is not None:
                    partial(cells)
    return cells


def cell_table(cells: list, header: bool = True) -> str:
    """One row per cell: the three medians, the paired ratios with their 95% intervals, and the goal."""
    rows = ["| model | seq | batch | dtype | hyperadalora (ms) | adalora (ms) | lora (ms) | hyper / adalora, paired "
            "[95% CI] | hyper / lora, paired [95% CI] | goal (<= 1.00 x adalora, <= 1.05 x lora) |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"] if header else []
    for c in cells:
        r = c["results"]
        h = r.get("hyperadalora", {})
        ms = lambda m: format(r[m]["median_ms"], ".0f") if m in r else "-"  # noqa: E731
        pr = lambda k: (f"{h[k]['median']:.3f} [{h[k]['ci95'][0]:.3f}, {h[k]['ci95'][1]:.3f}]"  # noqa: E731
                        if h.get(k) else "-")
        verdict = goal_verdict(h)
        rows.append(f"| {c['model']} | {c['seq_len']} | {c['batch']} | {c['dtype']} | {ms('hyperadalora')} | "
                    f"{ms('adalora')} | {ms('lora')} | {pr('paired_vs_adalora')} | {pr('paired_vs_lora')} | "
                    f"{verdict} |")
    return "\n".join(rows)


def goal_verdict(h: dict) -> str:
    """met / not met per goal, on the paired median (and whether its interval says the run cannot tell)."""
    parts = []
    for key, limit in GOAL.items():
        p = h.get(key)
        if not p:
            continue
        name = key.split("_")[-1]
        if p["median"] <= limit:
            parts.append(f"{name}: met")
        elif p["ci95"][0] <= limit:
            parts.append(f"{name}: not met, within noise ({p['median']:.3f}; interval reaches {limit:.2f})")
        else:
            parts.append(f"{name}: not met ({p['median']:.3f})")
    return "; ".join(parts) or "-"


def paired_ratio(times: list, reference: list, n_boot: int = 2000, seed: int = 0) -> dict:
    """Median over the timed iterations of the per-iteration ratio time / reference time (the two steps of an
    iteration run back to back, so slow drifts of the machine's load cancel), with a 95% bootstrap interval of
    that median: the noise band a single run's ratio has to be read against."""
    ratios = np.asarray(times, dtype=float) / np.asarray(reference, dtype=float)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratios, size=(n_boot, len(ratios))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(ratios)), "ci95": [float(lo), float(hi)]}


def table(results: dict) -> str:
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    rows = ["| method | median step (ms) | IQR (ms) | peak memory (MiB) | time / adalora | time / lora "
            "| memory / adalora | memory / lora | above base (MiB) | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in results.items():
        rows.append(f"| {m} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['peak_mib']:.1f} | "
                    f"{fmt(r['time_vs_adalora'], '.2f')} | {fmt(r['time_vs_lora'], '.2f')} | "
                    f"{fmt(r['mem_vs_adalora'], '.2f')} | {fmt(r['mem_vs_lora'], '.2f')} | "
                    f"{r['added_peak_mib']:.1f} | {r['trainable_params']:,} |")
    return "\n".join(rows)


TARGETS = {"time_vs_adalora": 1.00, "mem_vs_adalora": 1.00, "time_vs_lora": 1.10}   # at batch >= 8


def summary(out: dict) -> tuple[str, dict]:
    """One row per batch size (HyperAdaLoRA against both baselines) and the targets' verdicts."""
    rows = ["| batch | hyperadalora (ms) | adalora (ms) | lora (ms) | time / adalora | paired time / adalora "
            "[95% CI] | time / lora | memory hyperadalora / adalora / lora (MiB) | memory / adalora | "
            "targets (batch >= 8) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    verdicts = {}
    fmt = lambda r, k, f: format(r[k], f) if r.get(k) is not None else "-"  # noqa: E731
    for batch, results in out["results"].items():
        h = results.get("hyperadalora")
        if h is None:
            continue
        a, lo = results.get("adalora", {}), results.get("lora", {})
        checks = {k: h.get(k) <= v for k, v in TARGETS.items() if h.get(k) is not None} if int(batch) >= 8 else {}
        if checks:
            verdicts[batch] = checks
        verdict = ("-" if not checks else "all met" if all(checks.values())
                   else "missed: " + ", ".join(k for k, ok in checks.items() if not ok))
        mems = " / ".join(format(r["peak_mib"], ".0f") for r in (h, a, lo) if r)
        p = h.get("paired_vs_adalora")
        paired = f"{p['median']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]" if p else "-"
        rows.append(f"| {batch} | {h['median_ms']:.1f} | {fmt(a, 'median_ms', '.1f')} | {fmt(lo, 'median_ms', '.1f')} | "
                    f"{fmt(h, 'time_vs_adalora', '.3f')} | {paired} | {fmt(h, 'time_vs_lora', '.3f')} | {mems} | "
                    f"{fmt(h, 'mem_vs_adalora', '.4f')} | {verdict} |")
    return "\n".join(rows), verdicts


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    import peft
    import transformers

    cuda = device.type == "cuda"
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    env = {"device": torch.cuda.get_device_name(device) if cuda else cpu, "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
           **{k: getattr(opts, k) for k in ("seq_len", "dtype", "steps", "warmup", "mem_steps", "hyper",
                                             "allocate_during", "init_r", "target_r", "seed")},
           "memory_method": ("torch.cuda.max_memory_allocated" if cuda else
                             "torch.profiler profile_memory (live CPU tensor bytes allocated in the window)")
           + f": base weights + peak above them over adapter creation and {opts.mem_steps} training steps"}
    if opts.seq_lens:  # the cells table (LLM token counts)
        env.update(seq_len=opts.seq_lens, batch_sizes=opts.batch_sizes, models=opts.models or [opts.model],
                   llama_layers=opts.llama_layers, llama_vocab=opts.llama_vocab, no_memory=opts.no_memory,
                   smollm2_layers=opts.smollm2_layers)
        out = {"env": env, "goal": GOAL, "cells": []}

        def partial(cells):
            if opts.json:
                with open(opts.json, "w") as f:
                    json.dump({**out, "cells": cells, "partial": True}, f, indent=2, default=str)

        out["cells"] = run_cells(opts, device, partial)
        text = cell_table(out["cells"])
        header = "\n".join(f"- {k}: {v}" for k, v in env.items())
        print("\n" + text + "\n\n" + header)
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(out, f, indent=2, default=str)
        if opts.markdown:
            with open(opts.markdown, "w") as f:
                f.write("# Training step time at LLM token counts\n\n" + header + "\n\n" + text + "\n")
        return out
    out, lines = {"env": env, "results": {}}, []
    for batch_size in opts.batch_sizes:
        results, info = run_batch_size(opts, batch_size, device)
        env.update(info)
        out["results"][str(batch_size)] = results
        lines += [f"\n### batch size {batch_size}\n", table(results)]
        print(lines[-2] + "\n" + lines[-1], flush=True)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    overview, verdicts = summary(out)
    out["targets"] = {"limits": TARGETS, "verdicts": verdicts}
    lines = ["\n## All batch sizes\n", overview,
             f"\nTargets at batch >= 8: time / adalora <= {TARGETS['time_vs_adalora']:.2f}, memory / adalora <= "
             f"{TARGETS['mem_vs_adalora']:.2f}, time / lora <= {TARGETS['time_vs_lora']:.2f}.\n"] + lines
    print("\n" + "\n".join(lines[:3]))
    print("\n" + header)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write("# Training step: time and peak memory\n\n" + header + "\n" + "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
