"""Generation cost per step: bounded, whatever the number of adapted layers; nothing regenerated when nothing
changed (evaluation, no_grad passes, after training)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hyperadalora as ha
from conftest import make_bert
from test_every_method import GENERATED, config

LAYERS = (2, 4, 8)   # BERT layers: 6 adapted linear layers each (12, 24, 48 adapters)


def cfg(method="hyperadalora", **kw):
    return config(method, **kw)


def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (4, 8), generator=g), "labels": torch.tensor([0, 1, 0, 1])}


class HypernetCalls:
    """Counts the forward calls of the three role hypernetworks."""

    def __init__(self, model):
        self.n = 0
        self.handles = [g.hypernet.register_forward_pre_hook(self._hook) for g in model.generators.values()]

    def _hook(self, module, args):
        self.n += 1

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def n_groups(model) -> int:
    """Batched passes per step: one per role and distinct matrix length."""
    return sum(len(g.group_lengths) for g in model.generators.values())


def is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class KernelCount(TorchDispatchMode):
    """Counts the aten operators that compute (views excluded: they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not is_view(func):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", GENERATED)
@pytest.mark.parametrize("options", [{}, {"tokens": "element", "element_chunk": 16}, {"hypernet_checkpointing": False}])
def test_hypernetwork_calls_per_step_do_not_grow_with_the_layers(method, options):
    counts = {}
    for layers in LAYERS:
        model = ha.get_peft_model(make_bert(num_layers=layers), cfg(method, **options))
        assert model.n_layers == 6 * layers
        opt = torch.optim.AdamW(model.optimizer_param_groups(1e-3))
        calls = HypernetCalls(model)
        model.train()
        per_step = []
        for step in (1, 2):
            out = model(**batch())
            forward = calls.take()
            out.loss.backward()
            backward = calls.take()      # activation recomputation (hypernet_checkpointing)
            opt.step()
            model.update_and_allocate(step)
            opt.zero_grad()
            per_step.append((forward, backward, calls.take()))
        assert per_step[0] == per_step[1]
        forward, backward, allocate = per_step[0]
        assert forward == n_groups(model)
        if method == "hyperadalora":
            assert forward == 5                  # P: rows of 32 and 64; lambda: one; Q: 32 and 64
        assert backward == (forward if model.peft_config.hypernet_checkpointing else 0)
        assert allocate == 0                     # allocation reuses the step's generation
        counts[layers] = per_step[0]
    assert len(set(counts.values())) == 1, counts


def assert_flat_generation_kernels(make_model, adapter_sum):
    """The aten operators of generation (with the installation into every layer) and of its backward are the same
    for every number of layers in LAYERS; ``adapter_sum(model)``: a scalar of every layer's tensors (not counted).
    Run for every generated method by test_every_method.py (test_generation_kernels_do_not_grow_with_the_layers)."""
    counts = {}
    for layers in LAYERS:
        model = make_model(layers)
        model.train()
        with KernelCount() as fwd:
            model.materialize(training_pass=True)
        loss = adapter_sum(model)
        with KernelCount() as bwd:
            loss.backward()
        counts[layers] = (fwd.ops, bwd.ops)
    first = counts[LAYERS[0]]
    for layers in LAYERS[1:]:
        assert counts[layers][0] == first[0], (layers, counts[layers][0] - first[0], first[0] - counts[layers][0])
        assert counts[layers][1] == first[1], (layers, counts[layers][1] - first[1], first[1] - counts[layers][1])


@pytest.mark.parametrize("method", GENERATED)
def test_evaluation_and_no_grad_passes_reuse_the_cache(tmp_path, method):
    model = ha.get_peft_model(make_bert(num_layers=2), cfg(method))
    calls = HypernetCalls(model)
    b = batch()
    model.eval()
    with torch.no_grad():
        first = model(**b).logits
        assert calls.take() == n_groups(model)   # generated once...
        for _ in range(3):
            assert torch.equal(model(**b).logits, first)
        assert calls.take() == 0                 # ...and reused
    model.train()
    with torch.no_grad():                        # training mode without autograd: also cached
        model(**b)
    assert calls.take() == 0
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    model(**b).loss.backward()
    calls.take()
    opt.step()
    model.update_and_allocate(1)
    opt.zero_grad()
    model.eval()
    with torch.no_grad():
        changed = model(**b).logits
        assert calls.take() == n_groups(model)   # the hypernetworks and the state changed: generated again
        model(**b)
        assert calls.take() == 0
    assert not torch.equal(changed, first)
    model.save_pretrained(str(tmp_path / "a"))   # after training: the cached tensors, no new generation
    model.rank_pattern
    assert calls.take() == 0
