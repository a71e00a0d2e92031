"""The method's contract: identity at step 0, generation, sharing, allocation, penalty, save/load/export/merge."""

import copy
import functools
import math

import pytest
import torch

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert, make_llama, on
from conftest import train_steps as shared_train_steps

train_steps = functools.partial(shared_train_steps, loss="task_loss")


def cfg(**kw):
    base = dict(init_r=3, target_r=1, total_step=20, tinit=2, tfinal=4, deltaT=2, target_modules=BERT_TARGETS,
                task_type="SEQ_CLS")
    base.update(kw)
    return ha.HyperAdaLoraConfig(**base)


@pytest.mark.parametrize("options", [{}, {"hypernet": "mlp"}, {"hypernet": "cnn"}, {"attention": "full"},
                                     {"tokens": "element"}, {"generation": "static"}, {"context": "none"},
                                    {"context": "feature"}, {"context": "feature", "tokens": "element", "element_chunk": 7},
                                     {"init": "principal"}, {"generation": "static", "identity": "offset"},
                                     {"generation": "static", "identity": "offset", "tokens": "element", "context": "feature"},
                                     {"context": "layer_feature"},
                                     {"context": "layer_feature", "tokens": "element", "element_chunk": 7},
                                     {"context": "layer_feature", "center_increment": True},
                                     {"center_increment": True, "tokens": "element", "element_chunk": 7},
                                     {"context": "layer_feature", "feature_dim": 4},
                                     {"context": "feature", "feature_dim": 3, "tokens": "element", "element_chunk": 7},
                                     {"hypernet_ffn_mult": 0}, {"hypernet": "attention", "hypernet_ffn_mult": 0}])
@pytest.mark.device
def test_identity_at_step_0(bert, batch, options, device):
    bert, batch = bert.to(device), on(device, batch)
    ref = bert(input_ids=batch["input_ids"]).logits
    model = ha.get_peft_model(bert, cfg(**options))
    model.train()  # the training pass must be the identity too
    out = model(**batch)
    assert (out.logits - ref).abs().max().item() == 0.0
    model.eval()
    assert (model(input_ids=batch["input_ids"]).logits - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("hypernet", ["cnn", "attention"])
def test_ffn_mult_zero_has_no_feed_forward_block_and_trains(bert, batch, hypernet):
    with_ffn = ha.get_peft_model(copy.deepcopy(bert), cfg(hypernet=hypernet))
    model = ha.get_peft_model(bert, cfg(hypernet=hypernet, hypernet_ffn_mult=0))
    for role, gen in model.generators.items():
        body = gen.hypernet.body
        assert body.ffn is None and body.norm2 is None, role
        assert not any(".ffn." in n or ".norm2." in n for n, _ in gen.named_parameters()), role
    n_params = lambda m: sum(p.numel() for p in m.generators.parameters())  # noqa: E731
    assert n_params(model) < n_params(with_ffn)
    losses = train_steps(model, batch, 8)
    assert all(math.isfinite(x) for x in losses) and min(losses[1:]) < losses[0]


def test_generated_tensors_are_not_parameters_and_change(bert, batch):
    model = ha.get_peft_model(bert, cfg())
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith((".P", ".Q", ".lam")) for n in names)
    assert all(n.startswith("generators.") or ".classifier." in n or not p.requires_grad
               for n, p in model.named_parameters() for _ in [0] if p.requires_grad)
    model.eval()
    model.materialize(training_pass=False)
    before = [(a.P.clone(), a.lam.clone(), a.Q.clone()) for a in model.adapters]
    train_steps(model, batch, 2)
    model.eval()
    model.materialize(training_pass=False)
    after = [(a.P, a.lam, a.Q) for a in model.adapters]
    for (p0, l0, q0), (p1, l1, q1) in zip(before, after):
        assert not torch.equal(l0, l1)
        assert not torch.equal(p0, p1) and not torch.equal(q0, q1)


@pytest.mark.parametrize("layers", [1, 3])
def test_one_shared_hypernetwork_per_role(layers):
    for context in ("feature", "layer_feature"):
        model = ha.get_peft_model(make_bert(num_layers=layers), cfg(context=context))
        assert set(model.generators) == {"P", "lambda", "Q"}
        hypernets = [m for m in model.modules() if isinstance(m, ha.Hypernetwork)]
        assert len(hypernets) == 3
        assert model.n_layers == 6 * layers
        n_params = sum(p.numel() for p in model.hypernetwork_parameters())
        other = ha.get_peft_model(make_bert(num_layers=layers + 1), cfg(context=context))
        # context='feature': only the module embedding grows with the number of layers;
        # 'layer_feature': also one embedding per row of P and column of Q of the added layers, and (lambda_codes,
        # the default) one code per singular value of each
        grow = sum(g.hypernet.module_embedding.weight.numel() for g in other.generators.values()) - \
            sum(g.hypernet.module_embedding.weight.numel() for g in model.generators.values())
        if context == "layer_feature":
            added = other.adapters[-6:]
            c = model.peft_config
            assert c.lambda_codes
            grow += (sum(a.out_features + a.in_features for a in added) + len(added) * c.init_r) * (
                c.feature_dim or c.hypernet_dim)
        assert sum(p.numel() for p in other.hypernetwork_parameters()) - n_params == grow


def test_recurrent_state_commits_and_static_does_not(bert, batch):
    rec = ha.get_peft_model(make_bert(), cfg(generation="recurrent"))
    sta = ha.get_peft_model(make_bert(), cfg(generation="static"))
    s_rec = rec.generators["lambda"].states()[0].clone()
    s_sta = sta.generators["lambda"].states()[0].clone()
    train_steps(rec, batch, 2)
    train_steps(sta, batch, 2)
    assert not torch.equal(rec.generators["lambda"].states()[0], s_rec)
    assert torch.equal(sta.generators["lambda"].states()[0], s_sta)


def test_momentum_one_is_the_paper_recurrence(bert, batch):
    """momentum=1: the anchor stays 0, so the state after a step is exactly X + s * H(X; phi)."""
    model = ha.get_peft_model(bert, cfg(momentum=1.0, generation="recurrent"))
    train_steps(model, batch, 3)
    for g in model.generators.values():
        assert torch.count_nonzero(g.hypernet.anchor_weight) == 0
    damped = ha.get_peft_model(make_bert(), cfg(momentum=0.5, generation="recurrent"))
    train_steps(damped, batch, 3)
    assert torch.count_nonzero(damped.generators["P"].hypernet.anchor_weight) > 0


def test_context_breaks_layer_symmetry(bert, batch):
    """A shared H_lambda fed identical inputs gives identical outputs: without context all layers' lambda stay equal."""
    sym = ha.get_peft_model(make_bert(), cfg(context="none", generation="recurrent", total_step=50, tinit=40, tfinal=5))
    train_steps(sym, batch, 3)
    lam = sym.generators["lambda"].states()[0][..., 0]
    assert torch.allclose(lam, lam[:1].expand_as(lam))
    ctx = ha.get_peft_model(make_bert(), cfg(context="module", generation="recurrent", total_step=50, tinit=40, tfinal=5))
    train_steps(ctx, batch, 3)
    lam = ctx.generators["lambda"].states()[0][..., 0]
    assert not torch.allclose(lam, lam[:1].expand_as(lam))


def test_orthogonal_penalty():
    eye = torch.linalg.qr(torch.randn(2, 10, 3))[0]
    assert ha.HyperAdaLoraModel._gram_penalty([eye]).item() == pytest.approx(0.0, abs=1e-10)
    assert ha.HyperAdaLoraModel._gram_penalty([eye * 2]).item() > 1.0
    # at initialisation (orthonormal seeds, zero increment) the generated penalty is 0, up to the float16 rounding
    # of the stored identity offset (the penalty is quadratic in it: about 1e-8 here)
    model = ha.get_peft_model(make_bert(), cfg())
    assert model.orthogonal_penalty().item() == pytest.approx(0.0, abs=1e-7)
    exact = ha.get_peft_model(make_bert(), cfg(identity="zero_output"))
    assert exact.orthogonal_penalty().item() == pytest.approx(0.0, abs=1e-10)
    normal = ha.get_peft_model(make_bert(), cfg(init="normal"))
    assert normal.orthogonal_penalty().item() > 0.1


@pytest.mark.device
def test_loss_includes_penalty(bert, batch, device):
    bert, batch = bert.to(device), on(device, batch)
    model = ha.get_peft_model(bert, cfg(init="normal", orth_reg_weight=0.5))
    model.train()
    out = model(**batch)
    assert out.loss.item() == pytest.approx(model.last_task_loss.item() + 0.5 * model.last_orth_penalty.item(), rel=1e-5)
    assert model.last_orth_penalty.item() > 0


@pytest.mark.device
def test_rank_allocation_reaches_target_and_pruned_stays_pruned(bert, batch, device):
    bert, batch = bert.to(device), on(device, batch)
    c = cfg(total_step=20, tinit=2, tfinal=4, deltaT=2, target_r=1)
    model = ha.get_peft_model(bert, c)
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    pruned_seen = torch.zeros_like(model.allocator.mask)
    model.train()
    for step in range(1, 21):
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        mask = model.allocator.mask
        assert not (pruned_seen & mask).any(), "a pruned rank came back"
        pruned_seen |= ~mask
        assert model.total_rank == model.allocator.budget(step) or step % 2 == 1
        model.eval()
        model.materialize(training_pass=False)
        for layer, m in zip(model.adapters, mask):
            assert torch.all(layer.lam[~m] == 0)
        model.train()
    assert model.total_rank == c.target_r * model.n_layers
    assert sum(model.rank_pattern.values()) == c.target_r * model.n_layers


def test_sensitivity_importance(bert, batch):
    model = ha.get_peft_model(bert, cfg(importance="sensitivity"))
    train_steps(model, batch, 20)
    assert model.total_rank == model.n_layers
    assert model.allocator.ipt is not None and model.allocator.ipt.shape == (3, model.n_layers, 3)


def test_warns_when_update_and_allocate_is_never_called(bert, batch):
    model = ha.get_peft_model(bert, cfg())
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    model.train()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    with pytest.warns(UserWarning, match="update_and_allocate"):
        model(**batch)


def _trained(batch, device="cpu", **kw):
    model = ha.get_peft_model(make_bert().to(device), cfg(**kw))
    train_steps(model, batch, 20)
    model.eval()
    return model


@pytest.mark.parametrize("options", [{}, {"lambda_codes": False}])  # the default has lambda codes
@pytest.mark.device
def test_save_load_roundtrip(tmp_path, batch, options, device):
    batch = on(device, batch)
    model = _trained(batch, device, **options)
    x = batch["input_ids"]
    ref = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "a")
    loaded = ha.load_adapter(make_bert().to(device), tmp_path / "a")
    assert (loaded(input_ids=x).logits - ref).abs().max().item() < 1e-5
    assert loaded.rank_pattern == model.rank_pattern
    assert sum(loaded.rank_pattern.values()) == model.n_layers  # sliced to the kept ranks
    assert not hasattr(loaded, "generators") or loaded.fixed


def test_save_load_with_a_layer_at_rank_zero(tmp_path, batch):
    model = _trained(batch, target_r=1, total_step=20)
    model.allocator.mask[0] = False  # (target_r=0, pruning every layer, is refused by the config)
    model._mask_version += 1
    assert model.rank_pattern[model.target_names[0]] == 0 and model.total_rank > 0
    ref = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path / "a")
    loaded = ha.load_adapter(make_bert(), tmp_path / "a")
    assert loaded.rank_pattern == model.rank_pattern
    assert (loaded(input_ids=batch["input_ids"]).logits - ref).abs().max().item() < 1e-5


def test_export_lora_loads_in_vanilla_peft(tmp_path, batch):
    from peft import PeftModel

    model = _trained(batch)
    ref = model(input_ids=batch["input_ids"]).logits
    model.export_lora(tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(make_bert(), tmp_path / "lora").eval()
    assert (peft_model(input_ids=batch["input_ids"]).logits - ref).abs().max().item() < 1e-5


def test_causal_lm_and_element_tokens():
    base = make_llama()
    x = torch.randint(0, 100, (2, 10))
    ref = base(input_ids=x).logits
    model = ha.get_peft_model(base, ha.HyperAdaLoraConfig(
        init_r=2, target_r=1, total_step=10, tfinal=2, target_modules=["q_proj", "v_proj", "down_proj"],
        tokens="element", element_chunk=16, task_type="CAUSAL_LM"))
    model.train()
    out = model(input_ids=x, labels=x)
    assert (out.logits - ref).abs().max().item() == 0.0
    losses = []
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    for step in range(1, 11):
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(model.last_task_loss.item())
    assert losses[-1] < losses[0]
    assert model.total_rank == model.n_layers
    model.eval()
    gen = model.generate(input_ids=x[:, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 7)


def test_element_tokens_refused_above_limit():
    with pytest.raises(ValueError, match="max_element_tokens"):
        ha.get_peft_model(make_bert(), cfg(tokens="element", max_element_tokens=50))


def test_one_commit_per_optimizer_step(batch):
    """The anchor moves exactly once per step: anchor_t = (1 - m) * sum_k m^(t-1-k) W_k."""
    model = ha.get_peft_model(make_bert(), cfg(momentum=0.5, generation="recurrent"))
    opt = torch.optim.SGD(model.optimizer_param_groups(1e-2), lr=1e-2)
    model.train()
    expected = torch.zeros_like(model.generators["lambda"].hypernet.anchor_weight)
    for step in range(1, 4):
        used = model.generators["lambda"].hypernet.out_proj.weight.detach().clone()
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        expected = 0.5 * expected + 0.5 * used
        model(**batch)  # the next forward must not commit again
        assert torch.allclose(model.generators["lambda"].hypernet.anchor_weight, expected)


def test_layer_feature_context_is_one_embedding_per_row_of_every_layer(bert, batch):
    """context='layer_feature': every row of every layer's P (column of Q) has its own learned embedding, so two
    layers of the same shape get different increments from the same gradient; 'feature' shares one table."""
    shared = ha.get_peft_model(copy.deepcopy(bert), cfg(context="feature"))
    own = ha.get_peft_model(copy.deepcopy(bert), cfg(context="layer_feature"))
    for role in ("P", "Q"):
        gen_s, gen_o = shared.generators[role], own.generators[role]
        for g, length in enumerate(gen_o.group_lengths):
            n_g = getattr(gen_o, f"ids_{g}").numel()
            d = own.peft_config.feature_dim or own.peft_config.hypernet_dim
            assert tuple(gen_s.feature_embeddings[g].shape) == (length, d)
            assert tuple(gen_o.feature_embeddings[g].shape) == (n_g, length, d)
    # lambda's tokens are ranks, not features: no shared table; with lambda_codes (the default) one code per rank of
    # every layer
    assert len(shared.generators["lambda"].feature_embeddings) == 0
    r, d = own.peft_config.init_r, own.peft_config.feature_dim
    assert [tuple(e.shape) for e in own.generators["lambda"].feature_embeddings] == [(own.n_layers, r, d)]
    table = own.generators["P"].feature_embeddings[0]
    before = table.detach().clone()
    train_steps(own, batch, 3)
    moved = (table.detach() - before).flatten(1)
    assert moved.shape[0] >= 2 and moved.abs().sum(1).min() > 0       # every layer's rows are trained
    assert not torch.allclose(moved[0], moved[1])                     # and not as one shared table


@pytest.mark.parametrize("context", ["feature", "layer_feature"])
def test_feature_dim_stores_narrow_embeddings_and_maps_them_to_the_hypernet_width(bert, batch, context):
    """feature_dim < hypernet_dim: the row embeddings are stored at feature_dim and one linear map per P / Q
    hypernetwork (trained with it) takes them to hypernet_dim: fewer parameters, and the layers still learn."""
    wide = ha.get_peft_model(copy.deepcopy(bert), cfg(context=context, hypernet_dim=32, feature_dim=None,
                                                      lambda_codes=False))
    narrow = ha.get_peft_model(copy.deepcopy(bert), cfg(context=context, hypernet_dim=32, feature_dim=4,
                                                        lambda_codes=False))
    saved = 0
    for role in ("P", "Q"):
        gen_w, gen_n = wide.generators[role], narrow.generators[role]
        assert gen_w.hypernet.feature_proj is None
        assert tuple(gen_n.hypernet.feature_proj.weight.shape) == (32, 4)
        for emb_w, emb_n in zip(gen_w.feature_embeddings, gen_n.feature_embeddings):
            assert emb_n.shape[:-1] == emb_w.shape[:-1] and emb_n.shape[-1] == 4 and emb_w.shape[-1] == 32
            saved += emb_w.numel() - emb_n.numel()
        saved -= gen_n.hypernet.feature_proj.weight.numel()
    assert narrow.generators["lambda"].hypernet.feature_proj is None  # lambda has no codes (lambda_codes=False)
    n_wide = sum(p.numel() for p in wide.hypernetwork_parameters())
    assert sum(p.numel() for p in narrow.hypernetwork_parameters()) == n_wide - saved
    proj = narrow.generators["P"].hypernet.feature_proj.weight
    before, table = proj.detach().clone(), narrow.generators["P"].feature_embeddings[0].detach().clone()
    losses = train_steps(narrow, batch, 3)
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(proj, before) and not torch.equal(narrow.generators["P"].feature_embeddings[0], table)


def test_default_row_embeddings_are_4_wide_and_mapped_to_the_hypernet_width(bert):
    model = ha.get_peft_model(bert, cfg())
    assert model.peft_config.feature_dim == 4 and model.peft_config.context == "layer_feature"
    for role in ("P", "Q"):
        gen = model.generators[role]
        assert all(emb.shape[-1] == 4 for emb in gen.feature_embeddings)
        assert tuple(gen.hypernet.feature_proj.weight.shape) == (model.peft_config.hypernet_dim, 4)


def test_feature_lr_ratio_gives_the_row_embeddings_their_own_optimizer_group(bert):
    model = ha.get_peft_model(bert, cfg(context="layer_feature", hypernet_lr_ratio=3.0, feature_lr_ratio=30.0))
    groups = {g["name"]: g for g in model.optimizer_param_groups(1e-3)}
    assert groups["hypernetworks"]["lr"] == pytest.approx(3e-3)
    assert groups["feature_embeddings"]["lr"] == pytest.approx(3e-2)
    embeddings = [p for g in model.generators.values() for p in g.feature_embeddings]
    assert {id(p) for p in groups["feature_embeddings"]["params"]} == {id(p) for p in embeddings}
    every = [p for g in groups.values() for p in g["params"]]
    assert len(every) == len({id(p) for p in every})                           # no parameter in two groups
    assert {id(p) for p in model.hypernetwork_parameters()} <= {id(p) for p in every}
    same = ha.get_peft_model(make_bert(), cfg(context="layer_feature", hypernet_lr_ratio=3.0, feature_lr_ratio=None))
    assert {g["name"]: g["lr"] for g in same.optimizer_param_groups(1e-3)}["feature_embeddings"] == pytest.approx(3e-3)
    with pytest.raises(ValueError, match=r"feature_lr_ratio=0.0 must be > 0"):
        ha.HyperAdaLoraConfig(feature_lr_ratio=0)


def test_feature_lr_ratio_final_is_validated_and_sets_a_geometric_schedule():
    from hyperadalora.generator import feature_lr_multiplier

    with pytest.raises(ValueError, match=r"feature_lr_ratio_final=0.0 must be > 0"):
        ha.HyperAdaLoraConfig(feature_lr_ratio_final=0)
    with pytest.raises(TypeError, match=r"feature_lr_ratio_final must be a number or None"):
        ha.HyperAdaLoraConfig(feature_lr_ratio_final="fast")
    c = ha.HyperAdaLoraConfig(feature_lr_ratio=30.0, feature_lr_ratio_final=3)
    assert c.feature_lr_ratio_final == 3.0
    assert feature_lr_multiplier(c, 0, 101) == pytest.approx(1.0)
    assert feature_lr_multiplier(c, 50, 101) == pytest.approx(0.1 ** 0.5)     # half way: the geometric mean
    assert feature_lr_multiplier(c, 100, 101) == pytest.approx(0.1)           # 30x -> 3x at the last step
    assert feature_lr_multiplier(ha.HyperAdaLoraConfig(), 100, 101) == 1.0    # None: constant


def test_hypernet_warmup_is_validated_and_ramps_both_hypernetwork_groups():
    from hyperadalora.generator import FEATURE_GROUP, HYPERNET_GROUP, group_lr_factor

    with pytest.raises(ValueError, match=r"hypernet_warmup_steps=-1 must be >= 0"):
        ha.HyperAdaLoraConfig(hypernet_warmup_steps=-1)
    with pytest.raises(TypeError, match=r"hypernet_warmup_steps must be an integer"):
        ha.HyperAdaLoraConfig(hypernet_warmup_steps=2.5)
    with pytest.raises(ValueError, match=r"hypernet_warmup_steps=20 > total_step=10: .* Lower hypernet_warmup_steps"):
        ha.HyperAdaLoraConfig(hypernet_warmup_steps=20, total_step=10)
    c = ha.HyperAdaLoraConfig(hypernet_warmup_steps=4, feature_lr_ratio_final=3.0)
    bodies, rows, head = {"name": HYPERNET_GROUP}, {"name": FEATURE_GROUP}, {"name": "modules_to_save"}
    assert [group_lr_factor(bodies, c, s, 101) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    # the row embeddings: the warm-up times their own schedule; the heads: neither
    assert group_lr_factor(rows, c, 1, 101) == pytest.approx(0.5 * 0.1 ** (1 / 100))
    assert group_lr_factor(rows, c, 100, 101) == pytest.approx(0.1)
    assert [group_lr_factor(head, c, s, 101) for s in range(6)] == [1.0] * 6
    assert group_lr_factor(bodies, ha.HyperAdaLoraConfig(), 0, 101) == 1.0      # 0: no warm-up


def test_feature_dim_is_validated():
    with pytest.raises(ValueError, match=r"feature_dim=0 must be >= 1 \(or None: hypernet_dim\)"):
        ha.HyperAdaLoraConfig(feature_dim=0)
    with pytest.raises(TypeError, match="feature_dim must be an integer or None"):
        ha.HyperAdaLoraConfig(feature_dim=2.5)


@pytest.mark.parametrize("tokens", ["row", "element"])
def test_center_increment_removes_the_row_mean_of_p_and_q(bert, batch, tokens):
    model = ha.get_peft_model(bert, cfg(center_increment=True, tokens=tokens, context="layer_feature"))
    train_steps(model, batch, 3)
    for role in ("P", "Q"):
        gen = model.generators[role]
        with torch.no_grad():
            outs = gen.generate()
        for out, state in zip(outs, gen.states()):
            inc = out - state
            assert inc.abs().max() > 0                                   # trained: the increment is not zero
            assert inc.mean(dim=1).abs().max() < 1e-6 * (1 + inc.abs().max())  # and its mean over the rows is


@pytest.mark.parametrize("basis", ["unit", "orthonormal"])
def test_basis_puts_the_generated_p_and_q_on_unit_or_orthonormal_columns(bert, batch, basis):
    ref = bert(input_ids=batch["input_ids"]).logits
    model = ha.get_peft_model(bert, cfg(basis=basis))
    assert (model(input_ids=batch["input_ids"]).logits - ref).abs().max().item() == 0.0  # step 0: the identity
    losses = train_steps(model, batch, 8)
    assert all(math.isfinite(x) for x in losses) and min(losses[1:]) < losses[0]
    model.eval()
    model.materialize(training_pass=False)
    for a in model.adapters:
        p, q = a.P.detach(), a.Q.detach().T          # both (length, r): the columns are the ranks
        for m in (p, q):
            if basis == "unit":
                assert torch.allclose(m.norm(dim=0), torch.ones(m.shape[1]), atol=1e-5)
            else:
                assert torch.allclose(m.T @ m, torch.eye(m.shape[1]), atol=1e-5)
    moved = 0.0
    for role in ("P", "Q"):  # and the hypernetworks did move them: the basis is not the seed state
        gen = model.generators[role]
        with torch.no_grad():
            moved = max(moved, max((out - ha.generator.to_basis(state, basis)).abs().max().item()
                                   for out, state in zip(gen.generate(), gen.states())))
    assert moved > 1e-4
    # the orthogonal penalty has nothing left to penalise
    if basis == "orthonormal":
        assert model.orthogonal_penalty().item() < 1e-8


def test_to_basis_keeps_orthonormal_columns_and_their_signs():
    q, _ = torch.linalg.qr(torch.randn(2, 10, 3))
    q = q * torch.tensor([1.0, -1.0, 1.0])             # a column with a negative diagonal of R must stay as it is
    assert torch.allclose(ha.generator.to_basis(q, "orthonormal"), q, atol=1e-6)
    x = torch.randn(2, 10, 3, requires_grad=True)
    ha.generator.to_basis(x, "orthonormal").sum().backward()     # differentiable
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert ha.generator.to_basis(x, "free") is x


def test_orthonormal_basis_needs_as_many_rows_as_ranks():
    # the model names the first layer too narrow (the generator's own check, without the layer, stays behind it)
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.0\.attention\.self\.query' \(in_features=4, "
                                         r"out_features=4\) is narrower than init_r=6: basis='orthonormal'"):
        ha.get_peft_model(make_bert(hidden=4), cfg(basis="orthonormal", init_r=6, target_r=2, init="orthonormal"))
    with pytest.raises(ValueError, match="basis='orthonormal' needs at least as many rows as ranks"):
        ha.generator.RoleGenerator("P", [4, 8], 6, 1, "orthonormal", cfg(), torch.Generator(), basis="orthonormal")


def test_lambda_codes_give_every_layers_singular_values_their_own_fast_codes(bert, batch):
    """lambda_codes: one (r, feature_dim) code table per layer for H_lambda, in the row embeddings' optimizer group;
    step 0 is still the identity, and training moves the codes and each layer's lambda its own way."""
    ref = bert(input_ids=batch["input_ids"]).logits
    model = ha.get_peft_model(bert, cfg(hypernet_lr_ratio=1.0, feature_lr_ratio=30.0))   # lambda_codes: the default
    assert (model(input_ids=batch["input_ids"]).logits - ref).abs().max().item() == 0.0
    gen = model.generators["lambda"]
    r, n_layers = model.peft_config.init_r, len(model.adapters)
    assert [tuple(e.shape) for e in gen.feature_embeddings] == [(n_layers, r, model.peft_config.feature_dim)]
    assert tuple(gen.hypernet.feature_proj.weight.shape) == (model.peft_config.hypernet_dim, 4)
    groups = {g["name"]: g for g in model.optimizer_param_groups(1e-3)}
    assert id(gen.feature_embeddings[0]) in {id(p) for p in groups["feature_embeddings"]["params"]}
    assert groups["feature_embeddings"]["lr"] == pytest.approx(3e-2)
    codes = gen.feature_embeddings[0].detach().clone()
    losses = train_steps(model, batch, 3)
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(gen.feature_embeddings[0], codes)
    with torch.no_grad():
        lam = gen.generate()[0][..., 0]
    assert lam.abs().max() > 0 and not torch.allclose(lam, lam[:1].expand_as(lam))
    plain = ha.get_peft_model(make_bert(), cfg(lambda_codes=False))
    assert len(plain.generators["lambda"].feature_embeddings) == 0
    assert plain.generators["lambda"].hypernet.feature_proj is None


@pytest.mark.parametrize("context", ["module", "feature"])
def test_lambda_codes_need_the_layer_feature_context(context):
    """As feature_dim, lambda_codes has no effect where the context has no per-layer codes."""
    model = ha.get_peft_model(make_bert(), cfg(context=context, lambda_codes=True))
    assert len(model.generators["lambda"].feature_embeddings) == 0


def test_lambda_codes_are_validated():
    with pytest.raises(TypeError, match="lambda_codes must be true or false"):
        ha.HyperAdaLoraConfig(lambda_codes="yes")


def test_center_increment_must_be_a_bool():
    with pytest.raises(TypeError, match="center_increment must be true or false"):
        cfg(center_increment="yes")


@pytest.mark.parametrize("shape", [(2,), (40,), (3, 20)])  # fewer / more tokens than the 16 input features; 3-D
def test_svd_linear_scales_q_or_the_activations_with_the_same_result(shape):
    # also checks the accumulation into the base output (in place): outputs and every gradient, the base
    # layer's own weight included, equal the plain formula's
    torch.manual_seed(0)
    layer = ha.SVDLinear(torch.nn.Linear(16, 8), 0, scaling=0.5)
    P, lam, Q = torch.randn(8, 3), torch.randn(3), torch.randn(3, 16)
    P.requires_grad_(), lam.requires_grad_(), Q.requires_grad_()
    layer.set_tensors(P, lam, Q)
    x = torch.randn(*shape, 16, requires_grad=True)
    out = layer(x)
    ref = layer.base_layer(x) + 0.5 * (x @ Q.t()) @ torch.diag(lam) @ P.t()
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    inputs = [x, P, lam, Q, layer.base_layer.weight]
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(layer(x), ref, atol=1e-5)


def _graph_nodes(fn, depth=6):
    names = []
    def walk(f, d):
        if f is not None and d < depth:
            names.append(type(f).__name__)
            for nxt, _ in f.next_functions:
                walk(nxt, d + 1)
    walk(fn, 0)
    return names


def test_svd_linear_adds_in_place_without_a_copy_of_the_gradient():
    # a 3-D input goes through the base layer as 2-D, whose output is a fresh tensor: the product is added into it
    # by one addmm_ (no CopySlices node, which would copy the whole output gradient in backward)
    layer = ha.SVDLinear(torch.nn.Linear(16, 8), 0, scaling=0.5)
    layer.set_tensors(torch.randn(8, 3, requires_grad=True), torch.randn(3), torch.randn(3, 16))
    names = _graph_nodes(layer(torch.randn(2, 5, 16, requires_grad=True)).grad_fn)
    assert "CopySlices" not in names and names[:2] == ["ViewBackward0", "AddmmBackward0"]
    # on a view (not what nn.Linear gives a 2-D input) add_product does not write in place
    base = torch.randn(10, 8, requires_grad=True) * 1.0
    view = base.view(2, 5, 8)[0]
    h, B = torch.randn(5, 3), torch.randn(8, 3)
    out = ha.tuner_utils.add_product(view, h, B)
    assert torch.allclose(out, view + h @ B.t()) and "CopySlices" not in _graph_nodes(out.grad_fn)


def test_svd_linear_under_bfloat16_autocast_matches_the_plain_formula():
    torch.manual_seed(0)
    layer = ha.SVDLinear(torch.nn.Linear(16, 8), 0, scaling=0.5)
    P, lam, Q = torch.randn(8, 3, requires_grad=True), torch.randn(3), torch.randn(3, 16)
    layer.set_tensors(P, lam, Q)
    x = torch.randn(4, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = layer.base_layer(x) + 0.5 * (x @ Q.t()) @ torch.diag(lam) @ P.t()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), atol=0.1, rtol=0.02)
    out.float().sum().backward()
    assert P.grad is not None and torch.isfinite(P.grad).all()


def test_identity_offsets_of_p_and_q_are_float16_and_lambdas_exact(bert):
    model = ha.get_peft_model(bert, cfg())  # static generation, offset identity (the defaults)
    for role in ("P", "Q"):
        gen = model.generators[role]
        offsets = [b for n, b in gen.named_buffers() if n.startswith("offset_")]
        assert offsets and all(b.dtype == torch.float16 for b in offsets), role
        with torch.no_grad():
            first = gen.generate()
        for out, state in zip(first, gen.states()):  # the first generation is the seed state, to the rounding
            assert (out - state).abs().max().item() < 1e-3 * state.abs().max().item()
    lam = model.generators["lambda"]
    assert all(b.dtype == torch.float32 for n, b in lam.named_buffers() if n.startswith("offset_"))
    with torch.no_grad():
        assert all(t.abs().max().item() == 0.0 for t in lam.generate())


def test_principal_seeds_do_not_keep_the_full_singular_vectors_alive(bert):
    from hyperadalora.tuner_utils import principal_subspaces

    model = ha.get_peft_model(bert, cfg(init="orthonormal"))
    ps, qs = principal_subspaces(model.adapters, 3)
    for t, layer in zip(ps, model.adapters):
        assert t.shape == (layer.out_features, 3)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # a copy, not a view of U
    for t, layer in zip(qs, model.adapters):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_orthogonal_penalty_is_built_before_the_base_model_runs(bert, batch):
    """Its autograd nodes precede the model's, so autograd reaches them last (after the activations are freed)."""
    model = ha.get_peft_model(bert, cfg(orth_reg_weight=0.1))
    model.train()
    order = []
    handle = model.base_model.register_forward_pre_hook(lambda *_: order.append("base"))
    original = model.orthogonal_penalty

    def penalty(*a, **k):
        order.append("penalty")
        return original(*a, **k)

    model.orthogonal_penalty = penalty
    out = model(**batch)
    handle.remove()
    assert order == ["penalty", "base"]
    assert out.loss.item() == pytest.approx(model.last_task_loss.item() + 0.1 * model.last_orth_penalty.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ misuse, refused clearly
def _is_untouched_base(model, requires_grad=True):
    """No adapter layer left in the model and every parameter's requires_grad as a fresh model has it."""
    from hyperadalora.methods import AdapterLayer

    return (not any(isinstance(m, (ha.SVDLinear, AdapterLayer)) for m in model.modules())
            and all(p.requires_grad == requires_grad for p in model.parameters()))


@pytest.mark.parametrize("options, setting", [({}, "init='principal'"),
                                              ({"init": "orthonormal", "basis": "orthonormal"}, "basis='orthonormal'")])
def test_a_layer_narrower_than_init_r_is_refused_naming_it(options, setting):
    # BERT's head is Linear(32, 2): init_r=3 used to crash at the first forward ("mat1 and mat2 shapes cannot be
    # multiplied (2x2 and 3x8)"): the principal seeds have only min(in, out) = 2 singular vectors
    base = make_bert()
    with pytest.raises(ValueError) as info:
        ha.get_peft_model(base, cfg(target_modules=["classifier"], **options))
    message = str(info.value)
    for part in ("'classifier'", "in_features=32", "out_features=2", "init_r=3", setting, "Lower init_r to <= 2"):
        assert part in message, (part, message)
    assert _is_untouched_base(base)  # refused before the model was changed: it can be used again
    ha.get_peft_model(base, cfg(target_modules=["classifier"], init_r=2, **options))


def test_a_layer_narrower_than_init_r_trains_with_orthonormal_seeds(batch):
    # rank above min(in, out) is fine for the adapter itself: only the principal seeds (and basis='orthonormal')
    # need it below
    model = ha.get_peft_model(make_bert(), cfg(target_modules=["classifier", "query"], init="orthonormal"))
    model.train()
    model(**batch).loss.backward()
    assert model.adapters[-1].P.shape == (2, 3)


def test_load_onto_a_model_with_fewer_layers_names_the_missing_modules(tmp_path, batch):
    model = ha.get_peft_model(make_bert(num_layers=2), cfg())
    model.save_pretrained(tmp_path / "a")
    small = make_bert(num_layers=1)
    with pytest.raises(ValueError) as info:  # used to load layer 0's adapters and drop layer 1's silently
        ha.load_adapter(small, tmp_path / "a")
    message = str(info.value)
    assert "6 of its 12 adapted layers have no matching nn.Linear" in message
    assert "bert.encoder.layer.1.attention.self.query" in message and "bert.encoder.layer.0." not in message
    assert _is_untouched_base(small)


def test_load_refuses_saved_head_weights_the_model_does_not_take(tmp_path):
    model = ha.get_peft_model(make_bert(), cfg())
    model.save_pretrained(tmp_path / "a")
    other = make_bert()
    other.renamed_head = other.classifier
    del other.classifier
    with pytest.raises(ValueError, match=r"saved module weights that no module of the model takes: classifier\.bias"):
        ha.load_adapter(other, tmp_path / "a")


@pytest.mark.parametrize("second", ["get_peft_model", "load_adapter", "get_peft_model on the returned model"])
def test_a_model_that_already_carries_adapters_is_refused(tmp_path, second):
    # the README's flow with the same base_model object: get_peft_model changed it in place, so load_adapter used
    # to fail with "target_modules='bert\\.encoder...' matches no nn.Linear module"
    base_model = make_bert()
    model = ha.get_peft_model(base_model, cfg())
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError) as info:
        if second == "get_peft_model":
            ha.get_peft_model(base_model, cfg())
        elif second == "load_adapter":
            ha.load_adapter(base_model, tmp_path / "a")
        else:
            ha.get_peft_model(model, cfg())
    message = str(info.value)
    assert message.startswith(second.split()[0] + ": the model already carries adapters")
    assert "SVDLinear" in message or "HyperAdaLoraModel" in message
    assert "Pass an unmodified base model (load it again" in message and "matches no nn.Linear" not in message
    ha.load_adapter(make_bert(), tmp_path / "a")  # a fresh base model loads


def test_a_peft_model_is_refused():
    import peft

    base = make_bert()
    peft.get_peft_model(base, peft.LoraConfig(target_modules=["query", "value"]))
    with pytest.raises(ValueError, match=r"already carries adapters \('bert\.encoder\.layer\.0\.attention\.self"
                                         r"\.query' is a peft\.tuners\.lora\.layer\.Linear"):
        ha.get_peft_model(base, cfg())


def _fused_steps(model, batch, steps, allocate):
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2), fused=True)
    model.train()
    for step in range(1, steps + 1):
        model(**batch).loss.backward()
        opt.step()
        if allocate:
            model.update_and_allocate(step)
        opt.zero_grad()


def test_fused_optimizer_steps_are_seen_without_version_bumps(bert, batch):
    # torch.optim.AdamW(fused=True) (transformers' default optim "adamw_torch_fused") updates in place without
    # bumping the parameters' version counters: the model used to miss its steps entirely
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.sum().backward()
    opt.step()
    assert p._version == 0 and not torch.equal(p.detach(), torch.ones(3))  # the cause, as seen by the model

    model = ha.get_peft_model(bert, cfg(generation="recurrent", identity="zero_output"))
    state0 = model.generators["P"].states()[0].clone()
    with pytest.warns(UserWarning, match="update_and_allocate"):  # rank allocation is not running: said
        _fused_steps(model, batch, 3, allocate=False)
    # and the recurrent state commits (the first generation is the seed state itself: the third forward commits the
    # second's, made after one step)
    assert not torch.equal(state0, model.generators["P"].states()[0])


def test_fused_optimizer_with_update_and_allocate_allocates_without_a_warning(bert, batch):
    import warnings

    model = ha.get_peft_model(bert, cfg(generation="recurrent", identity="zero_output"))
    state0 = model.generators["P"].states()[0].clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*update_and_allocate")
        _fused_steps(model, batch, 20, allocate=True)
        model(**batch)
    assert model.allocator.last_step == 20 and model.total_rank == model.n_layers  # the target, reached
    assert not torch.equal(state0, model.generators["P"].states()[0])  # committed by update_and_allocate


def test_eval_after_a_fused_step_regenerates(bert, batch):
    model = ha.get_peft_model(bert, cfg())
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2), fused=True)
    model.train()
    model(**batch).loss.backward()
    model.eval()
    model(input_ids=batch["input_ids"])       # generated and cached
    before = model.adapters[0].P.clone()
    opt.step()                                # moves the hypernetworks without a version bump
    model(input_ids=batch["input_ids"])       # used to serve the cached, stale tensors
    assert not torch.allclose(before, model.adapters[0].P)


def test_gradient_accumulation_does_not_commit_or_warn(bert, batch):
    import warnings

    model = ha.get_peft_model(bert, cfg(generation="recurrent", identity="zero_output"))
    state0 = model.generators["P"].states()[0].clone()
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*update_and_allocate")
        for _ in range(3):  # micro-batches, no optimizer step
            model(**batch).loss.backward()
    assert torch.equal(state0, model.generators["P"].states()[0])


@pytest.mark.parametrize("with_callback", [False, True])
def test_plain_trainer_with_its_default_fused_optimizer(tmp_path, bert, with_callback):
    import warnings

    from transformers import Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.arange(i, i + 6) % 100, "labels": torch.tensor(i % 2)}

    model = ha.get_peft_model(bert, cfg(total_step=4, tinit=1, tfinal=1, deltaT=1))
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    assert args.optim == "adamw_torch_fused"  # the default in transformers 5
    trainer = Trainer(model=model, args=args, train_dataset=Data(),
                      callbacks=[ha.RankAllocationCallback()] if with_callback else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [w for w in caught if "update_and_allocate() was not called" in str(w.message)]
    if with_callback:
        assert not said and model.allocator.last_step == 4 and model.total_rank == model.n_layers
    else:
        assert len(said) == 1 and model.allocator.last_step == 0
