"""Record, or check bit for bit, the per-step losses of a short CLI run of every method.

The guard rail of refactors (issue 24) and merges: a change that moves code must not move a single bit of any
method's losses. ``--record FILE`` runs every method with ``hyperadalora train`` (fixed seed, the embedded sentiment
task, MiniLM, one thread) and writes each run's per-step ``loss`` and ``task_loss``; ``--check FILE`` runs the same
commands again and prints, per run, whether every loss is the same float, or the first step that differs.

    python benchmarks/record_losses.py --record benchmarks/recorded_losses.json
    python benchmarks/record_losses.py --check benchmarks/recorded_losses.json      # exit 1 on any difference
    python benchmarks/record_losses.py --record benchmarks/recorded_losses.json --runs hyperlora-bf16  # a stated change

The bits depend on the machine's CPU kernels and the torch build: a check on another machine or torch is reported
as such (``--check`` still runs, but a difference there says nothing about the code).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile

METHODS = ("hyperadalora", "adalora", "lora", "dora", "hyperlora", "hyperdora", "hydralora", "hyperhydralora")
COMMON = ["--task", "sentiment", "--max-steps", "12", "--batch-size", "8", "--max-length", "32",
          "--max-train-examples", "200", "--max-eval-examples", "16", "--seed", "3", "--keep-checkpoints", "0",
          "--no-progress"]
# bf16 autocast: the hypernetworks must generate in fp32 (issue 24 names a drift here for the generated methods)
RUNS = {**{m: ["--method", m] for m in METHODS},
        "hyperadalora-bf16": ["--method", "hyperadalora", "--precision", "bf16"],
        "hyperlora-bf16": ["--method", "hyperlora", "--precision", "bf16"]}


def machine() -> dict:
    import torch

    cpu, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags")), "")
    except OSError:
        pass
    # "AMD EPYC" names several CPUs whose kernels round differently (1 ulp at step 1, seen on 2026-12-07): the
    # instruction-set flags tell them apart
    return {"cpu": cpu or platform.processor() or platform.machine(),
            "cpu_flags_sha1": hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:12],
            "torch": torch.__version__, "python": platform.python_version(), "threads": 1}


def run_one(label: str, workdir: str) -> dict:
    out = os.path.join(workdir, label)
    argv = [sys.executable, "-m", "hyperadalora", "train", *RUNS[label], *COMMON, "--output-dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: `{' '.join(argv[1:])}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if r.get("type") != "eval"]
    return {"argv": ["hyperadalora", *argv[3:-2]], "loss": [r["loss"] for r in rows],
            "task_loss": [r["task_loss"] for r in rows]}


def first_difference(a: list, b: list):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i + 1, abs(x - y)
    return (min(len(a), len(b)) + 1, None) if len(a) != len(b) else (None, None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", metavar="FILE")
    g.add_argument("--check", metavar="FILE")
    p.add_argument("--runs", help="comma-separated labels (default: all): " + ", ".join(RUNS))
    a = p.parse_args(argv)
    labels = a.runs.split(",") if a.runs else list(RUNS)
    unknown = [label for label in labels if label not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    if a.check and not os.path.isfile(a.check):
        p.error(f"--check {a.check}: no such file (make it with --record)")
    here = machine()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for label in labels:
            print(f"{label} ...", flush=True)
            runs[label] = run_one(label, tmp)
    if a.record:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = {"machine": here, "commit": commit, "common": COMMON, "runs": runs}
        if a.runs and os.path.isfile(a.record):  # re-record some runs (a stated change), keep the others
            old = json.load(open(a.record))
            if old["machine"] != here:
                p.error(f"{a.record} was recorded on {old['machine']}: re-record every run here, not some")
            record = {**old, "runs": {**old["runs"], **runs},
                      "rerecorded": {**old.get("rerecorded", {}), **{label: commit for label in runs}}}
        with open(a.record, "w") as f:
            json.dump(record, f, indent=1)
        print(f"recorded {len(runs)} runs to {a.record}")
        return 0
    saved = json.load(open(a.check))
    same_machine = saved["machine"] == here
    if not same_machine:
        print(f"note: recorded on {saved['machine']}, checked on {here}: differences may come from the machine")
    print(f"| run | steps | losses equal bit for bit | first differing step | its difference |")
    print("|---|---|---|---|---|")
    bad = 0
    for label, run in runs.items():
        ref = saved["runs"].get(label)
        if ref is None:
            print(f"| {label} | {len(run['loss'])} | not recorded | | |")
            continue
        step, diff = first_difference(ref["loss"], run["loss"])
        if step is None:
            step, diff = first_difference(ref["task_loss"], run["task_loss"])
        equal = step is None
        bad += not equal
        print(f"| {label} | {len(run['loss'])} | {'yes' if equal else '**no**'} | {step or ''} | "
              f"{'' if diff is None else f'{diff:.3g}'} |")
    print(f"{len(runs) - bad} of {len(runs)} runs equal bit for bit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
