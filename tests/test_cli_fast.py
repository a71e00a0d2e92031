"""The CLI refuses a bad argument before torch / transformers are imported; the TrainingArguments-style flags, their
aliases, the YAML keys and the grouped --help; the snapshot of the options' metadata is current."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from hyperadalora import cli, cli_spec

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "numpy")

# a child process: run the CLI on argv, then report the exit code and which heavy modules were imported
CHILD = """
import json, sys
from hyperadalora import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_cli(argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=300)
    took = time.perf_counter() - t0
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr, took


def test_the_snapshot_is_current():
    """After changing an option (TrainArgs, a method's config, a task...): python -m hyperadalora.cli_spec."""
    snap = cli_spec.snapshot()
    assert snap is not None, "no snapshot: run python -m hyperadalora.cli_spec"
    assert snap["digest"] == cli_spec.sources_digest(), "stale snapshot: run python -m hyperadalora.cli_spec"
    built = cli_spec.build()
    assert {k: v for k, v in snap.items() if k != "digest"} == json.loads(json.dumps(built))


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "alpca"], "unknown task"),
    (["train", "--learning-rte", "1e-3"], "unrecognized arguments"),
    (["train", "--max-steps", "0"], "--max-steps 0: must be a positive integer"),
    (["train", "--max-steps", "ten"], "invalid int value"),
    (["train", "--method", "qlora"], "--method 'qlora': choose one of"),
    (["train", "--lr", "1e-3", "--learning-rate", "2e-3"], "--lr and --learning-rate set the same option"),
    (["train", "--bf16", "--dtype", "float32"], "--bf16 and --dtype set the same option"),
    (["train", "--load-in-4bit", "--load-in-8bit"], "choose one"),
    (["train", "--bnb-4bit-quant-type", "nf4"], "applies to a 4-bit base only"),
    (["train", "--method", "lora", "--tinit", "3"], "the rank budget schedule applies"),
    (["train", "--data-path", "no/such/file.json"], "does not exist"),
    (["train", "--model", "./no-such-model"], "does not exist"),
    (["train", "--config", "no-such.yaml"], "does not exist"),
    (["train", "--resume-from-checkpoint", "no/such/run"], "does not exist"),
    (["train", "--report-to", "neptune"], "choose one of"),
    (["demo", "--method", "lora"], "demo always compares"),
    (["experiment", "no-such-experiment"], "invalid choice"),
    (["train", "--hypernet", "rnn"], "hypernet='rnn' is not supported"),
    (["train", "--beta1", "2"], "beta1=2.0 must be in [0, 1)"),
    (["train", "--target-r", "5"], "target_r=5 > init_r=3"),
    (["train", "--method", "hyperlora", "--hypernet-dim", "0"], "hypernet_dim=0 must be >= 1"),
    (["train", "--method", "hyperhydralora", "--context", "foo"], "context='foo' is not supported"),
])
def test_argument_errors_come_before_torch(argv, message, tmp_path):
    result, err, took = run_cli(argv, cwd=tmp_path)
    assert result["code"] == 2, err
    assert message in err, err
    assert result["heavy"] == [], f"imported before the error: {result['heavy']}"
    print(f"{' '.join(argv)}: {took:.2f} s")


def test_a_yaml_error_comes_before_torch(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 3e-3\nlr: 1e-3\n")
    result, err, _ = run_cli(["train", "--config", str(tmp_path / "run.yaml")], cwd=tmp_path)
    assert result["code"] == 2 and "set the same option" in err and result["heavy"] == []
    (tmp_path / "run.yaml").write_text("learning_rat: 3e-3\n")
    result, err, _ = run_cli(["train", "--config", str(tmp_path / "run.yaml")], cwd=tmp_path)
    assert result["code"] == 2 and "unknown option 'learning_rat'" in err and result["heavy"] == []


def test_help_and_version_import_nothing_heavy(tmp_path):
    for argv in (["train", "--help"], ["--version"], ["experiment", "--help"], ["export", "--help"]):
        result, err, _ = run_cli(argv, cwd=tmp_path)
        assert result["code"] == 0 and result["heavy"] == [], (argv, err)


def test_import_hyperadalora_is_light():
    code = "import sys, hyperadalora; print([m for m in %r if m in sys.modules])" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.path.abspath(SRC)})
    assert out.stdout.strip() == "[]", out.stderr
    import hyperadalora

    assert hyperadalora.HyperAdaLoraConfig is not None and hyperadalora.GeneratedAdapterModel is hyperadalora.AdapterModel


def parse(argv):
    return cli.collect_options(cli.build_parser().parse_args(["train"] + argv))


@pytest.mark.parametrize("new, old, field, value", [
    ("--per-device-train-batch-size", "--batch-size", "batch_size", 4),
    ("--learning-rate", "--lr", "lr", 3e-3),
    ("--gradient-accumulation-steps", "--grad-accum", "grad_accum", 2),
    ("--save-steps", "--save-every", "save_every", 5),
    ("--save-total-limit", "--keep-checkpoints", "keep_checkpoints", 1),
    ("--eval-steps", "--eval-every", "eval_every", 7),
    ("--lora-r", "--init-r", "init_r", 8),
    ("--max-eval-samples", "--max-eval-examples", "max_eval_examples", 16),
    ("--lr-scheduler-type", "--scheduler", "scheduler", "constant"),
])
def test_trainingarguments_names_and_their_aliases(new, old, field, value):
    assert parse([new, str(value)])[field] == value
    assert parse([old, str(value)])[field] == value


def test_one_flag_for_the_precision():
    assert parse(["--bf16"])["precision"] == "bf16"
    assert parse(["--bf16", "false"])["precision"] == "fp32"
    assert parse(["--dtype", "bfloat16"])["dtype"] == "bfloat16"  # the earlier spellings still work
    assert parse(["--precision", "bf16"])["precision"] == "bf16"
    assert parse(["--disable-tqdm"])["progress"] is False and parse(["--no-progress"])["progress"] is False
    assert parse(["--overwrite-output-dir"])["overwrite"] is True and parse(["--overwrite"])["overwrite"] is True
    assert parse(["--logging-steps", "10"])["logging_steps"] == 10


def test_yaml_takes_the_same_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 3e-3\nper_device_train_batch_size: 4\nbf16: true\ndisable_tqdm: true\n"
                    "lora-r: 8\nmax_steps: 20\ninit_std: 0.05\n")
    options = parse(["--config", str(path), "--max-steps", "30"])
    assert options == {"lr": 3e-3, "batch_size": 4, "precision": "bf16", "progress": False, "init_r": 8,
                       "max_steps": 30, "init_std": 0.05}
    path.write_text("lr: 1e-3\ndtype: bfloat16\n")  # the earlier names
    assert parse(["--config", str(path)]) == {"lr": 1e-3, "dtype": "bfloat16"}
    assert parse(["--config", str(path), "--bf16", "false"]) == {"lr": 1e-3, "precision": "fp32"}  # flags win


def test_help_is_grouped_as_trainingarguments():
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for title in cli_spec.GROUP_TITLES.values():
        assert title + ":" in text
    assert "--learning-rate LEARNING_RATE, --lr LEARNING_RATE" in text
    group = text.split("training (TrainingArguments names):")[1].split("\n\n")[0]
    listed = [line.split()[0] for line in group.splitlines() if line.startswith("  -")]
    assert "--bf16" in listed and "--dtype" not in listed and "--precision" not in listed, listed  # one flag
    assert "--per-device-train-batch-size" in text and "--logging-steps" in text and "--bf16" in text


def test_the_flags_build_the_same_trainargs_as_before(tmp_path):
    from hyperadalora.training import TrainArgs, args_from_dict

    new = args_from_dict(parse(["--learning-rate", "3e-3", "--per-device-train-batch-size", "4", "--bf16",
                                "--save-total-limit", "1", "--lora-r", "5"]))
    old = TrainArgs(lr=3e-3, batch_size=4, dtype="bfloat16", keep_checkpoints=1, init_r=5)
    assert new == old


def test_the_kernel_warning_is_held_back(capsys):
    import hyperadalora
    from hyperadalora import progress

    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
    assert "gemm_4bit_forward" not in capsys.readouterr().err
    assert "not installed" in progress.quantized_base_note() and hyperadalora.__version__


def test_a_stage_that_does_not_finish_is_not_reported_done(capsys):
    """An interrupted or failed stage says so (a SIGTERM'd run printed 'training ...: done in 67.3 s')."""
    from hyperadalora.progress import Stages

    stages = Stages()
    stages.enabled = True
    with pytest.raises(KeyboardInterrupt):
        with stages.stage("train", "training"):
            raise KeyboardInterrupt
    with pytest.raises(ValueError):
        with stages.stage("eval", "evaluating", quiet_below=100.0):
            raise ValueError("bad")
    with stages.stage("save", "saving"):
        pass
    err = capsys.readouterr().err
    assert "training: interrupted after" in err and "evaluating: failed after" in err
    assert "saving: done in" in err and "training: done" not in err and set(stages.times) == {"train", "eval", "save"}


@pytest.mark.parametrize("missing, argv, extra", [
    ("bitsandbytes", ["train", "--load-in-8bit"], "pip install 'hyperadalora[quant]'"),
    ("tensorboard", ["train", "--report-to", "tensorboard"], "pip install 'hyperadalora[tracking]'"),
    ("wandb", ["train", "--report-to", "wandb"], "pip install wandb"),
])
def test_a_missing_extra_is_named_before_torch(missing, argv, extra, monkeypatch, capsys):
    """A flag whose optional dependency is not installed: refused by the argument checks (looked up, not imported),
    with the command that installs it. (tests/test_wheel.py checks the same in a venv without the extras.)"""
    from hyperadalora import cli

    monkeypatch.setitem(sys.modules, missing, None)  # importlib.util.find_spec then finds nothing
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"needs {missing}, which is not installed: {extra}." in err, err


def test_a_missing_trl_names_its_extra(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "hyperadalora.sft", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'hyperadalora\[trl\]'"):
        importlib.import_module("hyperadalora.sft")
