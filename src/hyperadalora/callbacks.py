"""`RankAllocationCallback`: drives rank allocation from a `transformers.Trainer`.

Trainer calls `on_optimizer_step` right after ``optimizer.step()`` and before ``zero_grad()``, which is
where AdaLoRA-style allocation must run (it may read gradients). ``state.global_step`` counts optimizer
steps (not micro-batches, peft #1801) and is incremented after this hook, hence ``+ 1``.
Works for HyperAdaLoRA models and for peft's own AdaLoRA (`PeftModel` with an `AdaLoraModel` inside).
"""

from __future__ import annotations

from transformers import TrainerCallback


def _allocating_model(model):
    """The object whose ``update_and_allocate`` must be called, or None."""
    from .model import HyperAdaLoraModel

    model = getattr(model, "module", model)  # DDP / accelerate wrapper
    if isinstance(model, HyperAdaLoraModel):
        return None if model.fixed else model
    base = getattr(model, "base_model", None)
    if base is not None and type(base).__name__ == "AdaLoraModel" and hasattr(base, "update_and_allocate"):
        return base
    return None


class RankAllocationCallback(TrainerCallback):
    """Call ``update_and_allocate(step)`` after every optimizer step of a `Trainer`."""

    def __init__(self):
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and _allocating_model(model) is None:
            raise ValueError("RankAllocationCallback needs a HyperAdaLoRA model or a peft AdaLoRA model; "
                             f"got {type(getattr(model, 'module', model)).__name__}.")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        target = _allocating_model(model)
        if target is not None:
            target.update_and_allocate(state.global_step + 1)
            self.calls += 1
