"""One process of the multi-process test (tests/test_distributed.py), or its single-process reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT --batch-size 4
    python tests/ddp_worker.py OUT --batch-size 8

Trains HyperAdaLoRA on a tiny BERT (tests/conftest.py) with `hyperadalora.training.train` and writes, per
process, what the test compares: after every `update_and_allocate`, the rank masks, the sensitivity EMAs,
the hypernetworks' parameters and their recurrent state (``OUT/process-<rank>.pt``); process 0 also writes
the run's metrics.jsonl.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(out: str, batch_size: int, grad_accum: int = 1, steps: int = 10, importance: str = "sensitivity") -> list:
    """Train, recording the allocator and the hypernetworks after every update_and_allocate; returns the records
    and saves them to ``out/process-<rank>.pt``."""
    from transformers import AutoTokenizer

    from conftest import make_bert
    from hyperadalora.methods import HyperAdaLoraModel
    from hyperadalora.base_models import minilm_path
    from hyperadalora.training import TrainArgs, train
    from test_train import toy_examples

    records = []
    original = HyperAdaLoraModel.update_and_allocate

    def recording(self, step):
        changed = original(self, step)
        records.append({
            "step": step, "mask": self.allocator.mask.clone(),
            "ipt": None if self.allocator.ipt is None else self.allocator.ipt.clone(),
            "params": torch.cat([p.detach().flatten() for p in self.generators.parameters()]),
            "state": torch.cat([b.detach().flatten().float() for b in self.generators.buffers()]),
            "divergences": self.mask_divergences})
        return changed

    HyperAdaLoraModel.update_and_allocate = recording
    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        args = TrainArgs(method="hyperadalora", task="sst2", max_steps=steps, batch_size=batch_size,
                         grad_accum=grad_accum, lr=5e-3, max_length=16, seed=0, output_dir=out, progress=False,
                         tinit=2, tfinal=3, deltaT=1, device="cpu", save_adapter=False, keep_checkpoints=0,
                         hyper={"importance": importance})
        train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
              train_examples=toy_examples(64), eval_examples=toy_examples(8, seed=1))
    finally:
        HyperAdaLoraModel.update_and_allocate = original
    torch.save(records, os.path.join(out, f"process-{os.environ.get('RANK', '0')}.pt"))
    return records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--importance", default="sensitivity")
    a = p.parse_args()
    torch.set_num_threads(1)
    run(a.out, a.batch_size, a.grad_accum, a.steps, a.importance)


if __name__ == "__main__":
    main()
