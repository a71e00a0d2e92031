"""The methods of `hyperadalora.methods` (hyperlora, hyperdora, hydralora, hyperhydralora): one contract for all
(identity at step 0, training, save/load, merge, checkpoints), plus what each method must get right."""

import dataclasses
import functools
import json

import pytest
import torch

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert, make_llama, on
from conftest import train_steps as shared_train_steps
from hyperadalora import cli
from hyperadalora import methods as M
from hyperadalora.training import TrainArgs, args_from_dict

ALL = ["hyperlora", "hyperdora", "hydralora", "hyperhydralora"]
GENERATED = ["hyperlora", "hyperdora", "hyperhydralora"]
HYDRA = ["hydralora", "hyperhydralora"]

train_steps = functools.partial(shared_train_steps, loss="task_loss", eval_after=True)


def cfg(method, **kw):
    return M.get_method(method).config_cls(**{"target_modules": BERT_TARGETS, "task_type": "SEQ_CLS", **kw})


def trained(method, batch, steps=6, device="cpu", **kw):
    model = ha.get_peft_model(make_bert().to(device), cfg(method, **kw))
    train_steps(model, batch, steps)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


# ---------------------------------------------------------------------------------------------- the contract
# identity at step 0 with each method's defaults: test_every_method.py (every method); here other options
@pytest.mark.parametrize("method, options", [
    ("hyperlora", {"hypernet": "mlp", "generation": "static"}),
    ("hyperlora", {"tokens": "element", "element_chunk": 64}),
    ("hyperdora", {"context": "none", "init": "normal"}), ("hyperhydralora", {"n_heads": 1, "hypernet": "cnn"}),
    ("hydralora", {"n_heads": 5, "lora_dropout": 0.1}), ("hyperlora", {"init": "principal"}),
    ("hyperdora", {"context": "feature"}), ("hyperhydralora", {"identity": "offset", "generation": "static"})])
@pytest.mark.device
def test_identity_at_step_0(bert, batch, method, options, device):
    bert, batch = bert.to(device), on(device, batch)
    ref = logits(bert, batch)
    model = ha.get_peft_model(bert, cfg(method, **options))
    model.train()  # the training pass (with its graph) must be the identity too
    assert (model(**batch).logits - ref).abs().max().item() == 0.0
    model.eval()
    assert (logits(model, batch) - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("method", ALL)
@pytest.mark.device
def test_training_moves_the_adapter_and_lowers_the_loss(batch, method, device):
    batch = on(device, batch)
    # lr 1e-2 for every method; the hypernetworks and their row embeddings at 1x of it (the default 30x for the row
    # embeddings is tuned for lr ~3e-3: at 0.3 the tiny model overshoots within these 10 steps)
    same_lr = {"hypernet_lr_ratio": 1.0, "feature_lr_ratio": 1.0}
    model = ha.get_peft_model(make_bert().to(device), cfg(method, **(same_lr if method in GENERATED else {})))
    losses = train_steps(model, batch, 10)
    assert losses[-1] < losses[0] - 0.05, losses
    for layer in model.adapters:
        assert all(b.abs().max() > 0 for b in layer.tensors("B"))  # B left zero: the adapter moved


@pytest.mark.parametrize("method", ALL)
@pytest.mark.device
def test_save_load_reproduces_outputs(tmp_path, batch, method, device):
    batch = on(device, batch)
    model = trained(method, batch, device=device)
    ref = logits(model, batch)
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / M.METHOD_CONFIG_NAME).read_text())["method"] == method
    loaded = ha.load_adapter(make_bert().to(device), tmp_path / "a")  # the package's loader dispatches on the saved method
    assert isinstance(loaded, ha.AdapterModel) and loaded.generated == ()
    assert (logits(loaded, batch) - ref).abs().max().item() < 1e-5
    assert not any(p.requires_grad for p in loaded.parameters())
    assert type(loaded.peft_config) is type(model.peft_config) and loaded.peft_config.r == model.peft_config.r


@pytest.mark.parametrize("method", HYDRA)
def test_router_weighted_hydra_refuses_to_merge(batch, method):
    model = trained(method, batch, steps=2)
    ref = logits(model, batch)
    with pytest.raises(ValueError, match="n_heads=3 cannot be merged.*router.*depends on each input"):
        model.merge_and_unload()
    assert (logits(model, batch) - ref).abs().max().item() == 0.0  # left unchanged


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method", GENERATED)
def test_one_shared_hypernetwork_per_generated_role(method):
    model = ha.get_peft_model(make_bert(), cfg(method, context="feature"))
    assert set(model.generators) == {"A", "B"} == set(model.generated)
    assert sum(isinstance(m, ha.Hypernetwork) for m in model.modules()) == 2
    names = [n for n, _ in model.named_parameters()]
    assert not any(".lora_A" in n or ".lora_B" in n for n in names)  # A and B are generated, not parameters
    # with context='feature' (one table per matrix length), only the layer embeddings grow with depth;
    # the default 'layer_feature' also adds one embedding per row of every added layer (tests/test_model.py)
    bigger = ha.get_peft_model(make_bert(num_layers=3), cfg(method, context="feature"))
    grow = sum(g.hypernet.module_embedding.weight.numel() for g in bigger.generators.values()) - \
        sum(g.hypernet.module_embedding.weight.numel() for g in model.generators.values())
    assert sum(p.numel() for p in bigger.hypernetwork_parameters()) - \
        sum(p.numel() for p in model.hypernetwork_parameters()) == grow  # only the layer embeddings grow


def test_hypernetwork_options_are_hyperadaloras():
    """Every hypernetwork option of HyperAdaLoraConfig (and any added later) is a field of the generated methods'
    configs, with its default (but where `METHOD_DEFAULTS` says otherwise: init), and is validated the same way."""
    hyper = {f.name: f.default for f in dataclasses.fields(ha.HyperAdaLoraConfig)
             if f.name not in M.base.ADALORA_ONLY_FIELDS + M.base.ADAPTER_FIELDS}
    assert M.base.METHOD_DEFAULTS == {"init": "orthonormal"} and hyper["init"] == "principal"
    hyper.update(M.base.METHOD_DEFAULTS)
    for method in GENERATED:
        fields = {f.name: f.default for f in dataclasses.fields(M.get_method(method).config_cls)}
        assert hyper.items() <= fields.items()
        assert not set(M.base.ADALORA_ONLY_FIELDS) & set(fields)
    with pytest.raises(ValueError, match="HyperLoraConfig: hypernet='rnn'"):
        M.HyperLoraConfig(hypernet="rnn")
    with pytest.raises(ValueError, match="basis='unit' applies to HyperAdaLoRA's P and Q only"):
        M.HyperLoraConfig(basis="unit")   # the generated methods have no P, Q: it would be ignored
    c = M.HyperLoraConfig(momentum=1, output_scale=2)
    assert c.momentum == 1.0 and isinstance(c.output_scale, float)
    assert c.hypernet_config().momentum == 1.0


@pytest.mark.parametrize("method", GENERATED)
def test_recurrent_state_commits_once_per_step_and_static_does_not(batch, method):
    rec = ha.get_peft_model(make_bert(), cfg(method, generation="recurrent"))
    sta = ha.get_peft_model(make_bert(), cfg(method, generation="static"))
    s_rec = rec.generators["A"].states()[0].clone()
    s_sta = sta.generators["A"].states()[0].clone()
    train_steps(rec, batch, 3)  # A's hypernetwork gets no gradient at step 1 (B = 0), so its state moves at step 3
    train_steps(sta, batch, 3)
    assert not torch.equal(rec.generators["A"].states()[0], s_rec)
    assert torch.equal(sta.generators["A"].states()[0], s_sta)
    state = rec.generators["B"].states()[0].clone()
    rec.train()
    rec(**batch)  # no optimizer step since the last commit: nothing to commit
    rec(**batch)
    assert torch.equal(rec.generators["B"].states()[0], state)


def test_generated_B_is_zero_at_start_but_not_degenerate(batch):
    """B = G - G_0: zero at step 0, yet its rows come from distinct seed tokens, so after training they differ
    (from an all-zero seed every row of B would be the same generated row)."""
    model = ha.get_peft_model(make_bert(), cfg("hyperlora"))
    model.eval()
    model.materialize()
    assert all(torch.count_nonzero(layer.tensors("B")[0]) == 0 for layer in model.adapters)
    train_steps(model, batch, 4)
    model.materialize()
    B = model.adapters[0].tensors("B")[0]
    assert torch.linalg.matrix_rank(B).item() == B.shape[1]


def test_principal_init_seeds_A_with_the_top_right_singular_vectors(batch):
    model = ha.get_peft_model(make_bert(), cfg("hyperhydralora", init="principal", r=2))
    model.eval()
    model.materialize()
    for layer in model.adapters[:3]:
        _, _, vh = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False)
        assert torch.allclose(layer.tensors("A")[0].abs(), vh[:2].abs(), atol=1e-5)
        assert all(torch.count_nonzero(B) == 0 for B in layer.tensors("B"))


# ---------------------------------------------------------------------------------------------- LoRA, DoRA vs peft
@pytest.mark.parametrize("method", ["hyperlora", "hyperdora"])
def test_same_outputs_as_peft_with_the_same_tensors(batch, method):
    """The generated A, B (and DoRA's magnitude) put into peft's LoRA / DoRA give the same outputs."""
    from peft import LoraConfig, get_peft_model

    model = trained(method, batch)
    ref = logits(model, batch)
    peft_model = get_peft_model(make_bert(), LoraConfig(r=3, lora_alpha=16, target_modules=BERT_TARGETS,
                                                        use_dora=method == "hyperdora", task_type="SEQ_CLS"))
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in zip(model.target_names, model.adapters):
            target = modules[name]
            target.lora_A["default"].weight.copy_(layer.tensors("A")[0])
            target.lora_B["default"].weight.copy_(layer.tensors("B")[0])
            if method == "hyperdora":
                target.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
        head = model.base_model.classifier
        peft_model.base_model.model.classifier.modules_to_save["default"].load_state_dict(head.state_dict())
    peft_model.eval()
    assert (logits(peft_model, batch) - ref).abs().max().item() < 1e-5


def test_dora_magnitude_is_trained_and_starts_at_the_weight_norms(batch):
    model = ha.get_peft_model(make_bert(), cfg("hyperdora"))
    layer = model.adapters[0]
    assert torch.allclose(layer.magnitude, layer.base_layer.weight.norm(dim=1))
    groups = {g["name"]: g["params"] for g in model.optimizer_param_groups(1e-3)}
    assert any(p is layer.magnitude for p in groups["adapters"])
    before = layer.magnitude.detach().clone()
    train_steps(model, batch, 2)
    assert not torch.equal(layer.magnitude, before)


# ---------------------------------------------------------------------------------------------- HydraLoRA
@pytest.mark.parametrize("method", HYDRA)
def test_routing_weights_sum_to_one_and_the_output_is_the_weighted_sum_of_heads(batch, method):
    model = trained(method, batch, steps=3, n_heads=4)
    layer = model.adapters[1]
    seen = {}
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    logits(model, batch)
    handle.remove()
    x = seen["x"]
    w = layer.routing_weights(x)
    assert w.shape == (*x.shape[:-1], 4)
    assert torch.allclose(w.sum(-1), torch.ones(x.shape[:-1]), atol=1e-6)
    assert (w >= 0).all() and w.flatten(0, -2).std(0).max() > 1e-4  # token-wise: not the same for every token
    (A,), Bs = layer.tensors("A"), layer.tensors("B")
    expected = layer.base_layer(x) + layer.scaling * sum(w[..., k:k + 1] * (x @ A.t() @ B.t())
                                                         for k, B in enumerate(Bs))
    assert torch.allclose(seen["y"], expected, atol=1e-5)


@pytest.mark.parametrize("method", HYDRA)
def test_shared_A_is_one_tensor_per_layer(method):
    n_heads, r = 3, 2
    model = ha.get_peft_model(make_bert(), cfg(method, r=r, n_heads=n_heads))
    model.eval()
    model.materialize()
    for layer in model.adapters:
        (A,) = layer.tensors("A")
        assert A.shape == (r, layer.in_features)
        assert [tuple(B.shape) for B in layer.tensors("B")] == [(layer.out_features, r)] * n_heads
        assert layer.router.weight.shape == (n_heads, layer.in_features)
    if method == "hydralora":
        for layer in model.adapters:
            params = dict(layer.named_parameters())
            assert sorted(k for k in params if not k.startswith("base_layer")) == \
                ["lora_A.0"] + [f"lora_B.{k}" for k in range(n_heads)] + ["router.weight"]
        n_adapter = sum(p.numel() for p in model.adapter_parameters())
        assert n_adapter == sum(r * a.in_features + n_heads * a.out_features * r + n_heads * a.in_features
                                for a in model.adapters)
    else:  # one A per layer, n_heads B per layer from the two generators
        n = model.n_layers
        assert sum(g.shape[0] for g in model.generators["A"].states()) == n
        assert sum(g.shape[0] for g in model.generators["B"].states()) == n * n_heads
        assert [(i, k) for i, k in model.slots["A"]] == [(i, 0) for i in range(n)]


def test_hydra_heads_diverge_and_router_learns(batch):
    model = trained("hydralora", batch, steps=5)
    router0 = ha.get_peft_model(make_bert(), cfg("hydralora")).adapters[0].router.weight
    layer = model.adapters[0]
    B = layer.tensors("B")
    assert not torch.allclose(B[0], B[1]) and not torch.allclose(B[1], B[2])
    assert not torch.equal(layer.router.weight, router0)


# ---------------------------------------------------------------------------------------------- configs, CLI
@pytest.mark.parametrize("method, kwargs, message", [
    ("hyperlora", {"r": 0}, "r=0 must be >= 1"),
    ("hydralora", {"n_heads": 0}, "n_heads=0 must be >= 1"),
    ("hyperhydralora", {"n_heads": 2.0}, "n_heads must be an integer"),
    ("hyperdora", {"lora_dropout": 1.0}, "lora_dropout=1.0"),
    ("hyperdora", {"generation": "fixed"}, "generation='fixed'"),
    ("hydralora", {"task_type": "NOPE"}, "task_type='NOPE'"),
    ("hyperlora", {"r": -2}, r"r=-2 must be >= 1 .*set r to a positive rank"),
    ("hydralora", {"n_heads": -1}, "n_heads=-1 must be >= 1"),
    *[(m, {"lora_alpha": 0}, r"lora_alpha=0.0 must be > 0.*Use a positive value") for m in ALL],
    ("hyperdora", {"lora_alpha": -4}, r"lora_alpha=-4.0 must be > 0.*flips its sign"),
    *[(m, {"lora_dropout": 1.5}, r"lora_dropout=1.5 must be in \[0, 1\).*0: no dropout") for m in ALL],
    ("hyperlora", {"hypernet_dim": 0}, r"HyperLoraConfig: hypernet_dim=0 must be >= 1"),
])
def test_config_validation_says_what_to_change(method, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cfg(method, **kwargs)


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match=r"\['importance'\] do not apply to method 'hyperlora'"):
        M.config_from_options("hyperlora", hyper={"importance": "sensitivity"})
    with pytest.raises(ValueError, match="it has no hypernetworks"):
        M.config_from_options("hydralora", hyper={"momentum": 0.9})
    c = M.config_from_options("hyperlora", r=4, n_heads=5, hyper={"momentum": 0.9})
    assert c.r == 4 and c.momentum == 0.9 and not hasattr(c, "n_heads")


@pytest.mark.parametrize("method", ALL)
def test_config_round_trip(tmp_path, method):
    c = cfg(method, r=5, lora_alpha=7, seed=3, **({"n_heads": 2} if method in HYDRA else {}),
            **({"hypernet": "mlp", "momentum": 0.7} if method in GENERATED else {}))
    c.save_pretrained(tmp_path)
    back = M.MethodConfig.from_pretrained(tmp_path)
    assert type(back) is type(c) and back == c


# ---------------------------------------------------------------------------------------------- misuse, refused clearly
def _is_untouched_base(model):
    return (not any(isinstance(m, (M.AdapterLayer, ha.SVDLinear)) for m in model.modules())
            and all(p.requires_grad for p in model.parameters()))


@pytest.mark.parametrize("method", GENERATED)
def test_principal_init_refuses_a_layer_narrower_than_r_naming_it(method):
    # BERT's head is Linear(32, 2): r=3 used to crash at the first forward ("mat1 and mat2 shapes cannot be
    # multiplied"): the principal seeds have only min(in, out) = 2 singular vectors
    base = make_bert()
    with pytest.raises(ValueError) as info:
        ha.get_peft_model(base, cfg(method, r=3, init="principal", target_modules=["query", "classifier"]))
    message = str(info.value)
    for part in ("'classifier'", "in_features=32", "out_features=2", "r=3", "init='principal'", "Lower r to <= 2",
                 "init='orthonormal'"):
        assert part in message, (part, message)
    assert _is_untouched_base(base)
    ha.get_peft_model(base, cfg(method, r=2, init="principal", target_modules=["query", "classifier"]))


@pytest.mark.parametrize("method", ALL)
def test_a_rank_above_a_layers_width_trains_where_nothing_needs_it_below(batch, method):
    # a rank above min(in, out) is a valid (if wasteful) LoRA: only the principal seeds refuse it
    options = {"init": "orthonormal"} if method in GENERATED else {}
    model = ha.get_peft_model(make_bert(), cfg(method, r=3, target_modules=["query", "classifier"], **options))
    train_steps(model, batch, 2)
    assert torch.isfinite(logits(model, batch)).all()


@pytest.mark.parametrize("method", ["hyperlora", "hydralora"])
def test_load_onto_a_model_with_fewer_layers_names_the_missing_modules(tmp_path, method):
    ha.get_peft_model(make_bert(num_layers=2), cfg(method)).save_pretrained(tmp_path / "a")
    small = make_bert(num_layers=1)
    with pytest.raises(ValueError) as info:  # used to load layer 0's adapters and drop layer 1's silently
        ha.load_adapter(small, tmp_path / "a")
    message = str(info.value)
    assert "6 of its 12 adapted layers have no matching nn.Linear" in message
    assert "bert.encoder.layer.1.output.dense" in message and "bert.encoder.layer.0." not in message
    assert _is_untouched_base(small)


@pytest.mark.parametrize("second", ["get_peft_model", "load_adapter"])
def test_a_model_that_already_carries_adapters_is_refused(tmp_path, second):
    base_model = make_bert()
    ha.get_peft_model(base_model, cfg("hyperlora")).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError) as info:
        if second == "get_peft_model":
            ha.get_peft_model(base_model, cfg("hydralora"))
        else:
            ha.load_adapter(base_model, tmp_path / "a")
    message = str(info.value)
    assert message.startswith(f"{second}: the model already carries adapters (")
    assert "LoraLayer" in message and "Pass an unmodified base model (load it again" in message


def test_load_failure_leaves_the_model_unchanged(tmp_path):
    ha.get_peft_model(make_bert(), cfg("hyperdora")).save_pretrained(tmp_path / "a")
    other = make_bert(hidden=48)
    with pytest.raises(ValueError, match="another base model"):
        ha.load_adapter(other, tmp_path / "a")
    assert _is_untouched_base(other)


@pytest.mark.parametrize("allocate", [False, True])
def test_fused_optimizer_steps_commit_the_recurrent_state(batch, allocate):
    # torch.optim.AdamW(fused=True) (transformers' default optim) does not bump the parameters' version counters:
    # the recurrent state used never to commit
    model = ha.get_peft_model(make_bert(), cfg("hyperlora", generation="recurrent", identity="zero_output"))
    states0 = [s.clone() for s in model.generators["A"].states()]
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2), fused=True)
    model.train()
    for step in range(1, 4):
        model(**batch).loss.backward()
        opt.step()
        if allocate:
            model.after_optimizer_step(step)
        opt.zero_grad()
    model(**batch)
    assert any(not torch.equal(a, b) for a, b in zip(states0, model.generators["A"].states()))


def test_causal_lm_hyperhydralora_generates():
    base = make_llama()
    x = torch.randint(0, 100, (2, 8))
    ref = base(input_ids=x).logits
    model = ha.get_peft_model(base, M.HyperHydraLoraConfig(r=2, n_heads=2, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM"))
    model.train()
    assert (model(input_ids=x, labels=x).logits - ref).abs().max().item() == 0.0
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    for step in range(1, 4):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        model.after_optimizer_step(step)
        opt.zero_grad()
    model.eval()
    assert model.generate(input_ids=x[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_cli_train_every_new_method(tmp_path, tokenizer, capsys):
    from test_train import write_sst2, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", tokenizer)
    data_dir = write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
    assert args_from_dict({"method": "hydralora", "n_heads": 2}).n_heads == 2
    for method in ["dora", *ALL]:
        out = tmp_path / method
        code = cli.main(["train", "--method", method, "--task", "sst2", "--model", model_dir, "--data-dir", data_dir,
                         "--max-steps", "3", "--batch-size", "8", "--max-length", "16",
                         *(["--n-heads", "2"] if method in HYDRA else []),  # refused for the other methods
                         "--output-dir", str(out), "--no-progress"])
        assert code == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == method and "accuracy" in summary["final_eval"]
        if method != "dora":
            loaded = ha.load_adapter(make_bert(vocab=tokenizer.vocab_size), str(out / "adapter"))
            assert loaded.peft_config.method == method
            if method in HYDRA:
                assert loaded.adapters[0].n_heads == 2


def test_train_args_reject_unknown_method():
    with pytest.raises(ValueError, match="method='qlora'"):
        TrainArgs(method="qlora")
