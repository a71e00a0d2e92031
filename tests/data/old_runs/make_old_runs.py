"""Writes tests/data/old_runs/: short runs of the training loop as it was before the training/ package (commit
358d364, src/hyperadalora/train.py), each with its checkpoint at step 3 of 6 and the metrics of the whole run.

    PYTHONPATH=<checkout of 358d364>/src python tests/data/old_runs/make_old_runs.py tests/data/old_runs
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tests/

from conftest import make_bert, toy_examples  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from hyperadalora.models import minilm_path  # noqa: E402

try:
    from hyperadalora.train import TrainArgs, train
except ImportError:  # written by the new package: the fixtures must come from the old loop
    raise SystemExit("run this with the code of commit 358d364 (hyperadalora.train) on PYTHONPATH")

METHODS = {"hyperadalora": {"tinit": 1, "tfinal": 1, "deltaT": 1}, "adalora": {"tinit": 1, "tfinal": 1, "deltaT": 1},
           "hyperlora": {}}


def main(out):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    for method, extra in METHODS.items():
        run = os.path.join(out, "work", method)
        args = TrainArgs(method=method, task="sst2", max_steps=6, batch_size=8, lr=5e-3, max_length=16, seed=0,
                         output_dir=run, progress=False, save_every=3, keep_checkpoints=3, save_adapter=False,
                         max_eval_examples=8, **extra)
        train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
              train_examples=toy_examples(40), eval_examples=toy_examples(8, seed=1))
        target = os.path.join(out, method)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(run, "checkpoints", "step-0000003"),
                        os.path.join(target, "checkpoints", "step-0000003"))
        shutil.copy(os.path.join(run, "metrics.jsonl"), os.path.join(target, "metrics.jsonl"))
    shutil.rmtree(os.path.join(out, "work"))


if __name__ == "__main__":
    main(sys.argv[1])
