"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate: does a method train under it? (issue 33)

    torchrun --nproc_per_node 2 benchmarks/deepspeed_check.py --zero-stage 2 --method lora
    accelerate launch --config_file benchmarks/accelerate_deepspeed.yaml benchmarks/deepspeed_check.py --method lora

A tiny random Llama (2 layers, width 64) wrapped with ``--method`` (`training.build_adapter_model`), prepared by
`accelerate.Accelerator` with a `DeepSpeedPlugin` (ZeRO stage ``--zero-stage``, torch's AdamW, fp32), trained for
``--steps`` steps on random tokens; prints each step's loss and, on process 0, one JSON line with the losses, the
stage and the outcome (``ok`` or the error), also to ``--json``. The rank allocation (`allocate(step)`) runs after
each step as in the library's loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--zero-stage", type=int, default=int(os.environ.get("ZERO_STAGE", "2")))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyperadalora import training as T

    plugin = DeepSpeedPlugin(zero_stage=a.zero_stage, gradient_accumulation_steps=1, gradient_clipping=0.0)
    plugin.deepspeed_config.setdefault("zero_allow_untested_optimizer", True)
    acc = Accelerator(deepspeed_plugin=plugin, cpu=not torch.cuda.is_available())
    result = {"method": a.method, "zero_stage": a.zero_stage, "processes": acc.num_processes, "losses": []}
    try:
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1)).eval()
        args = T.TrainArgs(method=a.method, max_steps=max(10, a.steps + 5), tinit=1, tfinal=2, deltaT=1,
                           init_r=3, target_r=2, progress=False)
        model, allocate = T.build_adapter_model(args, base, "CAUSAL_LM")
        opt = torch.optim.AdamW(T.param_groups(model, args), lr=1e-3)
        model, opt = acc.prepare(model, opt)
        g = torch.Generator().manual_seed(1)
        for step in range(1, a.steps + 1):
            ids = torch.randint(0, 128, (2, 16), generator=g).to(acc.device)
            out = model(input_ids=ids, labels=ids)
            acc.backward(out.loss)
            opt.step()
            if allocate is not None:
                allocate(step)
            opt.zero_grad()
            result["losses"].append(float(out.loss.detach()))
            acc.print(f"step {step}: loss {result['losses'][-1]:.5f}")
        result["outcome"] = "ok"
    except Exception as e:  # noqa: BLE001 (what fails is the result)
        result["outcome"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    if acc.is_main_process:
        print(json.dumps(result))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0 if result["outcome"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
