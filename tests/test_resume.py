"""Resume continues the recorded run: options from the checkpoint's record, explicit overrides only where they keep it
the same run (a note each), anything else refused naming it: from the CLI (flags and YAML) and from Python."""

import functools
import json
import os
import shutil
import signal

import pytest

from hyperadalora import cli
from hyperadalora import training as train_mod
from hyperadalora.resume import OVERRIDABLE, ResumeConflict, ResumeNote
from hyperadalora.training import TrainArgs, read_metrics
from test_checkpoint import signal_at, snapshot_files, tokenizer  # noqa: F401 (a fixture)
from test_train import write_sst2, write_tiny_model

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("resume")
    model_dir = write_tiny_model(root / "model", tokenizer)
    data_dir = write_sst2(root / "glue", n_train=24, n_dev=8)
    argv = ["train", "--method", "hyperadalora", "--task", "sst2", "--model", model_dir, "--data-dir", data_dir,
            "--max-steps", str(STEPS), "--batch-size", "8", "--max-length", "16", "--tinit", "1", "--tfinal", "2",
            "--lora-dropout", "0.1", "--save-every", "3", "--no-progress"]
    assert cli.main(argv + ["--output-dir", str(root / "ref")]) == 0
    return root, argv


def losses(run_dir):
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[0]
    return [(r["step"], r["loss"], r["task_loss"], r["lr"], r["total_rank"]) for r in rows]


def interrupted(root, argv, name, monkeypatch, at=4):
    out = root / name
    original = train_mod.train
    monkeypatch.setattr(train_mod, "train", functools.partial(original, on_step=signal_at(at, signal.SIGINT)))
    assert cli.main(argv + ["--output-dir", str(out)]) == 130
    monkeypatch.setattr(train_mod, "train", original)
    return out


def test_resume_alone_continues_the_recorded_run_bit_for_bit(setup, monkeypatch, capsys):
    """The issue's case: stopped with Ctrl-C, then `hyperadalora train --resume RUN_DIR` and nothing else."""
    root, argv = setup
    out = interrupted(root, argv, "alone", monkeypatch)
    assert f"--resume {out}" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note:" not in err and "different arguments" not in err
    assert losses(out) == losses(root / "ref")  # every step, bit for bit
    assert json.loads((out / "summary.json").read_text())["args"]["task"] == "sst2"


@pytest.mark.parametrize("flags, named", [
    (["--task", "sentiment"], ["task (recorded 'sst2', given 'sentiment': --task)"]),
    (["--batch-size", "16", "--seed", "1"], ["batch_size (recorded 8, given 16", "seed (recorded 0, given 1"]),
    (["--lr", "0.01", "--momentum", "0.9"], ["lr (recorded 0.001, given 0.01", "momentum (recorded 0.5, given 0.9"]),
    (["--method", "lora"], ["method (recorded 'hyperadalora', given 'lora'"]),
    (["--max-steps", "2"], ["max_steps (given 2: below the checkpoint's step 4)"]),
])
def test_a_flag_that_would_make_another_run_is_refused(setup, monkeypatch, capsys, flags, named):
    root, argv = setup
    out = root / "refused"
    if not out.exists():
        interrupted(root, argv, "refused", monkeypatch)
    capsys.readouterr()
    before = snapshot_files(out)
    assert cli.main(["train", "--resume", str(out), *flags]) == 2
    err = capsys.readouterr().err
    for text in named:
        assert text in err
    assert "start a new run: without --resume" in err
    assert snapshot_files(out) == before  # nothing written


def test_yaml_keys_count_as_given(setup, monkeypatch, capsys):
    root, argv = setup
    out = root / "refused"
    if not out.exists():
        interrupted(root, argv, "refused", monkeypatch)
    (root / "other.yaml").write_text("grad_accum: 2\nsave_every: 2\n")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--config", str(root / "other.yaml")]) == 2
    assert "grad_accum (recorded 1, given 2" in capsys.readouterr().err


def test_overrides_that_keep_the_run_are_noted_and_extending_continues(setup, monkeypatch, capsys):
    root, argv = setup
    out = interrupted(root, argv, "extend", monkeypatch)
    other = root / "elsewhere"
    assert cli.main(["train", "--resume", str(out), "--save-every", "2", "--keep-checkpoints", "3",
                     "--output-dir", str(other), "--device", "cpu"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 3 and any("save_every: 3 -> 2" in n for n in notes)
    assert losses(other) == losses(root / "ref")  # checkpointing and the device do not change the run
    assert sorted(os.listdir(other / "checkpoints")) == ["step-0000006", "step-0000008"]
    # extending the finished run: the recorded steps are kept, the run goes on with a note saying what changes
    assert cli.main(["train", "--resume", str(other), "--max-steps", "10"]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "max_steps: 8 -> 10" in err and "differ from the recorded run's" in err
    extended = losses(other)
    assert [r[0] for r in extended] == list(range(1, 11)) and extended[:STEPS] == losses(root / "ref")
    assert json.loads((other / "summary.json").read_text())["args"]["max_steps"] == 10


def test_python_rule_defaults_come_from_the_record(setup, monkeypatch):
    root, argv = setup
    out = root / "python"
    if not out.exists():
        interrupted(root, argv, "python", monkeypatch)
    args = TrainArgs(resume=str(out))  # every field at its default: the record's
    assert (args.task, args.batch_size, args.max_steps, args.save_every, args.tinit) == ("sst2", 8, STEPS, 3, 1)
    assert args.output_dir == str(out) and args.hyper["lambda_codes"] is True  # the recorded options, all of them
    with pytest.warns(ResumeNote, match="save_every: 3 -> 0"):  # an explicit override, even to the default value
        assert TrainArgs.resumed(str(out), save_every=0).save_every == 0
    assert TrainArgs(resume=str(out), save_every=0).save_every == 3  # a default: the record's
    assert TrainArgs(resume=str(out), task="sst2", batch_size=8).batch_size == 8  # the recorded values: the same run
    with pytest.raises(ResumeConflict, match=r"lr \(recorded 0.001, given 0.05.*weight_decay \(recorded 0.0, given"):
        TrainArgs(resume=str(out), lr=0.05, weight_decay=0.1)
    with pytest.raises(ResumeConflict, match=r"hypernet_dim \(recorded 8, given 16"):
        TrainArgs.resumed(str(out), hyper={"hypernet_dim": 16})
    # a TrainArgs changed after it was built is refused by train itself, before anything is written
    args = TrainArgs.resumed(str(out))
    args.lr = 0.5
    before = snapshot_files(out)
    with pytest.raises(ResumeConflict, match=r"lr \(recorded 0.001, now 0.5\)"):
        train_mod.train(args)
    assert snapshot_files(out) == before
    assert "max_steps" in OVERRIDABLE and "lr" not in OVERRIDABLE


def test_moved_data_may_be_given_anew(setup, monkeypatch, tmp_path):
    """A recorded path that no longer exists (the files moved) may be given again, with a note; an existing one
    that is another directory is refused."""
    root, argv = setup
    data = tmp_path / "glue"
    shutil.copytree(argv[argv.index("--data-dir") + 1], data)
    moved_argv = list(argv)
    moved_argv[argv.index("--data-dir") + 1] = str(data)
    out = interrupted(root, moved_argv, "moved", monkeypatch)
    elsewhere = tmp_path / "glue2"
    shutil.copytree(data, elsewhere)
    with pytest.raises(ResumeConflict, match="data_dir"):
        TrainArgs.resumed(str(out), data_dir=str(elsewhere))
    shutil.rmtree(data)
    with pytest.warns(ResumeNote, match=f"data_dir: the recorded '{data}' does not exist here; using"):
        args = TrainArgs.resumed(str(out), data_dir=str(elsewhere))
    assert args.data_dir == str(elsewhere)
