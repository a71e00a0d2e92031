"""The training loop as a class (`training.TrainingLoop`, `LoopState`), its adapter-builder hook, and checkpoints
written by the loop before it was one (tests/data/old_runs: commit 358d364's train.py) resuming as they did."""

import json
import os
import shutil

import pytest
from transformers import AutoTokenizer

from conftest import make_bert
from hyperadalora.base_models import minilm_path
from hyperadalora.training import LoopState, TrainArgs, build_adapter_model, read_metrics, train
from test_train import toy_examples

OLD_RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "old_runs")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def short_run(tmp_path, tokenizer, name, steps=3, **kw):
    args = TrainArgs(method="hyperadalora", task="sst2", max_steps=steps, batch_size=8, max_length=16, seed=0,
                     output_dir=str(tmp_path / name), progress=False, tinit=0, tfinal=1, save_adapter=False,
                     keep_checkpoints=0)
    return train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                 train_examples=toy_examples(32), eval_examples=toy_examples(8, seed=1), **kw)


def test_a_custom_adapter_builder_replaces_the_default(tmp_path, tokenizer):
    """``train(args, build_adapter=...)``: what experiments used to monkeypatch `build_adapter_model` for."""
    built, steps = [], []

    def keep(args, model, task_type):
        wrapped, allocate = build_adapter_model(args, model, task_type)
        built.append(wrapped)
        return wrapped, allocate

    summary = short_run(tmp_path, tokenizer, "hooked", build_adapter=keep,
                        on_step=lambda step, row: steps.append((step, built[-1].total_rank)))
    assert len(built) == 1 and summary["model"] is built[0]
    assert [s for s, _ in steps] == [1, 2, 3]
    plain = short_run(tmp_path, tokenizer, "plain")
    assert read_metrics(summary["metrics"])[0][-1]["loss"] == read_metrics(plain["metrics"])[0][-1]["loss"]


def test_loop_state_is_what_checkpoints_record():
    state = LoopState(step=3, epoch=1, batches=2, train_time=0.5, nonfinite=1, consecutive=0, last={"step": 3})
    record = state.record(elapsed=7.0)
    with open(os.path.join(OLD_RUNS, "hyperadalora", "checkpoints", "step-0000003", "state.json")) as f:
        old = json.load(f)["loop"]
    assert list(record) == list(old)  # the same keys, in the same order, as the old loop wrote
    assert LoopState.from_record(record) == LoopState(**{**record})
    assert LoopState.from_record({**old, "unknown": 1}).step == 3  # keys of another version are left out


@pytest.mark.parametrize("method", ["hyperadalora", "adalora", "hyperlora"])
def test_a_checkpoint_of_the_old_loop_resumes_with_the_same_losses(tmp_path, tokenizer, method):
    """A run stopped at step 3 by the loop before the training package (its checkpoint and metrics.jsonl, written
    by tests/data/old_runs/make_old_runs.py) continues to step 6 with the losses of the old uninterrupted run."""
    run = tmp_path / method
    shutil.copytree(os.path.join(OLD_RUNS, method), run)
    old_rows, _ = read_metrics(str(run / "metrics.jsonl"))
    args = TrainArgs.resumed(str(run / "checkpoints" / "step-0000003"), progress=False)
    assert args.method == method and args.max_steps == 6 and args.output_dir == str(run)
    summary = train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                    train_examples=toy_examples(40), eval_examples=toy_examples(8, seed=1))
    rows, evals = read_metrics(summary["metrics"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and evals[-1]["final"]
    assert rows[:3] == old_rows[:3]  # kept as written
    for old, new in zip(old_rows[3:], rows[3:]):
        assert new["total_rank"] == old["total_rank"] and new["lr"] == old["lr"]
        for key in ("loss", "task_loss"):  # bit for bit on the machine that wrote them (CPU kernels may differ)
            assert new[key] == pytest.approx(old[key], rel=1e-5, abs=1e-7), (new["step"], key)
