"""``efficiency`` (the paper's Table 4): peak memory and median latency of a training step vs batch size.

HyperAdaLoRA, peft's AdaLoRA and peft's LoRA measured side by side in one run by the functions of
``benchmarks/step_time.py`` (imported from the repository; see its docstring for what a step and the memory
measure are): for each batch size (1..32 on a CPU, 1..64 on a GPU), fresh copies of the same base model,
synthetic batches of ``--max-length`` tokens, interleaved timed steps (ABC, CBA, ...), median and IQR.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from transformers import AutoConfig

from ..base_models import resolve_model_path
from ..plotting import pyplot
from .options import as_options, command_line, pick
from .plots import save_line_plot
from .report import fmt, markdown_table, report_header, write_outputs
from .runs import REPO_ROOT
from .task_setup import environment, output_dir

NAME = "efficiency"
METHODS = ("hyperadalora", "adalora", "lora")
DEFAULTS = dict(batch_sizes_cpu=[1, 2, 4, 8, 16, 32], batch_sizes_gpu=[1, 2, 4, 8, 16, 32, 64], seq_len=128, steps=10,
                warmup=2, mem_steps=2)
STEP_TIME = REPO_ROOT / "benchmarks" / "step_time.py"

FULL_SIZE = """\
## Full-size run (the paper's setting)

The paper measures LLaMA3.1-8B / Qwen2.5-7B at batch sizes 1..64 on GPUs (memory about 1 % lower and latency
2-10 % lower than AdaLoRA). On a GPU, with a local copy of the model:

```
hyperadalora experiment efficiency --model /path/to/Llama-3.1-8B --device cuda --batch-sizes 1,2,4,8,16,32,64 \\
    --max-length 512 --steps 20 --output-dir runs/experiments/efficiency-full
```

(For bfloat16 autocast and other options, run `benchmarks/step_time.py` directly: `--dtype bfloat16`,
`--hyper KEY=VALUE`, `--allocate-during`.)
"""


def load_step_time():
    """The ``benchmarks/step_time.py`` module of the repository (imported by path, not copied)."""
    if not STEP_TIME.is_file():
        raise FileNotFoundError(f"{STEP_TIME} not found: the efficiency experiment runs from a source checkout "
                                f"of the repository (it reuses benchmarks/step_time.py).")
    name = "hyperadalora_benchmarks_step_time"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, STEP_TIME)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def model_kind(model) -> str:
    """classification, or instruction for a causal LM (the smollm2 alias, or a config whose architecture is one)."""
    if model == "smollm2" or (isinstance(model, str) and model.endswith(".gguf")):
        return "instruction"
    if model is None:
        return "classification"
    archs = getattr(AutoConfig.from_pretrained(resolve_model_path(model)), "architectures", None) or []
    return "instruction" if any("CausalLM" in a for a in archs) else "classification"


def _plot(results: dict, path: str, key: str, err: str, ylabel: str, title: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    sizes = sorted(int(b) for b in results)
    for i, m in enumerate(next(iter(results.values()))):
        y = [results[str(b)][m][key] for b in sizes]
        yerr = [results[str(b)][m][err] / 2 for b in sizes] if err else None
        ax.errorbar(sizes, y, yerr=yerr, marker="o", capsize=3, color=f"C{i}", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    return save_line_plot(fig, ax, path, "batch size", ylabel, title)


def run_efficiency(opts=None) -> dict:
    opts = as_options(opts)
    out = output_dir(opts, NAME)
    st = load_step_time()
    cuda = opts.device == "cuda" or (opts.device is None and torch.cuda.is_available())
    sizes = opts.batch_sizes or (opts.batch_size and [opts.batch_size]) or \
        DEFAULTS["batch_sizes_gpu" if cuda else "batch_sizes_cpu"]
    seq_len = pick(opts.max_length, DEFAULTS["seq_len"])
    steps = pick(opts.steps, DEFAULTS["steps"])
    kind = model_kind(opts.model)
    argv = ["--batch-sizes", ",".join(map(str, sizes)), "--seq-len", str(seq_len), "--steps", str(steps),
            "--warmup", str(DEFAULTS["warmup"]), "--mem-steps", str(DEFAULTS["mem_steps"]),
            "--methods", ",".join(METHODS), "--device", "cuda" if cuda else "cpu", "--kind", kind,
            "--seed", str(0)]
    if opts.model:
        argv += ["--model", opts.model]
    sopts = st.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    command, env = command_line(NAME, opts), environment()
    results, info = {}, {}
    for bs in sizes:
        print(f"[efficiency] batch size {bs}: {', '.join(METHODS)} ...", flush=True)
        res, info = st.run_batch_size(sopts, bs, device)
        results[str(bs)] = res
        print(st.table(res), flush=True)
    lat = _plot(results, os.path.join(out, "latency.png"), "median_ms", "iqr_ms", "median step time (ms)",
                f"training step latency, {seq_len} tokens (error bar: IQR)")
    mem = _plot(results, os.path.join(out, "memory.png"), "peak_mib", None, "peak memory (MiB)",
                f"peak training-step memory, {seq_len} tokens")
    rows = []
    for bs in sizes:
        r = results[str(bs)]
        rows.append([bs, *(fmt(r[m]["median_ms"], "{:.1f}") for m in METHODS),
                     fmt(r["hyperadalora"]["time_vs_adalora"], "{:.3f}"),
                     *(fmt(r[m]["peak_mib"], "{:.1f}") for m in METHODS),
                     fmt(r["hyperadalora"]["mem_vs_adalora"], "{:.4f}")])
    per_bs = []
    for bs in sizes:
        per_bs += [f"### batch size {bs}", "", st.table(results[str(bs)]), ""]
    res = {"experiment": NAME, "command": command, "env": env, "step_time_argv": argv, "model": info.get("model"),
           "kind": kind, "seq_len": seq_len, "batch_sizes": sizes, "results": results,
           "plots": [os.path.basename(lat), os.path.basename(mem)]}
    settings = {"model": info.get("model"), "kind": kind, "sequence length": seq_len, "batch sizes": sizes,
                "measured steps per method and batch size": steps, "warm-up steps": DEFAULTS["warmup"],
                "memory steps": DEFAULTS["mem_steps"], "init_r / target_r": "3 / 2",
                "memory measure": ("torch.cuda.max_memory_allocated" if cuda else
                                   "torch.profiler allocation events (live CPU tensor bytes)")
                + ": frozen base weights + the peak above them over adapter creation and "
                  f"{DEFAULTS['mem_steps']} training steps",
                "benchmark": f"{os.path.relpath(STEP_TIME, REPO_ROOT)} {' '.join(argv)}"}
    lines = report_header("Efficiency: peak memory and latency per training step (paper Table 4)", command, env,
                          settings, "Every method wraps a fresh copy of the same base model; the timed steps of the "
                          "methods are interleaved so that background load hits all alike. No rank masking happens "
                          "while measuring (the budget schedule is long).")
    lines += ["## Summary", "",
              markdown_table(["batch", *(f"{m} median (ms)" for m in METHODS), "time hyper/ada",
                              *(f"{m} peak (MiB)" for m in METHODS), "memory hyper/ada"], rows), "",
              "![latency](latency.png)", "", "![memory](memory.png)", "", "## Per batch size", ""] + per_bs
    lines += [FULL_SIZE]
    return write_outputs(out, res, lines)
