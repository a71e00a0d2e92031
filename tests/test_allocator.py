"""RankAllocator and budget_at: AdaLoRA's cubic budget schedule and global pruning of the rank masks.

Steps are optimizer steps completed (1-based): ``update(1)`` after the first optimizer step,
``update(total_step)`` after the last.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperadalora.methods.hyperadalora.allocation import RankAllocator, budget_at

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ budget_at
def test_budget_fixed_points_and_cubic_value():
    kw = dict(init_budget=30, target_budget=10, tinit=10, tfinal=10, total_step=110)
    # at the start and during the warm-up: the initial budget
    assert budget_at(0, **kw) == 30
    assert budget_at(1, **kw) == 30
    assert budget_at(10, **kw) == 30  # step == tinit
    # mid-way: frac = 1 - (55 - 10) / (100 - 10) = 0.5 -> 10 + 20 * 0.125 = 12.5 -> 12
    assert budget_at(55, **kw) == 12
    # just after tinit: frac = 1 - 1/90
    assert budget_at(11, **kw) == int(10 + 20 * (1 - 1 / 90) ** 3)
    assert budget_at(11, **kw) < 30
    # at total_step - tfinal and after: the target
    assert budget_at(100, **kw) == 10
    assert budget_at(99, **kw) >= 10
    assert budget_at(105, **kw) == 10
    assert budget_at(110, **kw) == 10
    assert budget_at(1000, **kw) == 10


def test_budget_cubic_formula_matches_everywhere():
    init, target, tinit, tfinal, total = 96, 24, 5, 7, 60
    end = total - tfinal
    for step in range(tinit + 1, end):
        frac = 1 - (step - tinit) / (end - tinit)
        assert budget_at(step, init, target, tinit, tfinal, total) == int(target + (init - target) * frac ** 3)


def test_allocator_budget_matches_budget_at():
    alloc = RankAllocator(n_layers=4, init_r=6, target_r=2, total_step=30, tinit=3, tfinal=5)
    assert alloc.init_budget == 24 and alloc.target_budget == 8
    for step in range(0, 35):
        assert alloc.budget(step) == budget_at(step, 24, 8, 3, 5, 30)


@st.composite
def schedules(draw, max_total=60):
    n_layers = draw(st.integers(1, 50))
    init_r = draw(st.integers(1, 8))
    target_r = draw(st.integers(0, init_r))
    total_step = draw(st.integers(1, max_total))
    tinit = draw(st.integers(0, total_step - 1))
    tfinal = draw(st.integers(0, total_step - 1 - tinit))
    deltaT = draw(st.integers(1, total_step + 20))  # may be larger than the whole schedule
    assert tinit + tfinal < total_step
    return dict(n_layers=n_layers, init_r=init_r, target_r=target_r, total_step=total_step, tinit=tinit,
                tfinal=tfinal, deltaT=deltaT)


@SETTINGS
@given(schedules(max_total=400))
def test_budget_monotone_bounded_and_exact_at_end(s):
    init, target = s["init_r"] * s["n_layers"], s["target_r"] * s["n_layers"]
    args = (init, target, s["tinit"], s["tfinal"], s["total_step"])
    end = s["total_step"] - s["tfinal"]
    previous = budget_at(0, *args)
    assert previous == init
    for step in range(1, s["total_step"] + 5):
        b = budget_at(step, *args)
        assert isinstance(b, int)
        assert b <= previous, f"budget rose at step {step}: {previous} -> {b}"
        assert target <= b <= init
        if step <= s["tinit"]:
            assert b == init
        if step >= end:
            assert b == target
        previous = b


# ------------------------------------------------------------------------------------------ simulation
SCORE_KINDS = ("random", "ties", "zeros", "nan", "all_nan", "inf")


def make_scores(kind, shape, gen):
    if kind == "random":
        return torch.rand(shape, generator=gen) * 2 - 1  # signed: magnitude uses |lambda|
    if kind == "ties":
        return torch.randint(0, 3, shape, generator=gen).float()
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "nan":
        s = torch.rand(shape, generator=gen)
        s[torch.rand(shape, generator=gen) < 0.3] = float("nan")
        return s
    if kind == "all_nan":
        return torch.full(shape, float("nan"))
    if kind == "inf":
        s = torch.rand(shape, generator=gen)
        s[torch.rand(shape, generator=gen) < 0.2] = float("inf")
        s[torch.rand(shape, generator=gen) < 0.2] = float("-inf")
        return s
    raise AssertionError(kind)


def simulate(alloc, kind, seed, total_step, importance="magnitude"):
    gen = torch.Generator().manual_seed(seed)
    shape = (alloc.n_layers, alloc.init_r)
    prev_mask = alloc.mask.clone()
    for step in range(1, total_step + 1):
        prev_count = int(prev_mask.sum())
        scores = make_scores(kind, shape, gen)
        if importance == "magnitude":
            changed = alloc.update(step, magnitude=scores)
        else:
            sens = make_scores(kind, (3,) + shape, gen).abs()
            changed = alloc.update(step, sensitivity=sens)
        budget = alloc.budget(step)
        mask = alloc.mask
        assert mask.shape == shape and mask.dtype == torch.bool
        # a pruned rank never comes back
        assert not (mask & ~prev_mask).any(), f"step {step}: a pruned rank came back"
        if alloc.is_masking_step(step) and budget < prev_count:
            assert changed
            assert alloc.total_rank == budget, f"step {step}: kept {alloc.total_rank} != budget {budget}"
        else:
            assert not changed
            assert alloc.total_rank == prev_count
        assert alloc.total_rank >= budget
        assert sum(alloc.ranks) == alloc.total_rank
        assert alloc.last_step == step
        prev_mask = mask.clone()
    return alloc


@SETTINGS
@given(schedules(), st.sampled_from(SCORE_KINDS), st.integers(0, 2 ** 31 - 1))
def test_simulated_allocation_magnitude(s, kind, seed):
    alloc = RankAllocator(**s)
    simulate(alloc, kind, seed, s["total_step"])
    assert alloc.total_rank == s["target_r"] * s["n_layers"]
    assert alloc.budget(s["total_step"]) == alloc.target_budget
    if s["target_r"] == 0:
        assert alloc.ranks == [0] * s["n_layers"]
    # calling again after the end (e.g. a resumed / longer run) is a no-op
    assert not alloc.update(s["total_step"] + 1, magnitude=torch.rand(s["n_layers"], s["init_r"]))
    assert alloc.total_rank == alloc.target_budget


@settings(max_examples=40, deadline=None)
@given(schedules(max_total=30), st.sampled_from(("random", "ties", "zeros", "nan")), st.integers(0, 2 ** 31 - 1))
def test_simulated_allocation_sensitivity(s, kind, seed):
    alloc = RankAllocator(**s, importance="sensitivity")
    simulate(alloc, kind, seed, s["total_step"], importance="sensitivity")
    assert alloc.total_rank == s["target_r"] * s["n_layers"]


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_prune_to_keeps_exactly_budget_among_kept(kind):
    gen = torch.Generator().manual_seed(3)
    alloc = RankAllocator(n_layers=5, init_r=4, target_r=0, total_step=10)
    for budget in (17, 11, 11, 6, 1, 0):
        before = alloc.mask.clone()
        alloc.prune_to(budget, make_scores(kind, (5, 4), gen))
        assert alloc.total_rank == min(budget, int(before.sum()))
        assert not (alloc.mask & ~before).any()


def test_prune_to_nan_scores_do_not_resurrect_or_lose_ranks():
    alloc = RankAllocator(n_layers=1, init_r=4, target_r=0, total_step=10)
    alloc.mask = torch.tensor([[False, True, True, True]])
    assert alloc.prune_to(2, torch.tensor([[5.0, float("nan"), 1.0, float("nan")]]))
    assert alloc.total_rank == 2
    assert not alloc.mask[0, 0]
    assert alloc.mask[0, 2]  # the only finite score among the kept ranks survives


def test_prune_to_picks_highest_magnitudes_and_breaks_ties_by_index():
    alloc = RankAllocator(n_layers=2, init_r=3, target_r=1, total_step=10)
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    assert alloc.update(10, magnitude=-scores)  # magnitude is |lambda|
    assert alloc.mask.tolist() == [[False, True, False], [True, False, False]]
    alloc = RankAllocator(n_layers=2, init_r=3, target_r=1, total_step=10)
    alloc.prune_to(3, torch.ones(2, 3))
    assert alloc.mask.tolist() == [[True, True, True], [False, False, False]]


def test_edges_single_layer_target_zero_and_huge_deltaT():
    alloc = RankAllocator(n_layers=1, init_r=1, target_r=0, total_step=1)
    assert alloc.update(1, magnitude=torch.ones(1, 1))
    assert alloc.ranks == [0] and alloc.total_rank == 0
    assert not alloc.update(2, magnitude=torch.ones(1, 1))

    # deltaT larger than the schedule: nothing happens until total_step - tfinal, then straight to the target
    alloc = RankAllocator(n_layers=3, init_r=4, target_r=2, total_step=20, tinit=2, tfinal=5, deltaT=1000)
    for step in range(1, 15):
        assert not alloc.update(step, magnitude=torch.rand(3, 4))
        assert alloc.total_rank == 12
    assert alloc.update(15, magnitude=torch.rand(3, 4))
    assert alloc.total_rank == 6
    for step in range(16, 21):
        assert not alloc.update(step, magnitude=torch.rand(3, 4))
    assert alloc.total_rank == 6
    assert alloc.n_maskings == 1


def test_masking_steps():
    alloc = RankAllocator(n_layers=2, init_r=4, target_r=1, total_step=20, tinit=3, tfinal=4, deltaT=5)
    masking = [s for s in range(1, 21) if alloc.is_masking_step(s)]
    assert masking == [5, 10, 15, 16, 17, 18, 19, 20]


def test_constructor_errors():
    with pytest.raises(ValueError, match="total_step is required"):
        RankAllocator(2, 3, 1, None)
    with pytest.raises(ValueError, match=r"tinit \+ tfinal = 10 >= total_step = 10"):
        RankAllocator(2, 3, 1, 10, tinit=4, tfinal=6)
    with pytest.raises(ValueError, match=r"target_r=4 must be in \[0, init_r=3\]"):
        RankAllocator(2, 3, 4, 10)
    with pytest.raises(ValueError, match="target_r=-1"):
        RankAllocator(2, 3, -1, 10)


# ------------------------------------------------------------------------------------------ sensitivity
def test_sensitivity_prunes_lowest_ipt_times_unc():
    torch.manual_seed(0)
    alloc = RankAllocator(n_layers=3, init_r=4, target_r=2, total_step=10, tinit=0, tfinal=2, deltaT=100,
                          importance="sensitivity", beta1=0.85, beta2=0.85)
    ipt = torch.zeros(2, 3, 4)
    unc = torch.zeros(2, 3, 4)
    for step in range(1, 8):  # no masking before step 8 (deltaT=100)
        s = torch.rand(2, 3, 4)
        ipt = 0.85 * ipt + 0.15 * s
        unc = 0.85 * unc + 0.15 * (s - ipt).abs()
        # a magnitude that would choose the opposite ranks must be ignored
        assert not alloc.update(step, magnitude=torch.rand(3, 4), sensitivity=s)
    torch.testing.assert_close(alloc.ipt, ipt)
    torch.testing.assert_close(alloc.unc, unc)
    s = torch.rand(2, 3, 4)
    ipt = 0.85 * ipt + 0.15 * s
    unc = 0.85 * unc + 0.15 * (s - ipt).abs()
    score = (ipt * unc).sum(0)
    assert alloc.update(8, magnitude=-score, sensitivity=s)
    expected = torch.zeros(12, dtype=torch.bool)
    expected[torch.topk(score.flatten(), 6).indices] = True
    assert alloc.mask.flatten().tolist() == expected.tolist()
    assert alloc.total_rank == 6


def test_update_sensitivity_then_update_prunes_lowest_score():
    alloc = RankAllocator(n_layers=1, init_r=4, target_r=2, total_step=4, tfinal=1, importance="sensitivity")
    # one component: after one update ipt = 0.15 s and unc = 0.15 * 0.85 s, so the score is monotone in s
    alloc.update_sensitivity(torch.tensor([[[3.0, 0.5, 2.0, 0.1]]]))
    assert alloc.update(3)  # step 3 == total_step - tfinal: budget 2
    assert alloc.mask.tolist() == [[True, False, True, False]]


def test_sensitivity_without_scores_raises_clear_runtime_error():
    alloc = RankAllocator(n_layers=2, init_r=3, target_r=1, total_step=5, tinit=1, deltaT=2,
                          importance="sensitivity")
    assert not alloc.update(1, magnitude=torch.rand(2, 3))  # not a masking step: fine
    with pytest.raises(RuntimeError, match=r"update_sensitivity\(\).*backward"):
        alloc.update(2, magnitude=torch.rand(2, 3))
    assert alloc.total_rank == 6  # the masks are untouched


def test_magnitude_without_scores_raises():
    alloc = RankAllocator(n_layers=2, init_r=3, target_r=1, total_step=5)
    with pytest.raises(ValueError, match="singular values"):
        alloc.update(5)


# ------------------------------------------------------------------------------------------ state
def test_state_dict_round_trip_and_continuation():
    kw = dict(n_layers=3, init_r=4, target_r=1, total_step=20, tinit=2, tfinal=3, deltaT=2,
              importance="sensitivity")
    a = RankAllocator(**kw)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        a.update(step, sensitivity=torch.rand(2, 3, 4, generator=gen))
    assert a.n_maskings > 0 and a.total_rank < 12
    state = a.state_dict()
    b = RankAllocator(**kw)
    b.load_state_dict(state)
    assert torch.equal(b.mask, a.mask) and b.mask.dtype == torch.bool
    assert torch.equal(b.ipt, a.ipt) and torch.equal(b.unc, a.unc)
    assert b.last_step == a.last_step == 8 and b.n_maskings == a.n_maskings
    # the state is a copy: mutating it does not touch either allocator
    state["mask"].fill_(False)
    state["ipt"].zero_()
    assert a.total_rank == b.total_rank > 0 and a.ipt.abs().sum() > 0
    # both continue identically
    for step in range(9, 21):
        s = torch.rand(2, 3, 4, generator=gen)
        assert a.update(step, sensitivity=s) == b.update(step, sensitivity=s)
        assert torch.equal(a.mask, b.mask)
    assert b.total_rank == 3


def test_state_dict_round_trip_fresh_and_uint8_mask():
    a = RankAllocator(2, 3, 1, 10)
    state = a.state_dict()
    assert state["ipt"] is None and state["unc"] is None
    b = RankAllocator(2, 3, 1, 10)
    b.mask[0, 1] = False
    b.load_state_dict(state)
    assert b.total_rank == 6 and b.ipt is None and b.last_step == 0 and b.n_maskings == 0
    # a mask saved as uint8 (safetensors) loads as bool
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.uint8)
    b.load_state_dict({"mask": mask})
    assert b.mask.dtype == torch.bool and b.ranks == [2, 1]


@pytest.mark.parametrize("shape", [(3, 2), (2, 4), (6,), (1, 2, 3)])
def test_load_state_dict_wrong_shape_raises(shape):
    a = RankAllocator(2, 3, 1, 10)
    with pytest.raises(ValueError, match=r"does not fit \(2, 3\)"):
        a.load_state_dict({"mask": torch.ones(shape, dtype=torch.bool)})
    assert a.mask.shape == (2, 3) and a.total_rank == 6
