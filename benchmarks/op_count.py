"""Operators per training step of hyperadalora, peft's adalora and lora: the fixed per-step cost that dominates a
busy CPU (and a GPU's launch latency), counted, not timed, so the count does not depend on the machine's load.

    python benchmarks/op_count.py --layers 2,6      # SmolLM2-135M's architecture with that many decoder layers

One step as `step_time.train_step` takes it (forward, backward, AdamW step, allocate, zero_grad) after 2 warm-up
steps, sequence 16, batch 1, 1 thread, recorded by torch.profiler; counted: the aten operators at the top of the
call tree (those called from Python or from autograd, each one dispatch and one parallel region).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time as S  # noqa: E402


def count(method: str, layers: int, seq: int = 16) -> int:
    opts = S.parse_args(["--kind", "instruction", "--seq-len", str(seq), "--steps", "1", "--warmup", "0"])
    torch.manual_seed(0)
    runner = S.Runner(method, opts, S.smollm2_architecture(layers), torch.device("cpu"))
    ids = torch.randint(0, S.SMOLLM2_135M["vocab_size"], (1, seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(2):
        runner.step(batch)
    with torch.profiler.profile() as prof:
        runner.step(batch)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="2,6")
    p.add_argument("--methods", default="hyperadalora,adalora,lora")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for layers in [int(x) for x in a.layers.split(",")]:
        out[layers] = {m: count(m, layers) for m in a.methods.split(",")}
        print(layers, "layers:", out[layers], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
