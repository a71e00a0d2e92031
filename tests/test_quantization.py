"""Quantized bases (bitsandbytes 4-bit nf4 / fp4 and 8-bit) for every method: the adapter is zero at step 0, every
method trains, the seeds and DoRA's magnitude come from the dequantized weight, save/load round-trips onto a fresh
quantized base, merge_and_unload refuses (or, with dequantize=True, merges into dense layers); the training loop's
flags. Tiny BERTs quantized with bitsandbytes' own layers (hidden 64: bitsandbytes' 4-bit blocks are 64 wide);
MiniLM loaded with a BitsAndBytesConfig in the slow tests."""

import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

import hyperadalora as ha  # noqa: E402
from conftest import BERT_TARGETS, make_bert, quantize_linears  # noqa: E402
from hyperadalora import quantization as Q  # noqa: E402
from hyperadalora import (HydraLoraConfig, HyperDoraConfig, HyperHydraLoraConfig, HyperLoraConfig,  # noqa: E402
                          get_peft_model, load_adapter)

METHODS = ["hyperadalora", "hyperlora", "hyperdora", "hydralora", "hyperhydralora"]
QUANT = {"nf4": dict(bits=4, quant_type="nf4"), "fp4": dict(bits=4, quant_type="fp4"), "int8": dict(bits=8)}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
        yield


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (n, 12), generator=g), "labels": torch.tensor([0, 1] * (n // 2))}


def quantized_bert(quant, seed=0):
    return quantize_linears(make_bert(hidden=64, seed=seed), **QUANT[quant])


def config(method, init="orthonormal"):
    if method == "hyperadalora":
        return ha.HyperAdaLoraConfig(init_r=4, target_r=2, total_step=20, tinit=1, tfinal=1, deltaT=1, init=init,
                                     task_type="SEQ_CLS", target_modules=BERT_TARGETS, hypernet_dim=16)
    cls = {"hyperlora": HyperLoraConfig, "hyperdora": HyperDoraConfig, "hydralora": HydraLoraConfig,
           "hyperhydralora": HyperHydraLoraConfig}[method]
    extra = {} if method == "hydralora" else {"init": init, "hypernet_dim": 16}
    return cls(r=4, task_type="SEQ_CLS", target_modules=BERT_TARGETS, **extra)


def logits(model, b):
    model.eval()
    with torch.no_grad():
        return model(**b).logits


def disabled_logits(wrapped, b):
    for layer in wrapped.adapters:
        layer.disabled = True
    try:
        return logits(wrapped, b)
    finally:
        for layer in wrapped.adapters:
            layer.disabled = False


def train_steps(wrapped, n=4, lr=1e-2):
    wrapped.train()
    opt = torch.optim.AdamW(wrapped.optimizer_param_groups(lr), lr=lr)
    losses = []
    for step in range(1, n + 1):
        out = wrapped(**batch())
        out.loss.backward()
        opt.step()
        wrapped.update_and_allocate(step)
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_a_quantized_base(method, quant, tmp_path):
    base = quantized_bert(quant)
    kinds = {Q.quantization_kind(m) for m in base.modules()} - {None}
    assert kinds == {"4bit" if QUANT[quant]["bits"] == 4 else "8bit"}
    wrapped = get_peft_model(base, config(method))
    b = batch(seed=2)
    # step 0: the adapter adds exactly nothing to the quantized layers' outputs
    assert torch.equal(logits(wrapped, b), disabled_logits(wrapped, b))
    losses = train_steps(wrapped)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.02, losses
    trained = logits(wrapped, b)
    assert not torch.allclose(trained, disabled_logits(wrapped, b))
    # the base layers stayed quantized and frozen
    assert all(Q.quantization_kind(a.base_layer) is not None for a in wrapped.adapters)
    assert not any(p.requires_grad for a in wrapped.adapters for p in a.base_layer.parameters())

    # save / load onto a fresh quantized base: the same outputs
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_adapter(quantized_bert(quant), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded, b), trained, rtol=0, atol=1e-5)

    # merging: refused by default, with the way out in the message
    with pytest.raises(ValueError, match=r"quantized \((4bit|8bit)\) base.*merge_and_unload\(dequantize=True\)"):
        wrapped.merge_and_unload()
    assert all(Q.quantization_kind(a.base_layer) is not None for a in wrapped.adapters)  # unchanged
    if method in ("hydralora", "hyperhydralora"):  # 3 router-weighted heads: no single weight (refused either way)
        with pytest.raises(ValueError, match="router"):
            wrapped.merge_and_unload(dequantize=True)
        return
    merged = wrapped.merge_and_unload(dequantize=True)
    for name in wrapped.target_names:
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
    # 4-bit: the layers computed with the dequantized weight already (same numbers); 8-bit: bitsandbytes also rounds
    # the activations to int8, which the dense layers do not
    tol = 1e-4 if QUANT[quant]["bits"] == 4 else 0.05
    torch.testing.assert_close(logits(merged, b), trained, rtol=0, atol=tol)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dequantized_weight_is_the_real_matrix(quant):
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    q = quantize_linears(nn.Sequential(dense), **QUANT[quant], skip=())[0]
    assert q.weight.shape != dense.weight.shape or q.weight.dtype != torch.float32  # packed / int8
    w = Q.dequantized_weight(q)
    assert w.shape == (64, 128) and w.dtype == torch.float32
    rel = (w - dense.weight).norm() / dense.weight.norm()
    assert rel < (0.12 if quant == "nf4" else 0.01), rel
    x = torch.randn(5, 128)
    expected = x @ w.t() + dense.bias
    tol = 1e-4 if quant == "nf4" else 0.05
    torch.testing.assert_close(q(x).detach(), expected, rtol=0, atol=tol)  # what the layer computes with


def test_principal_seeds_and_dora_magnitude_come_from_the_dequantized_weight():
    from hyperadalora.tuner_utils import principal_subspaces

    base = quantized_bert("nf4")
    wrapped = get_peft_model(base, config("hyperadalora", init="principal"))
    ps, qs = principal_subspaces(wrapped.adapters, 4)
    for layer, p, q in zip(wrapped.adapters, ps, qs):
        u, _, vh = torch.linalg.svd(Q.dequantized_weight(layer.base_layer), full_matrices=False)
        assert p.shape == (layer.out_features, 4) and q.shape == (layer.in_features, 4)
        torch.testing.assert_close(p.abs(), u[:, :4].abs(), rtol=0, atol=1e-4)
        torch.testing.assert_close(q.abs(), vh[:4].t().abs(), rtol=0, atol=1e-4)

    dora = get_peft_model(quantized_bert("nf4"), config("hyperdora"))
    for layer in dora.adapters:
        norms = Q.dequantized_weight(layer.base_layer).norm(dim=1)
        torch.testing.assert_close(layer.magnitude.detach(), norms)


def test_a_4bit_model_evaluated_before_wrapping_still_trains():
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel (AVX512-BF16 CPUs) at the first no_grad eval
    forward, and that kernel has no backward: the wrappers undo the repacking and keep it off."""
    base = quantized_bert("nf4")
    logits(base, batch())                       # may repack (on AVX512-BF16 CPUs)
    wrapped = get_peft_model(base, config("hyperlora"))
    for m in base.modules():
        if Q.quantization_kind(m) == "4bit":
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    logits(wrapped, batch())                    # an evaluation between training steps
    losses = train_steps(wrapped, n=3)
    assert losses[-1] < losses[0]


def test_merge_of_an_unquantized_base_is_unchanged_by_the_new_option():
    base = make_bert(hidden=64)
    wrapped = get_peft_model(base, config("hyperlora"))
    train_steps(wrapped, n=2)
    b = batch(seed=3)
    before = logits(wrapped, b)
    merged = wrapped.merge_and_unload()          # no dequantize needed: nothing is quantized
    torch.testing.assert_close(logits(merged, b), before, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the training loop
def test_train_args_quantization_options():
    from hyperadalora.training import TrainArgs

    assert TrainArgs(load_in_4bit=True).quant_type == "nf4"
    assert TrainArgs(load_in_4bit=True, quant_type="fp4").quant_type == "fp4"
    assert TrainArgs().quant_type is None
    with pytest.raises(ValueError, match="choose one"):
        TrainArgs(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="4-bit base only"):
        TrainArgs(load_in_8bit=True, quant_type="nf4")
    with pytest.raises(ValueError, match="nf4"):
        TrainArgs(load_in_4bit=True, quant_type="int4")
    with pytest.raises(ValueError, match="true or false"):
        TrainArgs(gradient_checkpointing="yes")


def test_cli_flags_reach_train_args():
    from hyperadalora.cli import build_parser, collect_options
    from hyperadalora.training import args_from_dict

    ns = build_parser().parse_args(["train", "--load-in-4bit", "--quant-type", "fp4", "--gradient-checkpointing"])
    args = args_from_dict(collect_options(ns))
    assert (args.load_in_4bit, args.load_in_8bit, args.quant_type, args.gradient_checkpointing) == (True, False, "fp4",
                                                                                                     True)
    args = args_from_dict(collect_options(build_parser().parse_args(["train", "--load-in-8bit"])))
    assert args.load_in_8bit and args.quant_type is None and not args.gradient_checkpointing


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_train_loop_on_a_quantized_model_records_the_flags(tmp_path, tokenizer):
    from test_train import toy_examples

    from hyperadalora.training import TrainArgs, train

    args = TrainArgs(method="hyperdora", max_steps=4, batch_size=8, lr=1e-2, max_length=16, load_in_8bit=True,
                     gradient_checkpointing=True, output_dir=str(tmp_path / "run"), progress=False)
    model = quantize_linears(make_bert(vocab=tokenizer.vocab_size, hidden=64), bits=8)
    summary = train(args, model=model, tokenizer=tokenizer, train_examples=toy_examples(32),
                    eval_examples=toy_examples(16, seed=1))
    assert summary["args"]["load_in_8bit"] and summary["args"]["gradient_checkpointing"]
    with open(tmp_path / "run" / "summary.json") as f:
        recorded = json.load(f)["args"]
    assert recorded["load_in_8bit"] is True and recorded["gradient_checkpointing"] is True
    assert recorded["quant_type"] is None

    with pytest.raises(ValueError, match="no bitsandbytes layer"):
        train(TrainArgs(method="hyperlora", max_steps=2, load_in_4bit=True, output_dir=str(tmp_path / "r2"),
                        progress=False),
              model=make_bert(vocab=tokenizer.vocab_size), tokenizer=tokenizer, train_examples=toy_examples(8),
              eval_examples=toy_examples(8))


# ---------------------------------------------------------------------------------------------- MiniLM (slow)
@pytest.mark.slow
@pytest.mark.parametrize("method", ["hyperadalora", "hyperdora"])
def test_minilm_in_4bit_trains(method):
    """The issue's reproduction: MiniLM loaded in 4-bit nf4 with transformers' BitsAndBytesConfig."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from hyperadalora.base_models import minilm_path

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["classifier", "pooler"]))
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a great movie", "a dull and boring film"] * 4, return_tensors="pt", padding=True)
    b = {**enc, "labels": torch.tensor([1, 0] * 4)}
    if method == "hyperadalora":
        cfg = ha.HyperAdaLoraConfig(init_r=4, target_r=2, total_step=10, task_type="SEQ_CLS")  # init='principal'
    else:
        cfg = HyperDoraConfig(r=4, task_type="SEQ_CLS")
    wrapped = get_peft_model(model, cfg)
    assert torch.equal(logits(wrapped, b), disabled_logits(wrapped, b))
    wrapped.train()
    opt = torch.optim.AdamW(wrapped.optimizer_param_groups(1e-3), lr=1e-3)
    for step in range(1, 4):
        out = wrapped(**b)
        out.loss.backward()
        opt.step()
        wrapped.update_and_allocate(step)
        opt.zero_grad()
        assert torch.isfinite(out.loss)


@pytest.mark.slow
def test_cli_trains_minilm_in_4bit_with_gradient_checkpointing(tmp_path, capsys):
    from hyperadalora.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--task", "sentiment", "--max-steps", "3", "--batch-size", "4", "--max-length", "32",
               "--max-eval-examples", "8", "--load-in-4bit", "--quant-type", "fp4", "--gradient-checkpointing",
               "--output-dir", str(out), "--no-progress"])
    assert rc == 0
    with open(out / "summary.json") as f:
        args = json.load(f)["args"]
    assert (args["load_in_4bit"], args["quant_type"], args["gradient_checkpointing"]) == (True, "fp4", True)


@pytest.mark.slow
def test_hyperadalora_trainer_on_minilm_in_4bit(tmp_path):
    """transformers' Trainer refuses "purely quantized models": the wrappers carry its mark of attached adapters."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, TrainingArguments

    from hyperadalora.base_models import minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["classifier", "pooler"]))
    assert model.is_quantized
    wrapped = get_peft_model(model, ha.HyperAdaLoraConfig(init_r=4, target_r=2, total_step=2, tinit=0, tfinal=0,
                                                          task_type="SEQ_CLS"))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(1000, 2000, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(i % 2)}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, learning_rate=1e-3, dataloader_num_workers=0,
                             gradient_checkpointing=True)
    result = ha.HyperAdaLoraTrainer(model=wrapped, args=args, train_dataset=Data()).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
