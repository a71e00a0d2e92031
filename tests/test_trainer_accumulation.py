"""`HyperAdaLoraTrainer` with gradient accumulation, in one process: 2 micro-batches of B train what 1 batch of 2B
trains (the losses, the trained state, the rank allocation), with the orthogonal regulariser at its default weight
(0.1: counted once per optimizer step, not once per micro-batch, `callbacks._penalty_factor`) and with HyperAdaLoRA's
importance='sensitivity' (computed from the whole step's gradient, the sum over its micro-batches), with and
without Trainer's ``num_items_in_batch`` loss normalisation. Tiny Llama, fixed-length random token sequences (every
micro-batch has as many labelled tokens, so the mean of the micro-batches' means is the batch's mean); SGD (Adam's
normalised update turns the fp32 rounding of a near-zero gradient into a step of the learning rate's size)."""

import os
import sys

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import hyperadalora as ha

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp_trainer_worker import TokenDataset, adapter_config, allocation, base_model, recording  # noqa: E402

STEPS = 4
BATCH = 4   # examples per optimizer step
RTOL = 1e-5


def train(tmp_path, name, method, accumulation, items=True, importance=None, orth_reg_weight=0.1):
    """``STEPS`` optimizer steps of ``BATCH`` examples in ``accumulation`` micro-batches: {losses, steps, state}.
    ``items=False``: the Trainer without ``num_items_in_batch`` (each micro-batch's loss its own mean, divided by the
    accumulation steps by Trainer)."""
    config = adapter_config(method, orth_reg_weight)
    if importance is not None:
        config.importance = importance
    import peft

    base = base_model("trainer-" + method)
    model = ha.get_peft_model(base, config) if method == "hyperadalora" else peft.get_peft_model(base, config)
    steps = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            steps[state.global_step] = allocation(model)

    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=STEPS, learning_rate=0.5, optim="sgd", seed=0,
                             per_device_train_batch_size=BATCH // accumulation,
                             gradient_accumulation_steps=accumulation, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trainer = recording(ha.HyperAdaLoraTrainer)(model=model, args=args, train_dataset=TokenDataset(),
                                                 callbacks=[Spy()])
    trainer.micro_losses = {}
    if not items:
        trainer.model_accepts_loss_kwargs = False   # Trainer then counts no num_items_in_batch
    trainer.train()
    state = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    target = getattr(trainer.model, "allocator", None)
    if target is not None and target.ipt is not None:
        state["allocator.ipt"], state["allocator.unc"] = target.ipt.clone(), target.unc.clone()
    return {"losses": {s: sum(ls) for s, ls in trainer.micro_losses.items()}, "steps": steps, "state": state}


def assert_same_run(a, b):
    assert sorted(a["losses"]) == sorted(b["losses"]) == list(range(1, STEPS + 1))
    for step in a["losses"]:
        assert a["losses"][step] == pytest.approx(b["losses"][step], rel=RTOL, abs=0), (step, a["losses"],
                                                                                        b["losses"])
    for step in a["steps"]:
        x, y = a["steps"][step], b["steps"][step]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                                            for k in x), step
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:   # (the importance EMAs: ~1e-6, relative)
        rtol, atol = (1e-3, 1e-10) if name.startswith("allocator.") else (RTOL, 1e-6)
        assert torch.allclose(a["state"][name], b["state"][name], rtol=rtol, atol=atol), (
            name, (a["state"][name] - b["state"][name]).abs().max())


@pytest.mark.parametrize("method", ["hyperadalora", "adalora"])
@pytest.mark.parametrize("items", [True, False], ids=["num_items_in_batch", "mean_per_micro_batch"])
def test_accumulated_micro_batches_train_what_one_batch_trains_with_the_regulariser(tmp_path, method, items):
    importance = "magnitude" if method == "hyperadalora" else None   # (the sensitivity: below)
    one = train(tmp_path, "one", method, 1, items, importance)
    two = train(tmp_path, "two", method, 2, items, importance)
    assert_same_run(two, one)
    first, last = one["steps"][1], one["steps"][STEPS]
    assert first != last if "rank_pattern" in first else last["mask"].sum() < first["mask"].sum()  # it did prune


def test_the_regulariser_weight_undoes_the_trainers_scaling_of_the_loss():
    """`_penalty_factor` as transformers 5.23's Trainer scales the loss: with ``num_items_in_batch`` (the loss scaled
    for the accumulation steps) 1 / (processes x accumulation steps), the processes only with
    ``average_tokens_across_devices``; without it (Trainer divides each micro-batch's loss by the steps) 1."""
    from types import SimpleNamespace

    from hyperadalora.callbacks import _penalty_factor

    def trainer(processes=2, steps=3, average=True, accepts=True, scaled=None):
        return SimpleNamespace(model_accepts_loss_kwargs=accepts, compute_loss_func=None, loss_is_scaled_for_ga=scaled,
                               args=SimpleNamespace(average_tokens_across_devices=average, n_gpu=1),
                               accelerator=SimpleNamespace(num_processes=processes), get_tp_size=lambda: 1,
                               current_gradient_accumulation_steps=steps)

    assert _penalty_factor(trainer(), 96) == pytest.approx(1 / 6)
    assert _penalty_factor(trainer(average=False), 96) == pytest.approx(1 / 3)
    assert _penalty_factor(trainer(processes=1, steps=1), 96) == 1.0
    assert _penalty_factor(trainer(), None) == 1.0                   # Trainer divides by the steps itself
    assert _penalty_factor(trainer(accepts=False), 96) == 1.0        # no num_items_in_batch for the model
    assert _penalty_factor(trainer(scaled=False), 96) == pytest.approx(1 / 2)   # a subclass that says it is not
    assert _penalty_factor(trainer(), 96, training=False) == pytest.approx(1 / 2)   # evaluation: no accumulation
    assert _penalty_factor(trainer(), None, training=False) == 1.0


@pytest.mark.parametrize("items", [True, False], ids=["num_items_in_batch", "mean_per_micro_batch"])
def test_sensitivity_importance_is_that_of_the_whole_step(tmp_path, items):
    """HyperAdaLoRA's importance='sensitivity' reads the gradients of the generated tensors, which every micro-batch
    generates anew: the importance of an optimizer step sums them over its micro-batches (peft's AdaLoRA reads
    p.grad, which accumulates), so the masks and the importance EMAs are those of one batch."""
    one = train(tmp_path, "one", "hyperadalora", 1, items, importance="sensitivity")
    two = train(tmp_path, "two", "hyperadalora", 2, items, importance="sensitivity")
    assert "allocator.ipt" in one["state"]
    assert_same_run(two, one)
