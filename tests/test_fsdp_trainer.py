"""`HyperAdaLoraTrainer` / `HyperAdaLoraSFTTrainer` under FSDP (FSDP2): 2 CPU processes (gloo) against one process
with the same global batch (tests/fsdp_trainer_worker.py).

HyperAdaLoRA and peft's AdaLoRA under `HyperAdaLoraTrainer` on a tiny Llama (HyperAdaLoRA with 2 micro-batches per
step), HyperAdaLoRA under `HyperAdaLoraSFTTrainer`, 6 steps of 4 examples; FSDP through TrainingArguments under
torchrun, and through `accelerate launch --config_file benchmarks/accelerate_fsdp2.yaml`. Checked: the training and
evaluation losses follow the single process's within fp32 rounding (test_fsdp.LOSS_RTOL: 1e-5 relative); the rank
allocation is the same on both processes and in the single process at every step, and the trained state is the same
on both processes (one digest); each process holds half of the base model's parameters; the checkpoints hold the
adapter and the training state (no FSDP shards, no base model), and resume (HyperAdaLoRA bit for bit; peft's AdaLoRA
as without FSDP: the next step exactly, from a checkpoint before its first masking step, see
`fsdp_trainer_worker.RESUME_AT`); the adapter saved under FSDP loads in one process.
"""

import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fsdp_trainer_worker.py")
sys.path.insert(0, HERE)
from fsdp_trainer_worker import CASES, RESUME_AT, SAVE_STEPS, STEPS  # noqa: E402
from test_fsdp import LOSS_RTOL, free_port, needs_gloo  # noqa: E402

RESUMED = sorted(RESUME_AT)


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
         "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        e.pop(name, None)
    return e


def torchrun(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, *map(str, args)]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """OUT/two (FSDP via TrainingArguments, 2 processes; then the first two cases resumed from their step-3
    checkpoints) and OUT/one (1 process)."""
    from fsdp_trainer_worker import run

    root = tmp_path_factory.mktemp("fsdp-trainer")
    two = torchrun(root / "two", "--fsdp")
    try:
        run(str(root / "one"), CASES)  # the reference, meanwhile
    finally:
        finish(two)
    finish(torchrun(root / "two", "--fsdp", "--resume", "--cases", ",".join(RESUMED)))
    return root


def load(root, run, case, name="process-0"):
    return torch.load(root / run / case / f"{name}.pt", weights_only=False)


def same_allocation(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


# ---------------------------------------------------------------------------------------------- fast checks
def test_fsdp_settings_the_trainer_cannot_apply_are_refused_with_the_reason():
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from conftest import make_llama
    from hyperadalora.callbacks import _fsdp_refusal

    model = make_llama()
    ok = dict(fsdp_version=2, activation_checkpointing=False, cpu_offload=OffloadPolicy(),
              cpu_ram_efficient_loading=False)
    assert _fsdp_refusal(SimpleNamespace(**ok), model) is None
    for change, words in [({"fsdp_version": 1}, "FSDP version 1.*Set fsdp_version: 2"),
                          ({"activation_checkpointing": True}, "activation_checkpointing.*Set it to false"),
                          ({"cpu_offload": CPUOffloadPolicy()}, "CPU offload.*would be ignored"),
                          ({"cpu_ram_efficient_loading": True}, "cpu_ram_efficient_loading.*Set it to false")]:
        message = _fsdp_refusal(SimpleNamespace(**{**ok, **change}), model)
        assert message is not None and re.search(words, message), (change, message)


def test_fsdp_asked_for_and_not_enabled_by_accelerate_is_said(monkeypatch):
    from hyperadalora.callbacks import _fsdp_not_enabled

    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    ddp, alone = SimpleNamespace(fsdp=True, world_size=2), SimpleNamespace(fsdp=None, world_size=1)
    assert _fsdp_not_enabled(ddp, False) is None    # one process: Trainer refuses fsdp itself
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _fsdp_not_enabled(ddp, True) is None and _fsdp_not_enabled(alone, False) is None
    assert "This run is DDP" in _fsdp_not_enabled(ddp, False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")   # accelerate launch on the CPU without use_cpu
    assert "not joined" in _fsdp_not_enabled(alone, False)


def test_only_the_base_models_frozen_parameters_are_sharded():
    import peft

    import hyperadalora as ha
    from conftest import make_llama
    from fsdp_trainer_worker import TARGETS, adapter_config
    from hyperadalora.callbacks import _base_parameter_ids

    for method in ("hyperadalora", "adalora"):
        base = make_llama()
        base_ids = {id(p) for p in base.parameters()}
        config = adapter_config(method, 0.0)
        model = ha.get_peft_model(base, config) if method == "hyperadalora" else peft.get_peft_model(base, config)
        sharded = _base_parameter_ids(model)
        assert sharded == base_ids, method   # every weight of the Llama, nothing the adapter adds
        kept = [n for n, p in model.named_parameters() if id(p) not in sharded]
        assert kept and all(any(t in n for t in TARGETS) or "generators" in n for n in kept), kept[:5]
        if method == "adalora":  # its frozen rank counters stay whole
            assert any("ranknum" in n for n in kept)


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("case", CASES)
def test_fsdp_losses_and_ranks_follow_one_process_with_the_global_batch(runs, case):
    r0, r1, one = load(runs, "two", case), load(runs, "two", case, "process-1"), load(runs, "one", case)
    assert r0["fsdp"] and r0["world"] == 2 and r0["dtensors"] > 0 and one["world"] == 1
    assert sorted(r0["losses"]) == sorted(one["losses"]) == list(range(1, STEPS + 1))
    for step in one["losses"]:
        assert r0["losses"][step] == pytest.approx(one["losses"][step], rel=LOSS_RTOL, abs=0), step
    assert r0["losses"] == r1["losses"]
    assert r0["eval"].keys() == one["eval"].keys() == ({"before", "after"} if case.startswith("trainer") else set())
    for when in one["eval"]:   # Trainer.evaluate, before training (the model not yet prepared) and after
        assert r0["eval"][when] == pytest.approx(one["eval"][when], rel=LOSS_RTOL, abs=0), when
    for step in one["steps"]:   # the rank decisions: the same on both processes and in the single process
        assert same_allocation(r0["steps"][step], r1["steps"][step]), step
        assert same_allocation(r0["steps"][step], one["steps"][step]), step
    first, last = r0["steps"][1], r0["steps"][STEPS]
    if "mask" in first:
        assert last["mask"].sum() < first["mask"].sum()     # pruning did happen
    else:
        assert last["rank_pattern"] != first["rank_pattern"]
    assert r0["digest"] == r1["digest"]   # the adapters, hypernetworks and allocator: identical on both processes


@pytest.mark.slow
@needs_gloo
def test_each_process_holds_half_of_the_base_model(runs):
    for case in CASES:
        for rank in (0, 1):
            share = load(runs, "two", case, f"process-{rank}")["share"]
            assert share["base_params_total"] > 20_000
            assert share["base_fraction"] == pytest.approx(0.5, abs=0.01), (case, share)
            assert share["base_storage_bytes"] <= 0.51 * share["base_params_total"] * 4
        assert load(runs, "one", case)["share"] is None


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("case", CASES)
def test_checkpoints_under_fsdp_hold_the_adapter_not_fsdp_shards(runs, case):
    names = set(os.listdir(runs / "two" / case / f"checkpoint-{SAVE_STEPS}"))
    ours = case.endswith("hyperadalora")
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pth",
            "rng_state_1.pth"} <= names
    assert ("training_state.safetensors" in names) == ours and ("adapter_config.json" in names) == (not ours)
    assert not any("fsdp" in n for n in names) and "model.safetensors" not in names


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("case", RESUMED)
def test_a_checkpoint_written_under_fsdp_resumes_under_fsdp(runs, case):
    straight, resumed = load(runs, "two", case), load(runs, "two", case, "process-0-resumed")
    at = RESUME_AT[case]
    assert sorted(resumed["losses"]) == list(range(at + 1, STEPS + 1))
    assert resumed["losses"][at + 1] == straight["losses"][at + 1]   # the checkpoint's state, exactly
    if case == "trainer-hyperadalora":   # training_state.safetensors: the run continues bit for bit
        assert resumed["losses"] == {s: straight["losses"][s] for s in resumed["losses"]}
        assert all(same_allocation(resumed["steps"][s], straight["steps"][s]) for s in resumed["steps"])
        assert resumed["digest"] == straight["digest"]
    # peft's AdaLoRA: Trainer's own checkpoint (the adapter and the optimizer; not the allocator's importance EMAs,
    # as without FSDP): the step after the checkpoint is exact, the importance from then on starts afresh
    assert resumed["digest"] == load(runs, "two", case, "process-1-resumed")["digest"]


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("case", CASES)
def test_the_adapter_saved_under_fsdp_loads_in_one_process(runs, case):
    import peft

    import hyperadalora as ha
    from fsdp_trainer_worker import base_model, tokenizer

    tok = tokenizer() if case.startswith("sft") else None
    ids = torch.tensor([[5, 17, 99, 64, 3, 42]])

    def loaded(run):
        directory = str(runs / run / case / "final")
        if case.endswith("adalora") and not case.endswith("hyperadalora"):
            return peft.PeftModel.from_pretrained(base_model(case, tok), directory)
        return ha.load_adapter(base_model(case, tok), directory)

    sharded, single = loaded("two"), loaded("one")
    with torch.no_grad():
        a, b = sharded.eval()(input_ids=ids).logits, single.eval()(input_ids=ids).logits
        plain = base_model(case, tok)(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (a - b).abs().max()
    assert not torch.allclose(a, plain, atol=1e-5)   # the adapter did change the model
    if hasattr(sharded, "rank_pattern"):
        assert sharded.rank_pattern == single.rank_pattern


@pytest.mark.slow
@needs_gloo
def test_accelerate_launch_with_the_fsdp2_config_trains_the_trainer_sharded(runs, tmp_path):
    """`accelerate launch --config_file benchmarks/accelerate_fsdp2.yaml script.py`: no fsdp in TrainingArguments,
    accelerate's environment turns FSDP on (on the CPU through the worker's `enable_fsdp_on_the_cpu`)."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    config = os.path.join(os.path.dirname(HERE), "benchmarks", "accelerate_fsdp2.yaml")
    case = "trainer-hyperadalora"
    cmd = [accelerate, "launch", "--config_file", config, "--main_process_port", str(free_port()), WORKER,
           str(tmp_path), "--cases", case]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    launched, one = torch.load(tmp_path / case / "process-0.pt", weights_only=False), load(runs, "one", case)
    assert launched["fsdp"] and launched["world"] == 2
    assert launched["share"]["base_fraction"] == pytest.approx(0.5, abs=0.01)
    for step in one["losses"]:
        assert launched["losses"][step] == pytest.approx(one["losses"][step], rel=LOSS_RTOL, abs=0), step
    assert launched["losses"] == load(runs, "two", case)["losses"]   # the same run as through TrainingArguments


@pytest.mark.slow
@needs_gloo
def test_ddp_after_an_evaluation_before_training_follows_one_process(runs, tmp_path):
    """The Trainer's ordinary DDP (no fsdp; 2 CPU processes) with ``trainer.evaluate()`` before ``train()``: Trainer's
    evaluation prepares the bare model (accelerate marks it prepared, without DDP) and train's prepare would leave it
    unwrapped, each process training on its own gradients (HyperAdaLoRA drifted 3.2e-3 from one process at step 2, and
    process 1's masks differed); `HyperAdaLoraTrainer` lets accelerate wrap it (`_unprepare_evaluation_model`)."""
    cases = ["trainer-hyperadalora", "trainer-adalora"]
    finish(torchrun(tmp_path, "--cases", ",".join(cases)))
    for case in cases:
        r0, r1 = (torch.load(tmp_path / case / f"process-{r}.pt", weights_only=False) for r in (0, 1))
        one = load(runs, "one", case)
        assert not r0["fsdp"] and r0["world"] == 2 and r0["dtensors"] == 0
        for step in one["losses"]:
            assert r0["losses"][step] == pytest.approx(one["losses"][step], rel=LOSS_RTOL, abs=0), (case, step)
        for when in one["eval"]:
            assert r0["eval"][when] == pytest.approx(one["eval"][when], rel=LOSS_RTOL, abs=0), (case, when)
        for step in one["steps"]:
            assert same_allocation(r0["steps"][step], r1["steps"][step]), (case, step)
            assert same_allocation(r0["steps"][step], one["steps"][step]), (case, step)
        assert r0["digest"] == r1["digest"], case
