"""FSDP (FSDP2, `--fsdp`): 2 CPU processes (gloo, torchrun) against one process with the same global batch.

Every method trains a tiny Llama (its decoder layers are the FSDP units) on a tiny instruction task, 6 steps,
batch 2 per process against batch 4 in one process (tests/fsdp_worker.py). Checked: the losses follow the single
process's within fp32 rounding; the rank decisions (HyperAdaLoRA's masks, peft AdaLoRA's rank pattern) are the
same on both processes and in the single process at every step; each process holds half of the base model's
parameters; the adapter saved by process 0 loads in one process and gives the single-process run's outputs; a
run stopped by SIGTERM and continued with resume ends bit for bit where the uninterrupted FSDP run ends.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from hyperadalora.training import TrainArgs
from hyperadalora.training.distributed import transformer_blocks

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
STEPS = 6
METHODS = ["hyperadalora", "adalora", "lora", "dora", "hyperlora", "hyperdora", "hydralora", "hyperhydralora"]
RESUMED = ["hyperadalora", "adalora"]
# fp32 tolerance of the losses (about 10 here): the two processes sum their halves of the global batch's token losses
# and average their gradients by all_reduce, where one process sums them all at once; the orders of the float
# additions differ, so the losses differ by a few units in the last place (fp32: ~1e-7 relative), and Adam's
# per-entry normalisation lets such differences in tiny gradients grow over the steps. 1e-5 relative is ~100 ulps;
# measured: at most 2.1e-6 absolute (2e-7 relative) over the 6 steps of every method.
LOSS_RTOL = 1e-5

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(HERE, "fsdp_worker.py"), *map(str, args), "--steps", str(STEPS)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """OUT/two (FSDP, 2 processes, every method), OUT/one (1 process), OUT/int (FSDP, SIGTERM after step 3, then
    resumed to the end)."""
    from fsdp_worker import run

    root = tmp_path_factory.mktemp("fsdp")
    two = torchrun(root / "two", "--batch-size", "2", "--fsdp", "--methods", ",".join(METHODS))
    try:
        run(str(root / "one"), METHODS, batch_size=4, steps=STEPS)  # the reference, meanwhile
    finally:
        finish(two)
    finish(torchrun(root / "int", "--batch-size", "2", "--fsdp", "--methods", ",".join(RESUMED), "--sigterm-at", "3"))
    finish(torchrun(root / "int", "--batch-size", "2", "--methods", ",".join(RESUMED), "--resume"))
    return root


def load(root, run, method, name="process-0"):
    return torch.load(root / run / method / f"{name}.pt")


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- fast checks
def test_fsdp_with_a_quantized_base_is_refused_with_the_reason():
    for bits in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(ValueError, match="bitsandbytes' 4-bit / 8-bit parameters keep their quantization state"):
            TrainArgs(method="hyperadalora", fsdp=True, **{bits: True})
    with pytest.raises(ValueError, match="fsdp=1 must be true or false"):
        TrainArgs(fsdp=1)


def test_fsdp_units_are_the_transformer_blocks(monkeypatch):
    from conftest import make_bert, make_llama

    llama, bert = make_llama(num_layers=3), make_bert(num_layers=2)
    assert [type(m).__name__ for m in transformer_blocks(llama)] == ["LlamaDecoderLayer"] * 3
    # BERT names no _no_split_modules block class: its longest list of identical blocks
    assert transformer_blocks(bert) == list(bert.bert.encoder.layer)
    # accelerate launch's fsdp_transformer_layer_cls_to_wrap (FSDP_TRANSFORMER_CLS_TO_WRAP) wins
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaMLP")
    assert [type(m).__name__ for m in transformer_blocks(llama)] == ["LlamaMLP"] * 3


def test_fsdp_flag_of_the_cli_and_the_resume_rule():
    from hyperadalora.resume import OVERRIDABLE
    from hyperadalora.training.args import RESUME_FREE_ARGS

    assert TrainArgs().fsdp is False and TrainArgs(fsdp=True).fsdp is True
    assert "fsdp" in OVERRIDABLE and "fsdp" in RESUME_FREE_ARGS   # FSDP or DDP: the same run


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_losses_follow_one_process_with_the_global_batch(runs, method):
    r0, r1, one = load(runs, "two", method), load(runs, "two", method, "process-1"), load(runs, "one", method)
    assert [s["step"] for s in r0["steps"]] == [s["step"] for s in one["steps"]] == list(range(1, STEPS + 1))
    for a, b in zip(r0["steps"], one["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL, abs=0), a["step"]
        assert a["total_rank"] == b["total_rank"], a["step"]
    # the rank decisions: the same on both processes and in the single process, at every step
    for a, b, c in zip(r0["steps"], r1["steps"], one["steps"]):
        if "mask" in a:
            assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["mask"], c["mask"]), a["step"]
            assert torch.equal(a["ipt"], b["ipt"]), a["step"]   # sensitivity EMAs, before the broadcast
        assert a.get("rank_pattern") == b.get("rank_pattern") == c.get("rank_pattern"), a["step"]
    if method in ("hyperadalora", "adalora"):
        assert r0["steps"][-1]["total_rank"] < r0["steps"][0]["total_rank"]   # pruning did happen
    summary = json.loads((runs / "two" / method / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["final_eval"]["n_generated"] == 2   # generate ran under FSDP


@pytest.mark.slow
@needs_gloo
def test_each_process_holds_half_of_the_base_model(runs):
    for method in METHODS:
        shares = [load(runs, "two", method, f"process-{r}")["share"] for r in (0, 1)]
        for share in shares:
            assert share["base_params_total"] > 1_000_000
            assert share["base_fraction"] == pytest.approx(0.5, abs=0.01), (method, share)
            assert share["base_storage_bytes"] <= 0.51 * share["base_params_total"] * 4
        summary = json.loads((runs / "two" / method / "summary.json").read_text())
        assert summary["fsdp"] == shares[0]


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_the_adapter_saved_under_fsdp_loads_in_one_process(runs, method):
    import peft

    import hyperadalora as ha
    from fsdp_worker import base_model, tokenizer

    tok = tokenizer()
    ids = tok(["Say good 3 times."], return_tensors="pt")["input_ids"]

    def logits(run):
        directory = str(runs / run / method / "adapter")
        if method in ("lora", "dora", "adalora"):
            model = peft.PeftModel.from_pretrained(base_model(tok), directory)
        else:
            model = ha.load_adapter(base_model(tok), directory)
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    sharded, single = logits("two"), logits("one")
    assert torch.allclose(sharded, single, rtol=1e-3, atol=1e-4), (sharded - single).abs().max()
    assert not torch.equal(sharded, base_model(tok)(input_ids=ids).logits)   # the adapter did change the model


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("method", RESUMED)
def test_sigterm_and_resume_under_fsdp_are_bit_exact(runs, method):
    interrupted = load(runs, "int", method)
    assert interrupted["status"] == "interrupted" and interrupted["steps"][-1]["step"] == 3
    resumed = load(runs, "int", method, "process-0-resumed")
    assert resumed["status"] == "done" and [s["step"] for s in resumed["steps"]] == [4, 5, 6]
    straight = metrics(runs / "two" / method / "metrics.jsonl")
    again = metrics(runs / "int" / method / "metrics.jsonl")
    drop = ("time", "train_time")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(again) == strip(straight)       # every training row and the evaluation, bit for bit
    ref = load(runs, "two", method)
    for a, b in zip(ref["steps"][3:], resumed["steps"]):
        assert a["loss"] == b["loss"]
        if "mask" in a:
            assert torch.equal(a["mask"], b["mask"])
    from safetensors.torch import load_file

    name = "adapter_model.safetensors"
    x, y = load_file(runs / "two" / method / "adapter" / name), load_file(runs / "int" / method / "adapter" / name)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@needs_gloo
def test_accelerate_launch_with_the_fsdp_config_shards_the_base(tmp_path):
    """`accelerate launch --config_file benchmarks/accelerate_fsdp2.yaml -m hyperadalora train ...`: no --fsdp
    flag; accelerate's ACCELERATE_USE_FSDP turns it on, on 2 CPU processes."""
    import shutil

    from fsdp_worker import base_model, records, tokenizer

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    tok = tokenizer()
    base_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data.json").write_text(json.dumps(records()))
    config = os.path.join(os.path.dirname(HERE), "benchmarks", "accelerate_fsdp2.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        env.pop(name, None)
    out = tmp_path / "run"
    cmd = [accelerate, "launch", "--config_file", config, "--main_process_port", str(free_port()),
           "-m", "hyperadalora", "train", "--method", "hyperadalora", "--model", str(tmp_path / "model"),
           "--task", "alpaca", "--data-path", str(tmp_path / "data.json"), "--max-steps", "3", "--batch-size", "2",
           "--max-length", "24", "--tinit", "1", "--tfinal", "1", "--gen-eval-examples", "1", "--max-new-tokens", "2",
           "--max-eval-examples", "2", "--no-progress", "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["args"]["fsdp"] is False      # not given: accelerate's config
    assert summary["fsdp"]["base_fraction"] == pytest.approx(0.5, abs=0.01)
