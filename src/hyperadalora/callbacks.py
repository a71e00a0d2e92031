"""`transformers.Trainer` integration: `RankAllocationCallback`, `HypernetworkLrCallback`, `HyperAdaLoraTrainer`.

Trainer calls `on_optimizer_step` right after ``optimizer.step()`` and before ``zero_grad()``, which is
where AdaLoRA-style allocation must run (it may read gradients). ``state.global_step`` counts optimizer
steps (not micro-batches, peft #1801) and is incremented after this hook, hence ``+ 1``.
`RankAllocationCallback` works for HyperAdaLoRA models and for peft's own AdaLoRA (`PeftModel` with an
`AdaLoraModel` inside).

The hypernetworks train with learning rates of their own (``hypernet_lr_ratio``, ``feature_lr_ratio`` and the
row embeddings' schedule ``feature_lr_ratio_final``), which only an optimizer built from
``model.optimizer_param_groups(lr)`` applies: Trainer's default optimizer puts every parameter at one learning
rate. `HyperAdaLoraTrainer` builds its optimizer from those groups (with the optimizer class and settings of
``TrainingArguments``) and adds the callbacks the model needs; with a plain `Trainer`, `HypernetworkLrCallback`
(which `RankAllocationCallback` includes) warns when the optimizer lacks the groups and applies the schedule.
"""

from __future__ import annotations

import warnings

from transformers import Trainer, TrainerCallback

from .generator import FEATURE_GROUP, HYPERNET_GROUP


def _unwrap(model):
    return getattr(model, "module", model)  # DDP / accelerate wrapper


def _allocating_model(model):
    """The object whose ``update_and_allocate`` must be called, or None."""
    from .model import HyperAdaLoraModel

    model = _unwrap(model)
    if isinstance(model, HyperAdaLoraModel):
        return None if model.fixed else model
    base = getattr(model, "base_model", None)
    if base is not None and type(base).__name__ == "AdaLoraModel" and hasattr(base, "update_and_allocate"):
        return base
    return None


def _total_step(model):
    """The total_step the rank budget schedule of ``model`` was configured with, or None."""
    from .model import HyperAdaLoraModel

    model = _unwrap(model)
    if isinstance(model, HyperAdaLoraModel):
        return model.peft_config.total_step
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        return getattr(config.get(getattr(model, "active_adapter", "default")), "total_step", None)
    return None


def _hypernetwork_model(model):
    """The HyperAdaLoRA / generated-adapter model whose hypernetworks train (their own lr groups), or None."""
    from .methods import GeneratedAdapterModel
    from .model import HyperAdaLoraModel

    model = _unwrap(model)
    if isinstance(model, HyperAdaLoraModel) and not model.fixed:
        return model
    if isinstance(model, GeneratedAdapterModel) and model.generated:
        return model
    return None


class HypernetworkLrCallback(TrainerCallback):
    """The hypernetworks' learning rates under a `Trainer`: warns at the start of training when the optimizer was not
    built from ``model.optimizer_param_groups(lr)`` (the hypernetworks would then train at the run's lr, not at the
    ratios of their config), and moves the row embeddings' lr along their schedule (``feature_lr_ratio`` ->
    ``feature_lr_ratio_final``, on top of the Trainer's own scheduler) before every optimizer step. Does nothing for
    models without hypernetworks."""

    def __init__(self):
        self._set_lr: dict[int, float] = {}  # id(param group) -> the lr this callback gave it

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        target = _hypernetwork_model(model) if model is not None else None
        if target is None or optimizer is None:
            return
        wanted = {g["name"]: g["lr"] for g in target.optimizer_param_groups(1.0) if g["name"] in
                  (HYPERNET_GROUP, FEATURE_GROUP)}
        have = {g.get("name") for g in optimizer.param_groups}
        missing = sorted(name for name, ratio in wanted.items() if ratio != 1.0 and name not in have)
        if missing:
            ratios = ", ".join(f"{name} at {wanted[name]:g}x" for name in missing)
            warnings.warn(f"The optimizer has no parameter group for the hypernetworks' {ratios} the learning rate: "
                          f"every hypernetwork parameter trains at the run's lr, which is not the method as "
                          f"configured (it learns slower). Use hyperadalora.HyperAdaLoraTrainer, or pass "
                          f"optimizers=(torch.optim.AdamW(model.optimizer_param_groups(lr=...)), None) to the "
                          f"Trainer.", stacklevel=2)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from .generator import group_lr_factor

        target = _hypernetwork_model(model) if model is not None else None
        if target is None or optimizer is None:
            return
        for group in optimizer.param_groups:
            factor = group_lr_factor(group, target.peft_config, state.global_step, state.max_steps)
            if factor == 1.0:
                continue
            if self._set_lr.get(id(group)) == group["lr"]:
                continue  # already scaled since the scheduler last set it (an extra call within one step)
            group["lr"] = group["lr"] * factor
            self._set_lr[id(group)] = group["lr"]


class RankAllocationCallback(HypernetworkLrCallback):
    """Call ``update_and_allocate(step)`` after every optimizer step of a `Trainer` (and, for HyperAdaLoRA, what
    `HypernetworkLrCallback` does)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and _allocating_model(model) is None:
            raise ValueError("RankAllocationCallback needs a HyperAdaLoRA model or a peft AdaLoRA model; "
                             f"got {type(_unwrap(model)).__name__}.")
        total = _total_step(model) if model is not None else None
        max_steps = getattr(state, "max_steps", None)
        if total is not None and max_steps and total != max_steps:
            warnings.warn(f"The rank budget schedule assumes total_step={total} optimizer steps, but the Trainer will "
                          f"take {max_steps}: the budget reaches its target at the wrong time. Set total_step="
                          f"{max_steps} in the adapter config (or max_steps={total} in TrainingArguments).",
                          stacklevel=2)
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        target = _allocating_model(model)
        if target is not None:
            target.update_and_allocate(state.global_step + 1)
            self.calls += 1


class HyperAdaLoraTrainer(Trainer):
    """A `transformers.Trainer` for this package's models (HyperAdaLoRA, the generated-adapter methods) and peft's
    AdaLoRA: the optimizer is built from ``model.optimizer_param_groups(learning_rate, weight_decay)`` (the
    hypernetworks' own learning rates) with the optimizer class and settings of ``TrainingArguments``; rank
    allocation (`RankAllocationCallback`) and the hypernetworks' lr schedule (`HypernetworkLrCallback`) are added
    unless given. Anything else behaves as `Trainer`."""

    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=callbacks, **kwargs)
        have = [type(cb) for cb in self.callback_handler.callbacks]
        if _allocating_model(self.model) is not None:
            if not any(issubclass(t, RankAllocationCallback) for t in have):
                self.add_callback(RankAllocationCallback())
        elif _hypernetwork_model(self.model) is not None:
            if not any(issubclass(t, HypernetworkLrCallback) for t in have):
                self.add_callback(HypernetworkLrCallback())

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        target = _unwrap(opt_model)
        if self.optimizer is None and hasattr(target, "optimizer_param_groups"):
            groups = target.optimizer_param_groups(self.args.learning_rate, self.args.weight_decay)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)
