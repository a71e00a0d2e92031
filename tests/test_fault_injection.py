"""Faults lose nothing: a full disk, a torn metrics line, corrupted adapter files (in-process, fast), and the fault
injection suite of benchmarks/fault_injection.py on real processes (a SIGKILL inside a checkpoint write here; the
quick suite, every fault and every method, as a slow test)."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert
from hyperadalora import checkpoint as ckpt_lib
from hyperadalora.training import DiskFullError, TrainingInterrupted, read_metrics
from test_checkpoint import run, signal_at, tokenizer  # noqa: F401 (a fixture)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import fault_injection  # noqa: E402


def train_rows(summary_or_dir):
    path = summary_or_dir["metrics"] if isinstance(summary_or_dir, dict) else Path(summary_or_dir) / "metrics.jsonl"
    return [(r["step"], r["loss"], r["task_loss"], r["lr"], r["total_rank"]) for r in read_metrics(path)[0]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer):  # noqa: F811
    out = tmp_path_factory.mktemp("fault-ref") / "run"
    return train_rows(run(tokenizer, out, "hyperadalora", lora_dropout=0.1, save_every=1))


def test_a_full_disk_stops_the_run_clearly_and_the_last_checkpoint_resumes(tmp_path, tokenizer, reference,  # noqa: F811
                                                                           monkeypatch):
    real, calls = ckpt_lib.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):  # the disk fills during the 4th checkpoint's first file
        calls["n"] += 1
        if calls["n"] == 7:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_lib, "save_file", save_file)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"No space left on the device while writing the run's files \(.*"
                                            r"model.safetensors\).*last complete checkpoint, .*step-0000003, is "
                                            r"intact.*--resume") as info:
        run(tokenizer, out, "hyperadalora", lora_dropout=0.1, save_every=1)
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000002", "step-0000003"]  # no half-written one left
    ckpt_lib.load_checkpoint(str(out / "checkpoints" / "step-0000003"))  # verifies
    monkeypatch.undo()
    summary = run(tokenizer, out, "hyperadalora", lora_dropout=0.1, save_every=1, resume=str(out))
    assert train_rows(summary) == reference  # bit for bit


def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path, tokenizer, reference, capsys):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run(tokenizer, out, "hyperadalora", lora_dropout=0.1, save_every=1, on_step=signal_at(5))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.69')  # a kill half-way through a row
    capsys.readouterr()
    summary = run(tokenizer, out, "hyperadalora", lora_dropout=0.1, save_every=1, resume=str(out))
    assert "its last line was torn by the interruption; repaired" in capsys.readouterr().err
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line whole
    assert train_rows(summary) == reference


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:
        data[len(data) - 3] ^= 0x04  # a byte near the end: in the tensor data, or a value of the JSON
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("method, name", [("hyperadalora", "adapter_model.safetensors"),
                                          ("hyperadalora", "hyperadalora_config.json"),
                                          ("hyperlora", "adapter_model.safetensors"),
                                          ("hyperlora", "method_config.json")])
def test_a_damaged_adapter_file_is_refused_naming_it(tmp_path, method, name, how):
    cfg = (ha.HyperAdaLoraConfig(init_r=3, target_r=2, total_step=10, tinit=1, tfinal=2, target_modules=BERT_TARGETS,
                                 task_type="SEQ_CLS") if method == "hyperadalora"
           else ha.HyperLoraConfig(r=2, target_modules=BERT_TARGETS, task_type="SEQ_CLS"))
    model = ha.get_peft_model(make_bert(), cfg)
    model.save_pretrained(str(tmp_path))
    ha.load_adapter(make_bert(), str(tmp_path))  # whole: loads
    damage(tmp_path / name, how)
    with pytest.raises(ValueError, match=str(tmp_path / name).replace(".", r"\.")):
        ha.load_adapter(make_bert(), str(tmp_path))


def test_a_complete_checkpoint_of_a_step_is_never_replaced(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())

    def save():
        return ckpt_lib.save_checkpoint(str(tmp_path), 3, model, opt, {}, ckpt_lib.capture_rng(), {}, keep=2)

    path = save()
    manifest = Path(path, "manifest.json").read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("a complete checkpoint was moved"))
    assert save() == path and Path(path, "manifest.json").read_bytes() == manifest
    monkeypatch.undo()
    Path(path, "optimizer.pt").write_bytes(b"x")  # a damaged one is replaced
    assert save() == path
    ckpt_lib.verify(path)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    suite = fault_injection.Suite(fault_injection.parse_args(["--quick"]))
    yield suite
    import shutil

    shutil.rmtree(suite.root, ignore_errors=True)


def test_sigkill_inside_a_checkpoint_write_loses_nothing(suite):
    """A real process killed (SIGKILL) after the rename of a checkpoint into place, before its fsync and the removal
    of the old one: the newest complete checkpoint verifies and `--resume` continues bit for bit."""
    suite.kill_trial("sigkill-in-checkpoint", "rename-after, step 4",
                     {"kind": "kill", "point": "rename-after", "step": 4})
    trial = suite.trials[-1]
    assert trial["survived"] and not trial["data_lost"], trial


@pytest.mark.slow
def test_the_quick_fault_injection_suite_loses_nothing(tmp_path):
    """The script as a user runs it (its own process, which forks the training processes): every fault, every
    method's SIGINT or SIGTERM; nothing lost, every trial survived."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "fault_injection.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--kill-trials", "2", "--disk-trials", "1", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["fault"]: r for r in result["rows"]}
    assert set(rows) == {"sigkill-random", "sigkill-in-checkpoint", "sigkill-in-metrics", "sigint", "sigterm",
                         "corrupt-checkpoint", "corrupt-adapter", "disk-full"}
    assert {t["detail"].split(",")[0] for t in result["trials"] if t["fault"] in ("sigint", "sigterm")} == \
        set(fault_injection.METHODS)
    bad = [t for t in result["trials"] if not t["survived"] or t["data_lost"]]
    assert not bad and proc.returncode == 0, (bad, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "| **all** |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_sigkill_of_a_fresh_interpreter(tmp_path):
    """The same with every process a fresh interpreter (no fork)."""
    suite = fault_injection.Suite(fault_injection.parse_args(["--quick", "--spawn"]))
    try:
        suite.kill_trial("sigkill-in-checkpoint", "optimizer.pt, step 3",
                         {"kind": "kill", "point": "optimizer.pt", "step": 3})
    finally:
        import shutil

        shutil.rmtree(suite.root, ignore_errors=True)
    assert all(t["survived"] and not t["data_lost"] for t in suite.trials), suite.trials
