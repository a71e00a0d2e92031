"""Mixed precision (bf16 autocast) and gradient accumulation in the training loop (tiny BERT, CPU)."""

import pytest
import torch

from conftest import make_bert
from hyperadalora import training as train_mod
from hyperadalora.methods.hyperadalora.allocation import budget_at
from hyperadalora.training import TrainArgs, read_metrics, train
from test_every_method import EVERY
from test_train import toy_examples


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def run(tmp_path, tokenizer, name, on_step=None, build_adapter=None, **kw):
    base = dict(method="hyperadalora", task="sst2", max_steps=12, batch_size=8, lr=5e-3, max_length=16, seed=0,
                tinit=2, tfinal=3, deltaT=1, device="cpu", progress=False, save_adapter=False, keep_checkpoints=0)
    args = TrainArgs(**{**base, **kw, "output_dir": str(tmp_path / name)})
    summary = train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                    train_examples=toy_examples(64), eval_examples=toy_examples(8, seed=1), on_step=on_step,
                    build_adapter=build_adapter)
    return summary, read_metrics(summary["metrics"])[0]


def test_precision_flag_and_dtype_agree():
    assert TrainArgs(precision="bf16").dtype == "bfloat16"
    assert TrainArgs(dtype="bfloat16").precision == "bf16"
    assert TrainArgs().precision == "fp32" and TrainArgs().dtype == "float32"
    with pytest.raises(ValueError, match="precision"):
        TrainArgs(precision="fp16")


@pytest.mark.parametrize("method", EVERY)
def test_bf16_autocast_stays_close_to_fp32(tmp_path, tokenizer, monkeypatch, method):
    """--precision bf16 in the training loop: the losses stay close to fp32's; for the generated methods the
    hypernetworks run in fp32 under the autocast, their parameters and state are never bf16, and the tensors they
    hand to the layers at every step are fp32 (only the adapted layers run in bf16)."""
    from test_every_method import generated_per_layer, is_generated

    generated = is_generated(method)
    built, seen, checked = {}, set(), []

    def build(args, model, task_type):  # catch the wrapped model to inspect it during training
        wrapped, allocate = original(args, model, task_type)
        built["model"] = wrapped
        if generated and args.precision == "bf16":
            for m in wrapped.generators.modules():
                m.register_forward_hook(lambda module, a, output: seen.add(output.dtype)
                                        if isinstance(output, torch.Tensor) else None)
        return wrapped, allocate

    def check(step, row):
        model = built["model"]
        tensors = [*model.generators.parameters(), *model.generators.buffers()]
        assert tensors and all(t.dtype != torch.bfloat16 for t in tensors)
        assert all(p.dtype == torch.float32 for p in model.generators.parameters())
        assert {t.dtype for ts in generated_per_layer(model) for t in ts} == {torch.float32}
        checked.append(step)

    original = train_mod.build_adapter_model
    _, fp32 = run(tmp_path, tokenizer, "fp32", method=method, max_steps=6, build_adapter=build)
    _, bf16 = run(tmp_path, tokenizer, "bf16", on_step=check if generated else None, method=method, max_steps=6,
                  precision="bf16", build_adapter=build)
    if generated:
        assert checked == list(range(1, 7))
        assert seen == {torch.float32}   # the hypernetworks ran in fp32 under bf16 autocast
    for a, b in zip(fp32, bf16):
        assert b["task_loss"] == pytest.approx(a["task_loss"], abs=5e-3), (a["step"], a["task_loss"], b["task_loss"])
    assert any(a["task_loss"] != b["task_loss"] for a, b in zip(fp32, bf16))  # bf16 did run


def test_grad_accumulation_counts_optimizer_steps_in_the_budget_schedule(tmp_path, tokenizer):
    """4 micro-batches x 2 = one optimizer step: the budget follows the optimizer steps (12 rows, the schedule of
    12 steps), and the run equals one micro-batch of 8 per step."""
    summary, accum = run(tmp_path, tokenizer, "accum", batch_size=2, grad_accum=4)
    _, plain = run(tmp_path, tokenizer, "plain", batch_size=8, grad_accum=1)
    n, r = 12, 3  # adapted layers of the tiny BERT, init_r
    expected = [budget_at(s, r * n, 2 * n, 2, 3, 12) for s in range(1, 13)]
    assert [row["step"] for row in accum] == list(range(1, 13))
    assert [row["total_rank"] for row in accum] == expected
    assert summary["model"].allocator.last_step == 12
    for a, b in zip(accum, plain):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["total_rank"] == b["total_rank"]


def test_grad_accumulation_sensitivity_is_that_of_the_whole_step(tmp_path, tokenizer):
    """importance='sensitivity' reads the gradients of the generated tensors, which every micro-batch generates anew:
    the importance of a step is computed from their sum over its micro-batches (the whole step's gradient, as peft's
    AdaLoRA reads the accumulated p.grad), so 4 micro-batches of 2 rank the same as one batch of 8."""
    accum_summary, accum = run(tmp_path, tokenizer, "accum", batch_size=2, grad_accum=4, hyper={"importance": "sensitivity"})
    plain_summary, plain = run(tmp_path, tokenizer, "plain", batch_size=8, grad_accum=1, hyper={"importance": "sensitivity"})
    a, b = accum_summary["model"].allocator, plain_summary["model"].allocator
    assert a.ipt is not None and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.ipt, b.ipt, rtol=1e-4, atol=1e-9), (a.ipt - b.ipt).abs().max()
    assert torch.allclose(a.unc, b.unc, rtol=1e-4, atol=1e-9), (a.unc - b.unc).abs().max()
    for x, y in zip(accum, plain):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
