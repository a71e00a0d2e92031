"""RankAllocationCallback with a real transformers.Trainer: HyperAdaLoRA and peft's AdaLoRA reach their target rank,
counting optimizer steps (not micro-batches); any other model is refused at on_train_begin."""

import warnings

import peft
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert

MAX_STEPS = 12



class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8, vocab=100, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.labels[i]}


def make_trainer(model, tmp_path, callback, default_optimizer=False, **overrides):
    """A plain Trainer; for this package's models with the optimizer the README shows (the hypernetworks' own
    learning rates), unless ``default_optimizer``."""
    kw = dict(output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=4, report_to=[],
              use_cpu=True, save_strategy="no", logging_strategy="no", remove_unused_columns=False,
              disable_tqdm=True, learning_rate=1e-3, seed=0, dataloader_num_workers=0)
    kw.update(overrides)
    optimizers = (None, None)
    if hasattr(model, "optimizer_param_groups") and not default_optimizer:
        optimizers = (torch.optim.AdamW(model.optimizer_param_groups(lr=kw["learning_rate"])), None)
    return Trainer(model=model, args=TrainingArguments(**kw), train_dataset=TinyDataset(), callbacks=[callback],
                   optimizers=optimizers)


def hyper_config(**kw):
    base = dict(init_r=3, target_r=1, total_step=MAX_STEPS, tinit=2, tfinal=3, deltaT=2, target_modules=BERT_TARGETS,
                task_type="SEQ_CLS", hypernet="mlp", hypernet_dim=16)
    base.update(kw)
    return ha.HyperAdaLoraConfig(**base)


def record_steps(model):
    """Spy on update_and_allocate: the steps it is called with."""
    steps = []
    original = model.update_and_allocate

    def spy(step):
        steps.append(step)
        return original(step)

    model.update_and_allocate = spy
    return steps


# ------------------------------------------------------------------------------------------ HyperAdaLoRA
@pytest.mark.parametrize("importance", ["magnitude", "sensitivity"])
def test_drives_hyperadalora_to_target(tmp_path, importance):
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config(importance=importance))
    n = model.n_layers
    assert n == len(BERT_TARGETS) and model.total_rank == 3 * n
    steps = record_steps(model)
    cb = ha.RankAllocationCallback()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*update_and_allocate.. was not called.*")
        make_trainer(model, tmp_path, cb).train()
    assert cb.calls == MAX_STEPS
    assert steps == list(range(1, MAX_STEPS + 1))  # 1-based optimizer steps
    assert model.allocator.last_step == MAX_STEPS
    assert model.total_rank == 1 * n
    assert sum(model.rank_pattern.values()) == 1 * n
    assert model.allocator.n_maskings >= 2  # pruned gradually (steps 4, 6, 8 and 9), not only at the end
    assert not model._warned_no_allocate


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    steps = record_steps(model)
    cb = ha.RankAllocationCallback()
    trainer = make_trainer(model, tmp_path, cb, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    assert cb.calls == MAX_STEPS  # once per optimizer step, not per micro-batch (24 here)
    assert steps == list(range(1, MAX_STEPS + 1))
    assert model.total_rank == 1 * model.n_layers


def test_remove_unused_columns_keeps_the_inputs(tmp_path):
    # Trainer's default remove_unused_columns=True keeps only the columns named by the model's forward signature.
    # HyperAdaLoraModel.forward(*args, **kwargs) must expose the base model's (input_ids, attention_mask, labels...)
    # or every column is dropped.
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    cb = ha.RankAllocationCallback()
    make_trainer(model, tmp_path, cb, remove_unused_columns=True).train()
    assert cb.calls == MAX_STEPS
    assert model.total_rank == 1 * model.n_layers


def test_trainer_evaluate_sees_the_labels(tmp_path):
    # Trainer takes label_names / can_return_loss from the *class* signature of forward; with
    # HyperAdaLoraModel.forward(*args, **kwargs) it finds no labels: evaluate() then reports no eval_loss and never
    # calls compute_metrics (unless the user passes TrainingArguments(label_names=["labels"])).
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    seen = []
    trainer = make_trainer(model, tmp_path, ha.RankAllocationCallback())
    trainer.compute_metrics = lambda pred: seen.append(pred.label_ids) or {}
    metrics = trainer.evaluate(TinyDataset(n=8))
    assert "eval_loss" in metrics
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (8,)


# ------------------------------------------------------------------------------------------ peft's AdaLoRA
def test_drives_peft_adalora(tmp_path):
    config = peft.AdaLoraConfig(init_r=3, target_r=1, total_step=MAX_STEPS, tinit=2, tfinal=3, deltaT=2,
                                target_modules=["query", "value"], task_type="SEQ_CLS", lora_alpha=8)
    model = peft.get_peft_model(make_bert(num_layers=2), config)
    assert model.peft_config["default"].rank_pattern is None
    allocating = model.base_model
    steps = record_steps(allocating)
    cb = ha.RankAllocationCallback()
    make_trainer(model, tmp_path, cb).train()
    assert cb.calls == MAX_STEPS
    assert steps == list(range(1, MAX_STEPS + 1))
    rank_pattern = model.peft_config["default"].rank_pattern
    assert rank_pattern, "peft's rank_pattern was never set: update_and_allocate did not reach total_step - tfinal"
    n_layers = 2 * 2  # query and value in 2 layers
    assert len(rank_pattern) == n_layers
    assert sum(sum(bool(x) for x in mask) for mask in rank_pattern.values()) == 1 * n_layers


# ------------------------------------------------------------------------------------------ other models
def test_plain_model_is_refused_by_trainer(tmp_path):
    cb = ha.RankAllocationCallback()
    trainer = make_trainer(make_bert(num_layers=1), tmp_path, cb)
    with pytest.raises(ValueError, match=r"RankAllocationCallback needs a HyperAdaLoRA model or a peft AdaLoRA "
                                         r"model; got BertForSequenceClassification"):
        trainer.train()
    assert cb.calls == 0


def test_peft_lora_is_refused():
    model = peft.get_peft_model(make_bert(num_layers=1), peft.LoraConfig(r=2, target_modules=["query"]))
    cb = ha.RankAllocationCallback()
    with pytest.raises(ValueError, match=r"HyperAdaLoRA model or a peft AdaLoRA model; got PeftModel"):
        cb.on_train_begin(None, None, None, model=model)


def test_fixed_hyperadalora_is_refused(tmp_path):
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    model.save_pretrained(str(tmp_path))
    loaded = ha.load_adapter(make_bert(num_layers=1), str(tmp_path))
    assert loaded.fixed
    with pytest.raises(ValueError, match="RankAllocationCallback needs"):
        ha.RankAllocationCallback().on_train_begin(None, None, None, model=loaded)


def test_wrapped_model_is_unwrapped():
    class Wrapper(torch.nn.Module):  # as DDP / accelerate: the real model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    cb = ha.RankAllocationCallback()
    cb.on_train_begin(None, None, None, model=Wrapper(model))

    class State:
        global_step = 0

    model.train()
    model(**{k: v.unsqueeze(0) for k, v in TinyDataset()[0].items()}).loss.backward()
    cb.on_optimizer_step(None, State(), None, model=Wrapper(model))
    assert cb.calls == 1 and model.allocator.last_step == 1


# ------------------------------------------------------------------------------------------ the hypernetworks' lr
def test_plain_trainer_optimizer_is_flagged(tmp_path):
    # Trainer's default optimizer puts the row embeddings at the run's lr, not feature_lr_ratio (30) x lr
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    with pytest.warns(UserWarning, match=r"no parameter group for the hypernetworks' feature_embeddings at 30x the "
                                         r"learning rate.*HyperAdaLoraTrainer"):
        make_trainer(model, tmp_path, ha.RankAllocationCallback(), default_optimizer=True).train()


class LrSpy(TrainerCallback):
    """The lr of every named group as the optimizer step uses it."""

    def __init__(self):
        self.lrs = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append({g.get("name"): g["lr"] for g in optimizer.param_groups})


def test_hyperadalora_trainer_builds_the_hypernetwork_groups_and_their_schedule(tmp_path):
    from hyperadalora.generator import feature_lr_multiplier

    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config(feature_lr_ratio_final=3.0))
    spy = LrSpy()
    kw = dict(output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=4, report_to=[],
              use_cpu=True, save_strategy="no", logging_strategy="no", remove_unused_columns=False,
              disable_tqdm=True, learning_rate=1e-3, seed=0, dataloader_num_workers=0, gradient_accumulation_steps=2)
    trainer = ha.HyperAdaLoraTrainer(model=model, args=TrainingArguments(**kw), train_dataset=TinyDataset(),
                                     callbacks=[spy])
    assert sum(isinstance(cb, ha.RankAllocationCallback) for cb in trainer.callback_handler.callbacks) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no parameter group.*")
        trainer.train()
    assert {g["name"] for g in trainer.optimizer.param_groups} >= {"hypernetworks", "feature_embeddings",
                                                                     "modules_to_save"}
    assert len(spy.lrs) == MAX_STEPS
    for step, lrs in enumerate(spy.lrs):  # the Trainer's linear decay on every group, the rows' schedule on top
        expected = 30.0 * feature_lr_multiplier(model.peft_config, step, MAX_STEPS)
        assert lrs["feature_embeddings"] / lrs["hypernetworks"] == pytest.approx(expected)
        assert lrs["modules_to_save"] == pytest.approx(lrs["hypernetworks"])
    assert spy.lrs[-1]["feature_embeddings"] / spy.lrs[-1]["hypernetworks"] == pytest.approx(3.0)
    assert model.total_rank == 1 * model.n_layers            # rank allocation ran (callback added by the trainer)


def test_hyperadalora_trainer_warms_up_the_hypernetworks(tmp_path):
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config(hypernet_warmup_steps=2))
    spy = LrSpy()
    trainer = ha.HyperAdaLoraTrainer(model=model, args=make_trainer(model, tmp_path, spy).args,
                                     train_dataset=TinyDataset(), callbacks=[spy])
    trainer.train()
    warmup = [0.5, 1.0] + [1.0] * (MAX_STEPS - 2)
    assert len(spy.lrs) == MAX_STEPS
    for step, lrs in enumerate(spy.lrs):  # the heads at the Trainer's lr, both hypernetwork groups warmed up
        assert lrs["hypernetworks"] / lrs["modules_to_save"] == pytest.approx(warmup[step])
        assert lrs["feature_embeddings"] / lrs["modules_to_save"] == pytest.approx(30.0 * warmup[step])


def test_hyperadalora_trainer_runs_generated_methods_and_peft_adalora(tmp_path):
    hyper = ha.get_peft_model(make_bert(num_layers=1), ha.HyperLoraConfig(r=2, target_modules=["query", "value"],
                                                                          task_type="SEQ_CLS", hypernet="mlp"))
    trainer = ha.HyperAdaLoraTrainer(model=hyper, args=make_trainer(hyper, tmp_path / "a", LrSpy()).args,
                                     train_dataset=TinyDataset())
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert ha.HypernetworkLrCallback in kinds and ha.RankAllocationCallback not in kinds
    trainer.train()
    assert "feature_embeddings" in {g.get("name") for g in trainer.optimizer.param_groups}

    config = peft.AdaLoraConfig(init_r=3, target_r=1, total_step=MAX_STEPS, tinit=2, tfinal=3, deltaT=2,
                                target_modules=["query", "value"], task_type="SEQ_CLS", lora_alpha=8)
    adalora = peft.get_peft_model(make_bert(num_layers=1), config)
    trainer = ha.HyperAdaLoraTrainer(model=adalora, args=make_trainer(adalora, tmp_path / "b", LrSpy()).args,
                                     train_dataset=TinyDataset())
    trainer.train()  # peft's AdaLoRA: Trainer's own optimizer, rank allocation by the added callback
    assert adalora.peft_config["default"].rank_pattern


def test_total_step_that_differs_from_the_trainers_steps_is_flagged(tmp_path):
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config(total_step=MAX_STEPS * 10))
    trainer = ha.HyperAdaLoraTrainer(model=model, args=make_trainer(model, tmp_path, LrSpy()).args,
                                     train_dataset=TinyDataset())
    with pytest.warns(UserWarning, match=rf"assumes total_step={MAX_STEPS * 10} optimizer steps, but the Trainer "
                                         rf"will take {MAX_STEPS}.*Set total_step={MAX_STEPS}"):
        trainer.train()
