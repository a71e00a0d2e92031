"""One process of the FSDP tests (tests/test_fsdp.py), or their single-process reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT --batch-size 2 --fsdp
    python tests/fsdp_worker.py OUT --batch-size 4

Trains every method given (--methods) on a tiny Llama (tests/conftest.py `make_llama`: the decoder layers are the
FSDP units, as accelerate's TRANSFORMER_BASED_WRAP picks them) on a tiny instruction task with
`hyperadalora.training.train`, one run per method in ``OUT/<method>``; with the dev-set generation (BLEU / ROUGE)
at the end, so that ``generate`` runs under FSDP too. Writes per process and method ``OUT/<method>/process-<rank>.pt``:
after every optimizer step, the rank pattern (HyperAdaLoRA: its masks and sensitivity EMAs; peft's AdaLoRA: its
rank_pattern), and this process's share of the base model (`distributed.wrap_fsdp`'s return value).
``--sigterm-at K``: process 0 sends itself SIGTERM after step K (the run stops, checkpointed, on every process);
``--resume``: continue the runs in OUT (``TrainArgs.resumed``).
"""

import argparse
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


def records():
    return [{"instruction": f"Say {w} {k} times.", "input": "", "output": " ".join([w] * k)}
            for w in WORDS for k in range(1, 7)]


def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    # a causal LM's tokenizer: no token_type_ids
    return AutoTokenizer.from_pretrained(minilm_path(), model_input_names=["input_ids", "attention_mask"])


def base_model(tok):
    from conftest import make_llama

    return make_llama(vocab=tok.vocab_size, hidden=32)


def train_args(method: str, out: str, batch_size: int, steps: int, fsdp: bool, **extra):
    from hyperadalora.training import TrainArgs

    data = os.path.join(out, "data.json")
    return TrainArgs(method=method, task="alpaca", data_path=data, max_steps=steps, batch_size=batch_size, lr=5e-3,
                     max_length=24, seed=0, output_dir=os.path.join(out, method), progress=False, tinit=1, tfinal=2,
                     deltaT=1, device="cpu", keep_checkpoints=2, gen_eval_examples=2, max_new_tokens=4,
                     max_eval_examples=4, fsdp=fsdp, overwrite=True,
                     hyper={"importance": "sensitivity"} if method == "hyperadalora" else {}, **extra)


def run(out: str, methods: list, batch_size: int, steps: int = 6, fsdp: bool = False, sigterm_at: int = 0,
        resume: bool = False) -> dict:
    """Train each method; returns {method: records} (also saved to ``out/<method>/process-<rank>.pt``)."""
    from hyperadalora.methods import HyperAdaLoraModel
    from hyperadalora.training import TrainArgs, TrainingInterrupted, loop, train

    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # one process group for all the runs (train() joins it and leaves it in place)
        torch.distributed.init_process_group("gloo")
    os.makedirs(out, exist_ok=True)
    if rank == 0 and not os.path.exists(os.path.join(out, "data.json")):
        with open(os.path.join(out, "data.json") + ".tmp", "w") as f:
            json.dump(records(), f)
        os.replace(os.path.join(out, "data.json") + ".tmp", os.path.join(out, "data.json"))
    while not os.path.exists(os.path.join(out, "data.json")):  # the other process waits for process 0's file
        import time
        time.sleep(0.05)
    tok = tokenizer()
    examples = records()
    train_ex, dev_ex = examples[:28], examples[28:]
    shares, results = [], {}
    original_wrap = loop.wrap_fsdp

    def wrap(*a, **k):
        info = original_wrap(*a, **k)
        shares.append(info)
        return info

    loop.wrap_fsdp = wrap
    try:
        for method in methods:
            recs, alloc = [], {}

            def on_step(step, row, recs=recs, alloc=alloc):
                recs.append({"step": step, "loss": row["loss"], "total_rank": row["total_rank"],
                             **alloc.pop(step, {})})
                if sigterm_at and step == sigterm_at and rank == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

            def build(args, model, task_type, alloc=alloc):
                from hyperadalora.training import build_adapter_model

                wrapped, allocate = build_adapter_model(args, model, task_type)

                def allocate_and_record(step):
                    allocate(step)
                    if isinstance(wrapped, HyperAdaLoraModel):
                        a = wrapped.allocator
                        alloc[step] = {"mask": a.mask.clone(), "ipt": None if a.ipt is None else a.ipt.clone()}
                    else:
                        cfg = wrapped.peft_config["default"] if isinstance(wrapped.peft_config, dict) else None
                        alloc[step] = {"rank_pattern": json.dumps(getattr(cfg, "rank_pattern", None), default=str,
                                                                  sort_keys=True)}
                return wrapped, (allocate_and_record if allocate is not None else None)

            path = os.path.join(out, method)
            args = (TrainArgs.resumed(path, device="cpu", progress=False) if resume
                    else train_args(method, out, batch_size, steps, fsdp))
            shares.clear()
            status = "done"
            try:
                train(args, model=base_model(tok), tokenizer=tok, train_examples=train_ex, eval_examples=dev_ex,
                      on_step=on_step, build_adapter=build)
            except TrainingInterrupted:
                status = "interrupted"
            results[method] = {"steps": recs, "share": shares[0] if shares else None, "status": status}
            torch.save(results[method], os.path.join(path, f"process-{rank}{'-resumed' if resume else ''}.pt"))
    finally:
        loop.wrap_fsdp = original_wrap
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--methods", default="hyperadalora")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--sigterm-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    if os.environ.get("FSDP_WORKER_HANG_DUMP"):  # debugging a hung collective: every thread's stack after N s
        import faulthandler
        faulthandler.dump_traceback_later(int(os.environ["FSDP_WORKER_HANG_DUMP"]), exit=True)
    torch.set_num_threads(1)
    run(a.out, a.methods.split(","), a.batch_size, a.steps, a.fsdp, a.sigterm_at, a.resume)


if __name__ == "__main__":
    main()
