"""Checkpoints, exact resume, SIGINT/SIGTERM, non-finite steps and bad resume input (tiny BERT, CPU)."""

import functools
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import make_bert
from hyperadalora import checkpoint as ckpt_lib
from hyperadalora import cli
from hyperadalora import training as train_mod
from hyperadalora.resume import ResumeConflict
from hyperadalora.training import NonFiniteLossError, TrainArgs, read_metrics, train
from test_train import toy_examples, write_sst2, write_tiny_model

STEPS = 12


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def run(tokenizer, out, method="lora", hidden=32, on_step=None, model=None, **kw):
    """A tiny run: 20 examples / batch 8 -> 3 batches per epoch, so the 12 steps cross 3 epoch boundaries."""
    options = dict(method=method, task="sst2", max_steps=STEPS, batch_size=8, lr=5e-3, max_length=16, seed=0,
                   output_dir=str(out), progress=False, tinit=2, tfinal=3, deltaT=2, save_adapter=False)
    options.update(kw)
    model = model if model is not None else make_bert(vocab=tokenizer.vocab_size, hidden=hidden)
    return train(TrainArgs(**options), model=model, tokenizer=tokenizer, train_examples=toy_examples(20),
                 eval_examples=toy_examples(8, seed=1), on_step=on_step)


def signal_at(step_to_signal, signum=signal.SIGINT):
    def hook(step, row):
        if step == step_to_signal:
            signal.raise_signal(signum)
    return hook


def steps_of(out):
    return [step for step, _ in ckpt_lib.list_checkpoints(str(out))]


def snapshot_files(root):
    return {os.path.join(d, f): Path(d, f).read_bytes() for d, _, fs in os.walk(root) for f in fs}


# ---------------------------------------------------------------------------------------------- exact resume
# test_every_method.py: test_an_interrupted_run_resumes_with_bitwise_equal_losses (for every method)


# ---------------------------------------------------------------------------------------------- signals / CLI
def test_sigterm_in_the_cli_exits_143_and_resume_finishes(tmp_path, tokenizer, monkeypatch, capsys):
    model_dir = write_tiny_model(tmp_path / "model", tokenizer)
    data_dir = write_sst2(tmp_path / "glue", n_train=24, n_dev=8)
    out = tmp_path / "out"
    argv = ["train", "--method", "hyperadalora", "--task", "sst2", "--model", model_dir, "--data-dir", data_dir,
            "--max-steps", "8", "--batch-size", "8", "--max-length", "16", "--tinit", "1", "--tfinal", "2",
            "--output-dir", str(out), "--no-progress", "--save-every", "3", "--keep-checkpoints", "1"]
    original, handler = train_mod.train, signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_mod, "train", functools.partial(original, on_step=signal_at(4, signal.SIGTERM)))
    assert cli.main(argv) == 143
    err = capsys.readouterr().err
    assert "SIGTERM" in err and f"--resume {out}" in err
    assert steps_of(out) == [4]
    monkeypatch.setattr(train_mod, "train", original)
    assert cli.main(argv + ["--resume", str(out)]) == 0
    rows, evals = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9)) and evals[-1]["final"]
    assert steps_of(out) == [8]
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


# ---------------------------------------------------------------------------------------------- non-finite steps
def poison(model, loss_steps=(), grad_steps=()):
    """NaN activations on the training forwards of ``loss_steps``, NaN gradients (finite loss) on ``grad_steps``."""
    calls = {"n": 0}

    def forward_hook(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] in loss_steps:
                return output * float("nan")
        return output

    model.bert.embeddings.register_forward_hook(forward_hook)
    model.classifier.weight.register_hook(lambda g: g * float("nan") if calls["n"] in grad_steps else g)
    return model


def test_nonfinite_steps_are_skipped(tmp_path, tokenizer):
    model = poison(make_bert(vocab=tokenizer.vocab_size), loss_steps={3}, grad_steps={4})
    heads = {}
    summary = run(tokenizer, tmp_path, "hyperadalora", model=model, max_steps=7,
                  on_step=lambda step, row: heads.__setitem__(step, model.classifier.weight.detach().clone()))
    rows = read_metrics(summary["metrics"])[0]
    assert summary["nonfinite_steps"] == 2
    assert [r.get("skipped", False) for r in rows] == [False, False, True, True, False, False, False]
    assert math.isnan(rows[2]["loss"]) and math.isfinite(rows[3]["loss"])  # step 4: only the gradient was NaN
    assert torch.equal(heads[2], heads[4]) and not torch.equal(heads[4], heads[5])  # no update at 3 and 4
    assert all(math.isfinite(r["loss"]) for r in rows[4:])


def test_persistent_nonfinite_loss_stops_with_a_checkpoint_of_the_last_good_step(tmp_path, tokenizer):
    model = poison(make_bert(vocab=tokenizer.vocab_size), loss_steps=set(range(4, 100)))
    with pytest.raises(NonFiniteLossError, match=r"steps 4 to 6.*stopped at step 6") as info:
        run(tokenizer, tmp_path, "lora", model=model, max_nonfinite=3, save_every=5)
    assert "step-0000003" in str(info.value)
    assert steps_of(tmp_path) == [3]
    assert json.loads((tmp_path / "checkpoints" / "step-0000003" / "state.json").read_text())["loop"]["step"] == 3
    # the last good state resumes (here without the poison) to the end
    summary = run(tokenizer, tmp_path, "lora", resume=str(tmp_path))
    rows = read_metrics(summary["metrics"])[0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and summary["nonfinite_steps"] == 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("source") / "run"
    run(tokenizer, out, "lora", max_steps=6, tinit=1, tfinal=1, save_every=3)
    assert steps_of(out) == [3, 6]
    return out


def damage_flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("name, damage, message", [
    ("model.safetensors", damage_flip, "corrupted"),
    ("optimizer.pt", damage_truncate, "truncated"),
    ("state.json", os.remove, "missing"),
    ("manifest.json", os.remove, "no manifest.json"),
    ("manifest.json", damage_flip, "manifest.json is corrupted"),  # blames itself, not the file whose digest it holds
])
def test_damaged_checkpoint_is_refused_and_nothing_is_written(tmp_path, tokenizer, finished_run, name, damage,
                                                              message):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoints" / "step-0000006"
    damage(ckpt / name)
    before = snapshot_files(out)
    with pytest.raises(ckpt_lib.CheckpointError, match=message) as info:
        run(tokenizer, out, "lora", max_steps=6, tinit=1, tfinal=1, resume=str(ckpt))
    assert name in str(info.value)
    assert snapshot_files(out) == before


def test_a_manifest_altered_in_a_file_digest_blames_itself(tmp_path, finished_run):
    ckpt = tmp_path / "step-0000006"
    shutil.copytree(finished_run / "checkpoints" / "step-0000006", ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digest = manifest["files"]["state.json"]["sha256"]
    manifest["files"]["state.json"]["sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]  # still valid JSON
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt_lib.CheckpointError, match="manifest.json is corrupted: its content does not match"):
        ckpt_lib.verify(str(ckpt))


def test_run_dir_skips_a_damaged_newest_checkpoint(tmp_path, tokenizer, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    damage_flip(out / "checkpoints" / "step-0000006" / "model.safetensors")
    with pytest.warns(UserWarning, match="Skipping damaged"):
        summary = run(tokenizer, out, "lora", max_steps=6, tinit=1, tfinal=1, resume=str(out))
    assert summary["resumed_from"].endswith("step-0000003")
    assert [r["loss"] for r in read_metrics(summary["metrics"])[0]] == \
        [r["loss"] for r in read_metrics(finished_run / "metrics.jsonl")[0]]


def test_resuming_a_finished_run_into_another_dir_only_evaluates(tmp_path, tokenizer, finished_run):
    before = snapshot_files(finished_run)
    summary = run(tokenizer, tmp_path / "copy", "lora", max_steps=6, tinit=1, tfinal=1, resume=str(finished_run))
    rows, evals = read_metrics(summary["metrics"])
    source_rows, source_evals = read_metrics(finished_run / "metrics.jsonl")
    assert rows == source_rows and len(evals) == 1 and evals[0]["accuracy"] == source_evals[0]["accuracy"]
    assert snapshot_files(finished_run) == before


@pytest.mark.parametrize("change, message", [
    (dict(method="adalora"), r"another run: method \(recorded 'lora', given 'adalora': --method\)"),
    (dict(hidden=48), "does not fit this model"),
    (dict(max_steps=4), r"max_steps \(given 4: below the checkpoint's step 6\)"),
])
def test_checkpoint_of_another_method_or_model_is_refused(tmp_path, tokenizer, finished_run, change, message):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot_files(out)
    options = {**dict(method="lora", max_steps=6, tinit=1, tfinal=1, resume=str(out)), **change}
    with pytest.raises(ckpt_lib.CheckpointError, match=message):
        run(tokenizer, out, **options)
    assert snapshot_files(out) == before


def test_resume_without_a_checkpoint(tmp_path, tokenizer, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        run(tokenizer, tmp_path / "out", resume=str(tmp_path / "empty"))
    code = cli.main(["train", "--resume", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the writer
def test_save_is_atomic_and_keeps_the_newest(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save = functools.partial(ckpt_lib.save_checkpoint, str(tmp_path), model=model, optimizer=opt, loop={},
                             rng=ckpt_lib.capture_rng(), args={}, keep=2)
    for step in (1, 2, 3):
        save(step=step)
    assert steps_of(tmp_path) == [2, 3]

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save(step=4)
    assert steps_of(tmp_path) == [2, 3]  # no half-written step-4; the older ones untouched
    monkeypatch.undo()
    save(step=3)  # the same step again: replaced in place; the crash's temp dir is cleaned up
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-0000002", "step-0000003"]
    loaded = ckpt_lib.load_checkpoint(ckpt_lib.find_checkpoint(str(tmp_path)))
    assert loaded["step"] == 3 and torch.equal(loaded["tensors"]["model.weight"], model.weight.detach())
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)


@pytest.mark.parametrize("saved, resumed", [(False, True), (True, False)])
def test_a_checkpoint_with_other_lambda_codes_is_refused_with_the_flag_to_use(saved, resumed):
    """A checkpoint written before lambda_codes became the default does not fit the default model: the message says
    which option to set."""
    import hyperadalora as ha
    from test_model import cfg

    writer = ha.get_peft_model(make_bert(), cfg(lambda_codes=saved))
    reader = ha.get_peft_model(make_bert(), cfg(lambda_codes=resumed))
    tensors, meta = ckpt_lib.model_state(writer)
    with pytest.raises(ckpt_lib.CheckpointError, match="does not fit this model.*--lambda-codes false"):
        ckpt_lib.load_model_state(reader, tensors, meta, "ckpt")


def rewrite_state(ckpt_dir: Path, edit) -> None:
    """Edit a checkpoint's state.json and update its manifest (as an older version of the library would have
    written it)."""
    state = json.loads((ckpt_dir / "state.json").read_text())
    edit(state)
    (ckpt_dir / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"]["state.json"] = ckpt_lib._file_info(str(ckpt_dir / "state.json"))
    manifest["files_sha256"] = ckpt_lib._manifest_digest(manifest["files"])
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_records_its_hypernetwork_options_and_a_resume_keeps_them(tmp_path, tokenizer):
    """The checkpoint records every hypernetwork option, defaults included. A resume takes them from the record,
    even where the library's default is another (simulated: a checkpoint of lambda_codes=False whose run set
    nothing); an option given with another value is refused, naming it."""
    out = tmp_path / "run"
    run(tokenizer, out, "hyperadalora", max_steps=4, save_every=2, tinit=1, tfinal=1,
        hyper={"lambda_codes": False, "hypernet_dim": 8})
    ckpt = out / "checkpoints" / "step-0000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["hypernetwork_options"] == train_mod.hypernetwork_options(
        TrainArgs(method="hyperadalora", hyper={"lambda_codes": False, "hypernet_dim": 8}))
    assert state["hypernetwork_options"]["lambda_codes"] is False
    assert state["hypernetwork_options"]["context"] == "layer_feature"  # a default, recorded too

    rewrite_state(ckpt, lambda s: s["args"].update(hyper={"hypernet_dim": 8}))  # lambda_codes=False was the default
    before = snapshot_files(out)
    for given in ({"feature_lr_ratio": 10.0}, {"lambda_codes": True}):
        with pytest.raises(ResumeConflict, match=rf"another run: {next(iter(given))} \(recorded"):
            TrainArgs.resumed(str(out), hyper=given)
    assert snapshot_files(out) == before
    args = TrainArgs.resumed(str(out), max_steps=6)
    assert args.hyper["lambda_codes"] is False and args.hyper["hypernet_dim"] == 8 and args.max_steps == 6
    summary = train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                    train_examples=toy_examples(20), eval_examples=toy_examples(8, seed=1))
    assert summary["resumed_from"].endswith("step-0000004") and summary["hypernetwork_options"]["lambda_codes"] is False


def test_a_checkpoint_without_recorded_options_still_gets_the_lambda_codes_hint(tmp_path, tokenizer):
    out = tmp_path / "run"
    run(tokenizer, out, "hyperadalora", max_steps=3, save_every=3, tinit=1, tfinal=1, hyper={"lambda_codes": False})
    rewrite_state(out / "checkpoints" / "step-0000003", lambda s: (s.pop("hypernetwork_options"),
                                                                   s["args"].update(hyper={})))
    with pytest.raises(ckpt_lib.CheckpointError, match="--lambda-codes false for a checkpoint written before"):
        run(tokenizer, out, "hyperadalora", max_steps=4, tinit=1, tfinal=1, resume=str(out))
