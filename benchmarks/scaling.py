"""How the hypernetworks' share of a training step grows with the number of adapted layers, their width, the
rank and the token layout (synthetic stacks of linear layers), and what that predicts for a 7-8B model.

The synthetic model: ``--batch x --seq`` input vectors through a stack of ``n_layers`` frozen ``width x width``
nn.Linear layers (``x <- layer_norm(x + layer(x))``, loss = mean square of the output); every layer adapted.
Per configuration, with the methods' steps interleaved and the median over ``--repeats`` steps (after
``--warmup``):

- ``gen``: the hypernetworks alone: HyperAdaLoRA's generation of P, lambda and Q for all layers (the batched
  passes, `HyperAdaLoraModel._generate`) and its backward from a fixed random upstream gradient (with the
  activation recomputation of ``hypernet_checkpointing``), i.e. what the hypernetworks add to a step;
- ``step``: a full HyperAdaLoRA training step (forward, backward, AdamW, update_and_allocate);
- ``adalora``: the same step with peft's AdaLoRA (trained P, lambda, Q: no hypernetwork) on the same stack;
- ``share = gen / step`` and ``overhead = step / adalora``;
- ``tokens``: hypernetwork tokens per step over the three roles: ``sum_i (d_out_i + d_in_i) + n * r`` in the row
  layout (a row of P / a column of Q of width r, one token per singular value), ``r`` times as many in the
  element layout (every scalar a token).

Sweeps (one factor at a time around the base point --layers/--width/--rank, for both token layouts): layers
6..96, width 256..4096, rank 2..16. Each sweep's log-log slope of ``gen`` (and of ``share``) is the fitted
exponent; a fit of ``gen`` against ``tokens`` over all configurations gives the cost per token.

``--model-shapes llama-8b`` (CUDA) also measures the generation at the exact adapted-layer shapes of a
Llama-3-8B (32 blocks x q, k, v, o, gate, up, down = 224 layers) with a bf16 stack of those projections, and
compares it with the prediction of the per-token fit.

    python benchmarks/scaling.py --quick                      # a couple of small sizes, seconds (a check)
    python benchmarks/scaling.py --json scaling.json --markdown scaling.md --plot scaling.png
    python benchmarks/scaling.py --device cuda --model-shapes llama-8b --json ... --markdown ... --plot ...
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hyperadalora as ha

MiB = 2 ** 20
SWEEPS = {"layers": [6, 12, 24, 48, 96], "width": [256, 512, 1024, 2048, 4096], "rank": [2, 4, 8, 16]}
QUICK_SWEEPS = {"layers": [4, 8], "width": [64, 128], "rank": [2, 4]}
# adapted projections of one transformer block: name -> (in, out) as functions of (hidden, kv, intermediate)
LLAMA_SHAPES = {"llama-8b": dict(blocks=32, hidden=4096, kv=1024, inter=14336),
                "tiny": dict(blocks=2, hidden=64, kv=16, inter=224)}   # same structure, for a quick check


class Output:
    def __init__(self, loss):
        self.loss = loss


class Stack(nn.Module):
    """n frozen width x width linear layers, x <- layer_norm(x + layer(x)); loss = mean(out^2).

    ``device="meta"``: weights without storage (only their shapes), for timing the generation alone."""

    TARGETS = r"layers\.\d+"

    def __init__(self, n_layers: int, width: int, device=None, dtype=None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # a real tensor first: the adapter's device
        self.layers = nn.ModuleList(nn.Linear(width, width, device=device, dtype=dtype) for _ in range(n_layers))

    def forward(self, x, **_):
        for layer in self.layers:
            x = F.layer_norm(x + layer(x), x.shape[-1:])
        return Output(x.float().pow(2).mean())


class Block(nn.Module):
    """The adapted projections of a Llama block, wired so that every one is in the graph (no attention scores)."""

    def __init__(self, hidden, kv, inter, device=None, dtype=None):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=dtype)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(hidden, hidden), lin(hidden, kv), lin(hidden, kv), \
            lin(hidden, hidden)
        self.gate_proj, self.up_proj, self.down_proj = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)
        self.rep = hidden // kv

    def forward(self, x):
        kv = (self.k_proj(x) + self.v_proj(x)).repeat_interleave(self.rep, dim=-1)
        x = F.layer_norm(x + self.o_proj(self.q_proj(x) * torch.sigmoid(kv)), x.shape[-1:])
        return F.layer_norm(x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), x.shape[-1:])


class LlamaShaped(nn.Module):
    TARGETS = r".*_proj"

    def __init__(self, blocks, hidden, kv, inter, device=None, dtype=None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.layers = nn.ModuleList(Block(hidden, kv, inter, device, dtype) for _ in range(blocks))

    def forward(self, x, **_):
        for block in self.layers:
            x = block(x)
        return Output(x.float().pow(2).mean())


# ---------------------------------------------------------------------------------------------- measuring
def hyper_config(rank: int, tokens: str, targets: str, opts) -> ha.HyperAdaLoraConfig:
    """Defaults of HyperAdaLoraConfig; no masking while measuring (as in step_time.py)."""
    return ha.HyperAdaLoraConfig(init_r=rank, target_r=max(1, rank // 2), lora_alpha=16, target_modules=targets,
                                 total_step=10 ** 6, tinit=10 ** 6 - 2, tfinal=1, tokens=tokens, seed=opts.seed)


def hypernetwork_description() -> str:
    """The library defaults the sweeps run with, read from HyperAdaLoraConfig (not restated by hand)."""
    c = ha.HyperAdaLoraConfig()
    parts = [c.hypernet + (f" ({c.attention})" if c.hypernet == "attention" else ""), f"d_h={c.hypernet_dim}",
             f"ffn_mult={c.hypernet_ffn_mult}", f"context={c.context}", f"feature_dim={c.feature_dim}", c.generation,
             "hypernet_checkpointing" if c.hypernet_checkpointing else "no checkpointing"]
    return "library defaults (" + ", ".join(parts) + ")"


def adalora_model(base, rank: int):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=rank, target_r=max(1, rank // 2), lora_alpha=16, target_modules=base.TARGETS,
                        total_step=10 ** 6, tinit=10 ** 6 - 2, tfinal=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, cfg)


def hypernet_tokens(model: ha.HyperAdaLoraModel) -> int:
    """Tokens through the three hypernetworks per step (one pass each)."""
    total = 0
    for g in model.generators.values():
        per = 1 if not g.element else g.width
        total += sum(s.shape[0] * s.shape[1] * per for s in g.states())
    return total


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000


def measure(make_base, rank: int, tokens: str, opts, device, x, methods=("gen", "step", "adalora"),
            bf16: bool = False) -> dict:
    """Median ms of the hypernetworks' generation (fwd + bwd), a HyperAdaLoRA step and an AdaLoRA step."""
    timer = Timer(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    torch.manual_seed(opts.seed)
    base = make_base()
    hyper = ha.get_peft_model(base, hyper_config(rank, tokens, base.TARGETS, opts))
    if methods == ("gen",):  # the base weights may be shape-only (meta): move the generation only
        hyper.generators.to(device)
        hyper.allocator.mask = hyper.allocator.mask.to(device)
    else:
        hyper.to(device)
    hyper.train()
    opt_h = torch.optim.AdamW(hyper.optimizer_param_groups(1e-4))
    upstream = {role: [torch.randn_like(s) for s in hyper.generators[role].states()] for role in hyper.ROLES}
    result = {"tokens": hypernet_tokens(hyper), "n_layers": hyper.n_layers,
              "hypernet_params": sum(p.numel() for p in hyper.hypernetwork_parameters())}
    runners, steps = {}, {"hyper": 0, "adalora": 0}

    def gen():
        outs = hyper._generate(track=False)
        torch.autograd.backward([t for r in hyper.ROLES for t in outs[r]], [u for r in hyper.ROLES for u in upstream[r]])
        hyper.zero_grad(set_to_none=True)

    def step_hyper():
        with autocast():
            out = hyper(x)
        out.loss.backward()
        opt_h.step()
        steps["hyper"] += 1
        hyper.update_and_allocate(steps["hyper"])
        opt_h.zero_grad(set_to_none=True)

    if "gen" in methods:
        runners["gen"] = gen
    if "step" in methods:
        runners["step"] = step_hyper
    if "adalora" in methods:
        ada = adalora_model(make_base(), rank).to(device).train()
        opt_a = torch.optim.AdamW([p for p in ada.parameters() if p.requires_grad], lr=1e-4)

        def step_adalora():
            with autocast():
                out = ada(x)
            out.loss.backward()
            opt_a.step()
            steps["adalora"] += 1
            ada.base_model.update_and_allocate(steps["adalora"])
            opt_a.zero_grad(set_to_none=True)

        runners["adalora"] = step_adalora
    if device.type == "cuda" and "gen" in runners:  # peak memory of the generation (fwd + bwd) on its own
        gen()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        gen()
        torch.cuda.synchronize()
        result["gen_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / MiB
    times = {k: [] for k in runners}
    names = list(runners)
    for i in range(opts.warmup + opts.repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            t = timer(runners[name])
            if i >= opts.warmup:
                times[name].append(t)
    for name, t in times.items():
        result[f"{name}_ms"] = float(np.median(t))
    if "gen_ms" in result and "step_ms" in result:
        result["share"] = result["gen_ms"] / result["step_ms"]
    if "step_ms" in result and "adalora_ms" in result:
        result["overhead"] = result["step_ms"] / result["adalora_ms"]
    del runners, hyper
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    xs, ys = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 1 else float("nan")


def run_sweeps(opts, device) -> list[dict]:
    sweeps = QUICK_SWEEPS if opts.quick else SWEEPS
    for name in ("layers", "width", "rank"):
        if getattr(opts, f"{name}_values"):
            sweeps = {**sweeps, name: getattr(opts, f"{name}_values")}
    sweeps = {name: values for name, values in sweeps.items() if name in opts.sweeps}
    base = {"layers": opts.layers, "width": opts.width, "rank": opts.rank}
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    rows = []
    methods = ("gen",) if opts.gen_only else ("gen", "step", "adalora")
    base_device = "meta" if opts.gen_only else device
    for sweep, values in sweeps.items():
        for layout in opts.layouts:
            for value in values:
                point = {**base, sweep: value}
                g = torch.Generator().manual_seed(opts.seed)
                x = torch.randn(opts.batch, opts.seq, point["width"], generator=g).to(device)
                make = lambda p=point: Stack(p["layers"], p["width"], device=base_device, dtype=dtype)  # noqa: E731
                r = measure(make, point["rank"], layout, opts, device, x, methods=methods, bf16=opts.bf16)
                row = {"sweep": sweep, "layout": layout, **point, **r}
                rows.append(row)
                steps = (f"  step={r['step_ms']:8.2f} ms  adalora={r['adalora_ms']:8.2f} ms  share={r['share']:.3f}  "
                         f"overhead={r['overhead']:.2f}" if "step_ms" in r else "")
                print(f"{sweep:>6} {layout:>7} layers={point['layers']:>3} width={point['width']:>5} "
                      f"rank={point['rank']:>2}  tokens={r['tokens']:>9,}  gen={r['gen_ms']:8.2f} ms" + steps,
                      flush=True)
    return rows


def fits(rows: list[dict]) -> dict:
    out = {}
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        for layout in dict.fromkeys(r["layout"] for r in rows):
            sel = [r for r in rows if r["sweep"] == sweep and r["layout"] == layout]
            if len(sel) > 1:
                xs = [r[sweep] for r in sel]
                out[f"{sweep}/{layout}"] = {k: slope(xs, [r[col] for r in sel]) if col in sel[0] else float("nan")
                                           for k, col in (("gen", "gen_ms"), ("step", "step_ms"),
                                                          ("adalora", "adalora_ms"), ("share", "share"),
                                                          ("tokens", "tokens"))}
    # cost per token over every configuration: a power law gen_ms = a * tokens^b, and the cost model
    # gen_ms = fixed + per_token * tokens (a fixed cost of the bounded number of launches, and the work per token)
    tokens = np.asarray([r["tokens"] for r in rows], float)
    gen = np.asarray([r["gen_ms"] for r in rows], float)
    b, log_a = np.polyfit(np.log(tokens), np.log(gen), 1) if len(rows) > 1 else (float("nan"), float("nan"))
    out["gen_vs_tokens"] = {"exponent": float(b), "ms_at_1M_tokens": float(math.exp(log_a) * 1e6 ** b)}
    if len(rows) > 1:
        (per_token, fixed), *_ = np.linalg.lstsq(np.stack([tokens, np.ones_like(tokens)], 1), gen, rcond=None)
        out["gen_vs_tokens"].update(fixed_ms=float(fixed), ms_per_1M_tokens=float(per_token * 1e6))
    return out


def predict_gen_ms(fit: dict, tokens: int) -> float:
    """The affine cost model where fitted (fixed + per-token), else the power law."""
    g = fit["gen_vs_tokens"]
    if "ms_per_1M_tokens" in g:
        return g["fixed_ms"] + g["ms_per_1M_tokens"] * tokens / 1e6
    return g["ms_at_1M_tokens"] * (tokens / 1e6) ** g["exponent"]


def llama_tokens(shape: dict, rank: int, layout: str) -> int:
    h, kv, inter, n = shape["hidden"], shape["kv"], shape["inter"], shape["blocks"]
    per_block = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out)
    rows = n * sum(i + o for i, o in per_block)
    layers = n * len(per_block)
    return rows * (rank if layout == "element" else 1) + layers * rank


def model_scale(opts, device, fit: dict) -> list[dict]:
    shape = LLAMA_SHAPES[opts.model_shapes]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for layout in opts.layouts:
        g = torch.Generator().manual_seed(opts.seed)
        x = torch.randn(opts.model_batch, opts.model_seq, shape["hidden"], generator=g).to(device, dtype)
        methods = ("gen", "step", "adalora") if opts.model_steps and not opts.gen_only else ("gen",)
        base_device = device if "step" in methods else "meta"
        make = lambda: LlamaShaped(**shape, device=base_device, dtype=dtype)  # noqa: E731
        r = measure(make, opts.rank, layout, opts, device, x, methods=methods, bf16=dtype == torch.bfloat16)
        predicted = predict_gen_ms(fit, r["tokens"])
        row = {"model": opts.model_shapes, "layout": layout, "rank": opts.rank, **shape,
               "batch": opts.model_batch, "seq": opts.model_seq, "dtype": str(dtype).replace("torch.", ""),
               "tokens_formula": llama_tokens(shape, opts.rank, layout), "predicted_gen_ms": predicted, **r}
        out.append(row)
        print(f"{opts.model_shapes} {layout}: {r['n_layers']} layers, {r['tokens']:,} tokens, gen {r['gen_ms']:.1f} ms "
              f"(predicted {predicted:.1f} ms)" + (f", step {r['step_ms']:.1f} ms, adalora {r['adalora_ms']:.1f} ms, "
                                                   f"share {r['share']:.3f}" if "step_ms" in r else ""), flush=True)
    return out


# ---------------------------------------------------------------------------------------------- reporting
def markdown(env: dict, rows: list[dict], fit: dict, big: list[dict]) -> str:
    lines = ["# Hypernetwork cost vs. number of layers, width, rank and token layout", "",
             *[f"- {k}: {v}" for k, v in env.items()], "",
             "| sweep | layout | layers | width | rank | tokens/step | gen (ms) | HyperAdaLoRA step (ms) | "
             "AdaLoRA step (ms) | share gen/step | step/AdaLoRA |" + (" gen peak (MiB) |" if "gen_peak_mib" in rows[0]
                                                                     else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if "gen_peak_mib" in rows[0] else "")]
    for r in rows:
        fmt = lambda k, f=".2f": format(r[k], f) if k in r else "-"  # noqa: E731
        lines.append(f"| {r['sweep']} | {r['layout']} | {r['layers']} | {r['width']} | {r['rank']} | {r['tokens']:,} | "
                     f"{r['gen_ms']:.2f} | {fmt('step_ms')} | {fmt('adalora_ms')} | {fmt('share', '.3f')} | "
                     f"{fmt('overhead')} |" + (f" {r['gen_peak_mib']:.1f} |" if "gen_peak_mib" in r else ""))
    lines += ["", "Fitted log-log exponents (slope of log(time) against log(the swept variable)):", "",
              "| sweep / layout | gen | HyperAdaLoRA step | AdaLoRA step | share | tokens |", "|---|---:|---:|---:|---:|---:|"]
    for key, f in fit.items():
        if key != "gen_vs_tokens":
            lines.append(f"| {key} | {f['gen']:.2f} | {f['step']:.2f} | {f['adalora']:.2f} | {f['share']:.2f} | "
                         f"{f['tokens']:.2f} |")
    g = fit["gen_vs_tokens"]
    lines += ["", f"Generation time against tokens over all configurations: power law gen_ms = "
                  f"{g['ms_at_1M_tokens']:.2f} * (tokens / 1e6)^{g['exponent']:.2f}"
              + (f"; cost model gen_ms = {g['fixed_ms']:.2f} + {g['ms_per_1M_tokens']:.1f} * tokens / 1e6 "
                 f"(fixed + per token)." if "fixed_ms" in g else ".")]
    if big:
        lines += ["", "Model-scale check (adapted-layer shapes of the named model; every projection adapted; the "
                      "prediction is the cost model fitted on the sweeps above):", "",
                  "| model | layout | rank | layers | tokens/step | gen (ms) | predicted by the fit (ms) | step (ms) | "
                  "AdaLoRA step (ms) | share | gen peak (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in big:
            fmt = lambda k, f=".1f": format(r[k], f) if k in r else "-"  # noqa: E731
            lines.append(f"| {r['model']} | {r['layout']} | {r['rank']} | {r['n_layers']} | {r['tokens']:,} | "
                         f"{r['gen_ms']:.1f} | {r['predicted_gen_ms']:.1f} | {fmt('step_ms')} | {fmt('adalora_ms')} | "
                         f"{fmt('share', '.3f')} | {fmt('gen_peak_mib')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], fit: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    fig, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 7), dpi=110, squeeze=False)
    for j, sweep in enumerate(sweeps):
        for k, layout in enumerate(dict.fromkeys(r["layout"] for r in rows)):
            sel = [r for r in rows if r["sweep"] == sweep and r["layout"] == layout]
            if not sel:
                continue
            xs = [r[sweep] for r in sel]
            f = fit.get(f"{sweep}/{layout}", {})
            style = "-" if layout == "row" else "--"
            axes[0, j].plot(xs, [r["gen_ms"] for r in sel], style, marker="o", color="C0",
                            label=f"gen, {layout} (slope {f.get('gen', float('nan')):.2f})")
            if "step_ms" in sel[0]:
                axes[0, j].plot(xs, [r["step_ms"] for r in sel], style, marker="s", color="C1",
                                label=f"HyperAdaLoRA step, {layout} ({f.get('step', float('nan')):.2f})")
                if k == 0:
                    axes[0, j].plot(xs, [r["adalora_ms"] for r in sel], ":", marker="^", color="C2",
                                    label=f"AdaLoRA step ({f.get('adalora', float('nan')):.2f})")
                axes[1, j].plot(xs, [r["share"] for r in sel], style, marker="o", color="C3",
                                label=f"share gen/step, {layout} ({f.get('share', float('nan')):.2f})")
            else:  # generation only: time per token instead of the share
                axes[1, j].plot(xs, [r["gen_ms"] * 1e3 / r["tokens"] for r in sel], style, marker="o", color="C3",
                                label=f"gen per token (us), {layout}")
        for i in (0, 1):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_yscale("log")
            axes[i, j].grid(alpha=0.3, which="both")
            axes[i, j].legend(fontsize=7)
            axes[i, j].set_xlabel(sweep)
        axes[0, j].set_ylabel("ms per step")
        axes[1, j].set_ylabel("hypernetwork share of the step" if "step_ms" in rows[0] else "gen us per token")
    fig.suptitle("HyperAdaLoRA: hypernetwork cost vs. layers, width, rank (log-log)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: checks that everything runs")
    p.add_argument("--layers", type=int, default=None, help="base point (default 24; quick 4)")
    p.add_argument("--width", type=int, default=None, help="base point (default 1024; quick 64)")
    p.add_argument("--rank", type=int, default=None, help="base point init_r (default 8; quick 2)")
    p.add_argument("--layers-values", default=None, help="override the layers sweep, e.g. 6,12,24")
    p.add_argument("--width-values", default=None)
    p.add_argument("--rank-values", default=None)
    p.add_argument("--layouts", default="row,element")
    p.add_argument("--sweeps", default="layers,width,rank",
                   help="which one-factor sweeps to run, e.g. width (with --width-values 4096: one more point)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; quick 1)")
    p.add_argument("--model-shapes", default=None, choices=sorted(LLAMA_SHAPES),
                   help="also measure at a model's adapted-layer shapes (llama-8b: CUDA, ~16 GiB of bf16 weights)")
    p.add_argument("--model-batch", type=int, default=4)
    p.add_argument("--model-seq", type=int, default=512)
    p.add_argument("--no-model-steps", dest="model_steps", action="store_false",
                   help="model scale: time the generation only (no base weights needed beyond their shapes)")
    p.add_argument("--fit-from", default=None, metavar="EARLIER.json",
                   help="skip the sweeps; take the rows and the cost-model fit from an earlier --json output")
    p.add_argument("--gen-only", action="store_true",
                   help="time the generation alone (base weights are shape-only: any width fits in memory)")
    p.add_argument("--bf16", action="store_true", help="sweeps with a bf16 stack under bf16 autocast")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None, metavar="OUT.png")
    a = p.parse_args(argv)
    defaults = dict(layers=(4, 24), width=(64, 1024), rank=(2, 8), batch=(2, 8), seq=(16, 128), repeats=(2, 10),
                    warmup=(1, 2))
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    for name in ("layers", "width", "rank"):
        v = getattr(a, f"{name}_values")
        setattr(a, f"{name}_values", [int(s) for s in v.split(",")] if v else None)
    a.layouts = [s.strip() for s in a.layouts.split(",") if s.strip()]
    a.sweeps = [s.strip() for s in a.sweeps.split(",") if s.strip()]
    unknown = set(a.sweeps) - set(SWEEPS)
    if unknown or not a.sweeps:
        p.error(f"--sweeps takes a comma-separated subset of {','.join(SWEEPS)}, got {sorted(unknown) or 'nothing'}")
    return a


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "batch x seq": f"{opts.batch} x {opts.seq}",
           "base point": f"layers={opts.layers}, width={opts.width}, rank={opts.rank}",
           "dtype": "bf16 autocast" if opts.bf16 else "float32", "repeats": opts.repeats, "warmup": opts.warmup,
           "hypernetworks": hypernetwork_description(),
           "measured": "generation only" if opts.gen_only else "generation, HyperAdaLoRA step, AdaLoRA step"}
    if opts.fit_from:  # no sweeps: the fit (and rows) of an earlier run, for the model-scale check only
        with open(opts.fit_from) as f:
            earlier = json.load(f)
        rows, fit = earlier["rows"], earlier["fits"]
        env["fit"] = f"from {opts.fit_from} ({earlier['env'].get('device')}, {earlier['env'].get('threads')} threads)"
    else:
        rows = run_sweeps(opts, device)
        fit = fits(rows)
    big = model_scale(opts, device, fit) if opts.model_shapes else []
    text = markdown(env, rows, fit, big)
    print("\n" + text)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"env": env, "rows": rows, "fits": fit, "model_scale": big}, f, indent=2)
    if opts.markdown:
        with open(opts.markdown, "w") as f:
            f.write(text)
    if opts.plot:
        plot(rows, fit, opts.plot)
    return {"rows": rows, "fits": fit, "model_scale": big}


if __name__ == "__main__":
    main()
