"""The contract every adapter method shares, tested for every method of the package (and, where the training code
runs them, peft's lora / dora / adalora): identity at step 0, mixed precision, generation cost, save / load, exact
resume, the trainable state, merging, moving the model, the optimizer groups, the RNG.

More of the same contract, parametrised over these lists where the test lives with its own subject:
test_generation_cost.py (hypernetwork calls per step, the evaluation cache), test_gradient_checkpointing.py,
test_precision_accum.py (bf16 through the training loop), test_train.py (same data and identity at step 1, the
eval loss), test_callback.py (HyperAdaLoraTrainer: exact resume, save_model).

Only the public API: `hyperadalora.get_peft_model` / `load_adapter`, the config classes (found through the method
registry), the wrapper's public methods, `hyperadalora.training.train`. Whether a method generates tensors comes from
the registry (`Method.generated`), never from the class of the model it builds. A new method registered in
`hyperadalora.methods` is tested here without any change to this file.
"""

import dataclasses
import functools
import inspect
import os

import pytest
import torch

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert, on
from conftest import train_steps as shared_train_steps
from hyperadalora import methods as M
from hyperadalora.training import TrainArgs, TrainingInterrupted, read_metrics, train

# ---------------------------------------------------------------------------------------------- the methods
PEFT = ["lora", "dora", "adalora"]               # peft's own, run by the same training code
OURS = list(dict.fromkeys(["hyperadalora", *sorted(M.METHODS)]))
EVERY = OURS + PEFT


def config_cls(method: str) -> type:
    if method in M.METHODS:
        return M.get_method(method).config_cls
    assert method == "hyperadalora", method
    return ha.HyperAdaLoraConfig


def is_generated(method: str) -> bool:
    """Whether ``method`` generates tensors with hypernetworks (from the registry; HyperAdaLoRA: P, lambda, Q)."""
    if method in M.METHODS:
        return bool(M.get_method(method).generated)
    return method == "hyperadalora"


GENERATED = [m for m in OURS if is_generated(m)]
assert {"hyperadalora", "hyperlora", "hyperdora", "hyperhydralora"} <= set(GENERATED)
assert "hydralora" in OURS and "hydralora" not in GENERATED


def fields(method: str) -> set:
    return {f.name for f in dataclasses.fields(config_cls(method))}


train_steps = functools.partial(shared_train_steps, eval_after=True)


def config(method: str, **kw):
    """A small config of ``method`` for the tiny BERT: rank 3 (``init_r`` where the config has a rank budget, then
    with a short schedule), the six BERT projections, SEQ_CLS (the head trained in full)."""
    names = fields(method)
    base = {"target_modules": BERT_TARGETS, "task_type": "SEQ_CLS"}
    if "init_r" in names:  # a rank budget schedule (HyperAdaLoRA)
        base.update(init_r=3, target_r=2, total_step=20, tinit=2, tfinal=4, deltaT=2)
    else:
        base["r"] = 3
    return config_cls(method)(**{**base, **kw})


def peft_config(method: str, **kw):
    from peft import AdaLoraConfig, LoraConfig

    common = {"target_modules": BERT_TARGETS, "task_type": "SEQ_CLS", **kw}
    if method == "adalora":
        return AdaLoraConfig(init_r=3, target_r=2, total_step=20, tinit=2, tfinal=4, deltaT=2, **common)
    return LoraConfig(r=3, use_dora=method == "dora", **common)


def any_config(method: str, **kw):
    return peft_config(method, **kw) if method in PEFT else config(method, **kw)


def single_head(method: str) -> dict:
    """Options that make ``method``'s update input-independent, so that it can merge (HydraLoRA: one head)."""
    return {"n_heads": 1} if "n_heads" in fields(method) else {}


def trained(method, batch, steps=4, device="cpu", base=None, **kw):
    """A model of ``method`` after ``steps`` steps (HyperAdaLoRA: 4 steps are past the first re-maskings, so some
    layers are pruned below init_r, e.g. 31 of 36 ranks kept)."""
    model = ha.get_peft_model((base if base is not None else make_bert()).to(device), config(method, **kw))
    train_steps(model, batch, steps)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def installed(layer) -> list:
    """The generated tensors an adapter layer holds now: the tensors with an autograd history (views of the
    hypernetworks' outputs) among its attributes, whatever they are called (parameters and buffers are leaves)."""
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for name, value in vars(layer).items():
        if name not in ("_modules", "_parameters", "_buffers"):
            walk(value)
    return found


def generated_per_layer(model) -> list[list]:
    """Per adapted layer, its generated tensors of the current training pass (each layer must have some)."""
    per_layer = [installed(layer) for layer in model.adapters]
    assert per_layer and all(per_layer), [len(t) for t in per_layer]
    return per_layer


# ---------------------------------------------------------------------------------------------- (1) identity
@pytest.mark.parametrize("method", EVERY)
@pytest.mark.device
def test_identity_at_step_0(bert, batch, method, device):
    """Before any training the adapted model gives the base model's outputs, bit for bit, in a training pass (with
    the graph into the hypernetworks) and in evaluation."""
    bert, batch = bert.to(device), on(device, batch)
    ref = logits(bert, batch)
    model = ha.get_peft_model(bert, any_config(method))
    model.train()
    assert torch.equal(model(**batch).logits, ref)
    model.eval()
    assert torch.equal(logits(model, batch), ref)


@pytest.mark.parametrize("method", OURS)
def test_the_base_is_frozen_and_the_adapter_is_not(batch, method):
    """Only the adapter (hypernetworks or the layers' own tensors) and the head train; the wrapped base model's
    weights are frozen, and one step changes them not at all."""
    model = ha.get_peft_model(make_bert(), config(method))
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()
                   if not p.requires_grad}
    assert any(".query." in n for n in base_before)  # the adapted layers' own weights are among them
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable) and not any(".bert.embeddings." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > sum(
        p.numel() for p in model.base_model.classifier.parameters())  # more than the head: the adapter
    train_steps(model, batch, 1)
    after = dict(model.base_model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())


# ---------------------------------------------------------------------------------------------- (2) precision
@pytest.mark.parametrize("method", GENERATED)
def test_bf16_autocast_keeps_the_hypernetworks_and_the_generated_tensors_fp32(batch, method):
    """Under bf16 autocast only the adapted layers run in bf16: every module of the hypernetworks computes in fp32,
    and the tensors they generate (and hand to every layer) are fp32."""
    model = ha.get_peft_model(make_bert(), config(method))
    seen = set()
    for m in model.generators.modules():
        m.register_forward_hook(lambda module, args, output: seen.update(
            t.dtype for t in (output if isinstance(output, (tuple, list)) else [output])
            if isinstance(t, torch.Tensor) and t.is_floating_point()))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16  # autocast was on for the model
    assert seen == {torch.float32}, seen
    assert {t.dtype for ts in generated_per_layer(model) for t in ts} == {torch.float32}
    out.loss.float().backward()
    grads = [p.grad for p in model.generators.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(t.dtype != torch.bfloat16 for t in [*model.generators.parameters(), *model.generators.buffers()])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # materialize itself, outside a forward
        outs = model.materialize(training_pass=True)
    assert outs and {t.dtype for ts in outs.values() for t in ts} == {torch.float32}


# ---------------------------------------------------------------------------------------------- (3) generation cost
@pytest.mark.parametrize("method", GENERATED)
def test_generation_kernels_do_not_grow_with_the_layers(method):
    """Generation with its installation into every layer, and its backward: the same aten operators for 12, 24
    and 48 adapted layers (only views are per layer)."""
    from test_generation_cost import assert_flat_generation_kernels

    assert_flat_generation_kernels(
        lambda layers: ha.get_peft_model(make_bert(num_layers=layers), config(method)),
        lambda model: sum(t.sum() for ts in generated_per_layer(model) for t in ts))


# ---------------------------------------------------------------------------------------------- (4) save / load
@pytest.mark.parametrize("method", OURS)
@pytest.mark.device
def test_save_load_round_trip(tmp_path, batch, method, device):
    """save_pretrained + load_adapter onto a fresh base model give the trained model's outputs; the loaded adapter
    is frozen (inference); saving it again and loading that gives them too."""
    batch = on(device, batch)
    model = trained(method, batch, device=device, lora_dropout=0.1)
    ref = logits(model, batch)
    model.save_pretrained(str(tmp_path / "a"))
    loaded = ha.load_adapter(make_bert().to(device), str(tmp_path / "a")).eval()
    assert (logits(loaded, batch) - ref).abs().max().item() < 1e-5
    assert not any(p.requires_grad for p in loaded.parameters())
    assert type(loaded.peft_config) is type(model.peft_config)
    assert loaded.rank_pattern == model.rank_pattern
    loaded.save_pretrained(str(tmp_path / "b"))
    again = ha.load_adapter(make_bert().to(device), str(tmp_path / "b")).eval()
    assert (logits(again, batch) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", OURS)
def test_load_adapter_gives_a_model_ready_for_inference(tmp_path, batch, method):
    """load_adapter is for inference (as peft's from_pretrained): the model it returns is in evaluation mode, so an
    adapter trained with dropout gives its outputs, the same at every call, without a call to ``.eval()``."""
    model = trained(method, batch, lora_dropout=0.1)
    ref = logits(model, batch)
    model.save_pretrained(str(tmp_path / "a"))
    loaded = ha.load_adapter(make_bert(), str(tmp_path / "a"))
    assert not any(m.training for m in loaded.modules())
    assert (logits(loaded, batch) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", GENERATED)
def test_drop_hypernetworks_keeps_the_outputs_and_saves_the_same_adapter(tmp_path, batch, method):
    """drop_hypernetworks freezes the current generated tensors into the layers: the same outputs without the
    hypernetworks, and save_pretrained / load_adapter of the dropped model give them too."""
    model = trained(method, batch, lora_dropout=0.1)
    ref = logits(model, batch)
    n_before = sum(p.numel() for p in model.parameters())
    model.drop_hypernetworks()
    assert "generators" not in dict(model.named_children())
    assert sum(p.numel() for p in model.parameters()) < n_before  # the hypernetworks are gone
    assert (logits(model, batch) - ref).abs().max().item() < 1e-6
    model.drop_hypernetworks()  # a second call changes nothing
    assert (logits(model, batch) - ref).abs().max().item() < 1e-6
    model.save_pretrained(str(tmp_path / "a"))
    loaded = ha.load_adapter(make_bert(), str(tmp_path / "a")).eval()
    assert (logits(loaded, batch) - ref).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def run(tokenizer, out, method, steps=8, on_step=None, **kw):
    """A tiny run of the training loop: 20 examples / batch 8 (3 batches per epoch, so 8 steps cross two epoch
    boundaries), adapter dropout 0.1 (the global RNG matters)."""
    from test_train import toy_examples

    options = dict(method=method, task="sst2", max_steps=steps, batch_size=8, lr=5e-3, max_length=16, seed=0,
                   output_dir=str(out), progress=False, lora_dropout=0.1, save_adapter=False)
    if method in ("hyperadalora", "adalora"):
        options.update(tinit=1, tfinal=2, deltaT=2)
    options.update(kw)
    return train(TrainArgs(**options), model=make_bert(vocab=tokenizer.vocab_size), tokenizer=tokenizer,
                 train_examples=toy_examples(20), eval_examples=toy_examples(8, seed=1), on_step=on_step)


@pytest.mark.parametrize("method", EVERY)
def test_the_adapter_the_training_loop_saves_reloads_with_its_outputs(tmp_path, tokenizer, method):
    """`train` writes OUTPUT_DIR/adapter; loaded onto a fresh base (this package's `load_adapter`, peft's
    `PeftModel.from_pretrained` for peft's methods) it gives the trained model's outputs."""
    summary = run(tokenizer, tmp_path / "run", method, steps=4, save_adapter=True, keep_checkpoints=0)
    model = summary["model"].eval()
    ids = {"input_ids": torch.randint(0, tokenizer.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0))}
    ref = logits(model, ids)
    base = make_bert(vocab=tokenizer.vocab_size, seed=5)  # other weights: only what was saved can make them equal
    with torch.no_grad():
        base.bert.load_state_dict(make_bert(vocab=tokenizer.vocab_size).bert.state_dict())
    if method in PEFT:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(base, summary["adapter"]).eval()
    else:
        loaded = ha.load_adapter(base, summary["adapter"]).eval()  # (not in eval mode by itself: see above)
    assert (logits(loaded, ids) - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- (5) exact resume
@pytest.mark.parametrize("method", EVERY)
def test_an_interrupted_run_resumes_with_bitwise_equal_losses(tmp_path, tokenizer, method):
    """SIGINT after step 5 of 12 (the step is finished and checkpointed), then a resumed run: every step's losses
    equal the uninterrupted run's bit for bit, and the whole training state (weights, optimizer, allocator, RNG) is
    the same file. Adapter dropout 0.1: the global RNG matters. (Moved here from test_checkpoint.py, which ran it
    for hyperadalora, adalora and lora.)"""
    import json

    from test_checkpoint import STEPS, run, signal_at, steps_of

    run_ = functools.partial(run, tokenizer, method=method, lora_dropout=0.1)
    reference = read_metrics(run_(tmp_path / "ref", save_every=4, keep_checkpoints=3)["metrics"])[0]
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:  # SIGINT after step 5: finish it, checkpoint, stop
        run_(out, on_step=signal_at(5), save_every=2)
    assert info.value.exit_code == 130 and info.value.step == 5
    assert "--resume" in str(info.value) and info.value.checkpoint.endswith("step-0000005")
    assert steps_of(out) == [4, 5]  # saved at 2 and 4, then at the signal; the newest 2 kept
    assert len(read_metrics(out / "metrics.jsonl")[0]) == 5
    summary = run_(out, resume=str(out), save_every=2, keep_checkpoints=4)
    assert summary["resumed_from"].endswith("step-0000005")
    rows, evals = read_metrics(summary["metrics"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "task_loss", "lr", "total_rank", "epoch"):
        assert [r[key] for r in rows] == [r[key] for r in reference], key  # exact, not approx
    assert len(evals) == 1 and evals[0]["final"]
    assert steps_of(out) == [6, 8, 10, STEPS]
    for step in (8, STEPS):  # the whole training state (weights, EMAs, masks, RNG) is identical, not just the loss
        hashes = [json.loads((d / "checkpoints" / f"step-{step:07d}" / "manifest.json").read_text())["files"]
                  for d in (out, tmp_path / "ref")]
        for name in ("model.safetensors", "rng.safetensors"):
            assert hashes[0][name] == hashes[1][name], (step, name)


# ---------------------------------------------------------------------------------------------- (6) trainable state
@pytest.mark.parametrize("method", OURS)
def test_trainable_state_dict_round_trip(batch, method):
    """The trainable state of a trained model, loaded into a fresh one (other seed): the same outputs, the same
    state back, and, from there, the same training (the same losses, step by step, with fresh optimizers)."""
    model = trained(method, batch, steps=3)
    state = model.trainable_state_dict()
    assert state["tensors"]
    other = ha.get_peft_model(make_bert(), config(method, seed=7))
    other.load_trainable_state_dict(state)
    other.eval()
    assert torch.equal(logits(other, batch), logits(model, batch))
    back = other.trainable_state_dict()["tensors"]
    assert set(back) == set(state["tensors"])
    assert all(torch.equal(back[k], v) for k, v in state["tensors"].items())
    assert train_steps(other, batch, 3, start=4) == train_steps(model, batch, 3, start=4)


@pytest.mark.parametrize("method", OURS)
def test_trainable_state_dict_is_a_copy(batch, method):
    """The state is a snapshot: training on afterwards does not change it."""
    model = trained(method, batch, steps=2)
    state = model.trainable_state_dict()["tensors"]
    frozen = {k: v.clone() for k, v in state.items()}
    train_steps(model, batch, 2, start=3)
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    now = model.trainable_state_dict()["tensors"]
    assert any(not torch.equal(now[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("method", OURS)
def test_trainable_state_of_another_model_is_refused_and_changes_nothing(batch, method):
    """The trainable state of a 2-layer model loaded into a 1-layer one: a ValueError, and the model is left as it
    was (a misfit changes nothing, as in load_adapter)."""
    state = trained(method, batch, steps=1).trainable_state_dict()
    other = ha.get_peft_model(make_bert(num_layers=1), config(method))
    before = other.trainable_state_dict()["tensors"]
    with pytest.raises(ValueError):
        other.load_trainable_state_dict(state)
    after = other.trainable_state_dict()["tensors"]
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


# ---------------------------------------------------------------------------------------------- (7) merge
@pytest.mark.parametrize("method", OURS + PEFT)
@pytest.mark.device
def test_merge_and_unload_keeps_the_outputs(batch, method, device):
    """Where the update does not depend on the input (every method; HydraLoRA with one head), merging gives a plain
    transformers model with the adapted model's outputs."""
    batch = on(device, batch)
    if method in PEFT:
        model = ha.get_peft_model(make_bert().to(device), peft_config(method))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for step in range(1, 4):
            model(**batch).loss.backward()
            opt.step()
            if method == "adalora":
                model.base_model.update_and_allocate(step)
            opt.zero_grad()
        model.eval()
    else:
        model = trained(method, batch, device=device, **single_head(method))
    ref = logits(model, batch)
    base = make_bert().to(device)
    assert (logits(base, batch) - ref).abs().max().item() > 1e-4  # the adapter moved
    merged = model.merge_and_unload()
    assert type(merged) is type(base)
    assert {n for n, _ in merged.named_modules()} == {n for n, _ in base.named_modules()}
    assert (logits(merged, batch) - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- (8) moving
@pytest.mark.parametrize("method", OURS)
def test_to_another_dtype_regenerates_and_keeps_training(batch, method):
    """``.to(float64)`` after training (outputs cached in evaluation): the next outputs are float64 and equal the
    float32 ones; back to float32, the same outputs as before; and training goes on."""
    model = trained(method, batch, steps=3)
    ref = logits(model, batch)
    model.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    out64 = logits(model, batch)
    assert out64.dtype == torch.float64
    assert (out64 - ref.double()).abs().max().item() < 1e-5
    model.to(torch.float32)
    assert (logits(model, batch) - ref).abs().max().item() < 1e-6
    losses = train_steps(model, batch, 2, start=4)
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("method", OURS)
@pytest.mark.device
def test_to_the_device_after_building(batch, method, device):
    """A model built on the CPU and moved with ``.to(device)`` trains there and gives the outputs of one built on
    the device."""
    batch = on(device, batch)
    moved = ha.get_peft_model(make_bert(), config(method)).to(device)
    built = ha.get_peft_model(make_bert().to(device), config(method))
    assert train_steps(moved, batch, 2) == pytest.approx(train_steps(built, batch, 2), abs=1e-5)
    assert (logits(moved, batch) - logits(built, batch)).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- more of the contract
@pytest.mark.parametrize("method", OURS)
def test_optimizer_groups_hold_every_trainable_parameter_once(method):
    model = ha.get_peft_model(make_bert(), config(method))
    groups = model.optimizer_param_groups(1e-3, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["params"] and g["lr"] > 0 and "weight_decay" in g for g in groups)
    torch.optim.AdamW(groups)  # a valid argument of an optimizer


@pytest.mark.parametrize("method", OURS)
def test_initialisation_depends_on_the_config_seed_only_and_leaves_the_rng_alone(batch, method):
    """The same config gives the same adapter whatever the caller's RNG; get_peft_model leaves the global RNG where
    it was; another config seed gives another adapter."""
    torch.manual_seed(1)
    a = ha.get_peft_model(make_bert(), config(method))
    base = make_bert()
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    b = ha.get_peft_model(base, config(method))
    assert torch.equal(torch.random.get_rng_state(), state)
    c = ha.get_peft_model(make_bert(), config(method, seed=3))
    sa, sb, sc = (m.trainable_state_dict()["tensors"] for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert train_steps(a, batch, 2) == train_steps(b, batch, 2)


@pytest.mark.parametrize("method", OURS)
def test_the_wrapper_looks_like_the_base_model(method):
    """What `transformers.Trainer` and user code read: the base model's forward signature (label names, dataset
    columns), its attributes (config, ...), the adapted layers' weight."""
    base = make_bert()
    model = ha.get_peft_model(base, config(method))
    assert list(inspect.signature(model.forward).parameters) == list(inspect.signature(base.forward).parameters)
    assert model.config is base.config and model.get_base_model() is base
    assert len(model.adapters) == 12
    assert all(layer.weight.shape == (layer.out_features, layer.in_features) for layer in model.adapters)
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total


@pytest.mark.parametrize("method", OURS)
def test_load_onto_a_base_model_of_other_shapes_fails_clearly(tmp_path, batch, method):
    trained(method, batch, steps=1).save_pretrained(str(tmp_path / "a"))
    other = make_bert(hidden=48)
    with pytest.raises(ValueError, match="another base model"):
        ha.load_adapter(other, str(tmp_path / "a"))
    assert all(type(m).__module__.startswith("transformers") or type(m).__module__.startswith("torch")
               for m in other.modules())  # left the base model it was
    assert all(p.requires_grad for p in other.parameters())


# ---------------------------------------------------------------------------------------------- old adapters
OLD_ADAPTERS = os.path.join(os.path.dirname(__file__), "data", "old_adapters")


@pytest.mark.parametrize("method", ["hyperadalora", "hyperlora", "hyperhydralora"])
def test_an_adapter_saved_before_the_one_adapter_model_loads_with_its_outputs(method):
    """Adapters written by the code of two model classes (358d364, `data/old_adapters/make_old_adapters.py`) load
    with today's `load_adapter` and give the logits recorded when they were saved (bit-equal on that machine)."""
    directory = os.path.join(OLD_ADAPTERS, method)
    torch.manual_seed(0)
    x = torch.randint(0, 100, (2, 7))
    loaded = ha.load_adapter(make_bert(), directory)
    assert not loaded.training and loaded.method_name == method
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    ref = torch.load(os.path.join(directory, "logits.pt"), weights_only=True)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (got - ref).abs().max()
