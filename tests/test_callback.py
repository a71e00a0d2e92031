"""RankAllocationCallback with a real transformers.Trainer: HyperAdaLoRA and peft's AdaLoRA reach their target rank,
counting optimizer steps (not micro-batches); any other model is refused at on_train_begin. HyperAdaLoraTrainer's
checkpoints and save_model: the adapter (load_adapter) and the training state, not the base model; exact resume and
load_best_model_at_end."""

import os
import re
import warnings

import peft
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert
from test_every_method import OURS

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


# ------------------------------------------------------------------------------------------ checkpoints and save_model
def hyper_trainer(model, out, callbacks=(), **overrides):
    kw = dict(output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, report_to=[], use_cpu=True,
              save_strategy="steps", save_steps=MAX_STEPS // 2, logging_strategy="no", remove_unused_columns=False,
              disable_tqdm=True, learning_rate=1e-3, seed=0, dataloader_num_workers=0)
    extra = {k: overrides.pop(k) for k in ("eval_dataset", "compute_metrics", "processing_class", "data_collator")
             if k in overrides}
    kw.update(overrides)
    return ha.HyperAdaLoraTrainer(model=model, args=TrainingArguments(**kw), train_dataset=TinyDataset(),
                                  callbacks=list(callbacks), **extra)


class LossSpy(TrainerCallback):
    """The task loss of every optimizer step, exactly (not the rounded logged value)."""

    def __init__(self):
        self.losses = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.losses[state.global_step] = model.last_task_loss.item()


def file_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def base_names(path):
    """The keys of a safetensors file as names of the transformers model's parameters."""
    return {k.removeprefix("model.").removeprefix("base_model.").removeprefix("modules_to_save.")
            .replace(".base_layer.", ".") for k in file_keys(path)}


def dir_bytes(path, names):
    return sum(os.path.getsize(os.path.join(path, n)) for n in names)


def method_config(method):
    """A small config of one of `hyperadalora.methods` (rank 2 on query and value; small MLP hypernetworks)."""
    from test_every_method import config_cls, is_generated

    return config_cls(method)(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                              **({"hypernet": "mlp", "hypernet_dim": 16} if is_generated(method) else {}))


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


EVAL_BATCH = {"input_ids": TinyDataset(n=8, seed=3).input_ids, "attention_mask": torch.ones(8, 8, dtype=torch.long)}
BIG_BERT = dict(num_layers=1, hidden=64, vocab=1000)  # the base model outweighs the hypernetworks


def test_checkpoint_holds_the_adapter_and_training_state_not_the_base_model(tmp_path):
    from safetensors.torch import load_file

    model = ha.get_peft_model(make_bert(**BIG_BERT), hyper_config())
    frozen = {n.replace(".base_layer.", ".") for n, p in model.base_model.named_parameters() if not p.requires_grad}
    assert "bert.embeddings.word_embeddings.weight" in frozen
    # what Trainer writes for this model: the whole state dict, base model included
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "whole"), report_to=[], use_cpu=True)
            ).save_model(str(tmp_path / "whole"))
    whole = os.path.getsize(tmp_path / "whole" / "model.safetensors")
    assert frozen <= base_names(tmp_path / "whole" / "model.safetensors")

    hyper_trainer(model, tmp_path / "run").train()
    for step in (MAX_STEPS // 2, MAX_STEPS):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        names = set(os.listdir(ckpt))
        assert {"adapter_model.safetensors", "hyperadalora_config.json", "training_state.safetensors",
                "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"} <= names
        assert "model.safetensors" not in names
        for file in ("adapter_model.safetensors", "training_state.safetensors"):
            keys = base_names(ckpt / file)
            assert keys and not keys & frozen, f"{file} holds frozen base weights: {sorted(keys & frozen)[:3]}"
            assert not any("base_layer" in k or "bert.embeddings" in k for k in file_keys(ckpt / file))
        small = dir_bytes(ckpt, ["adapter_model.safetensors", "training_state.safetensors"])
        assert small * 4 < whole, (small, whole)
    state = load_file(str(tmp_path / "run" / f"checkpoint-{MAX_STEPS}" / "training_state.safetensors"))
    assert torch.equal(state["allocator.mask"], model.allocator.mask.cpu())  # the masks of the last step

    # the adapter of the last checkpoint is the trained model's
    loaded = ha.load_adapter(make_bert(**BIG_BERT), str(tmp_path / "run" / f"checkpoint-{MAX_STEPS}"))
    assert loaded.rank_pattern == model.rank_pattern and model.total_rank == model.n_layers
    torch.testing.assert_close(outputs(loaded, EVAL_BATCH), outputs(model, EVAL_BATCH), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs(loaded, EVAL_BATCH), outputs(make_bert(**BIG_BERT), EVAL_BATCH), atol=1e-4)


@pytest.mark.parametrize("method", OURS)
def test_resume_from_a_mid_run_checkpoint_is_exact(tmp_path, method):
    from hyperadalora.checkpoint import model_state

    def make():
        config = hyper_config(importance="sensitivity") if method == "hyperadalora" else method_config(method)
        return ha.get_peft_model(make_bert(num_layers=1), config)

    straight, spy = make(), LossSpy()
    hyper_trainer(straight, tmp_path / "a", [spy]).train()
    mid = tmp_path / "a" / f"checkpoint-{MAX_STEPS // 2}"

    resumed, spy2 = make(), LossSpy()
    trainer = hyper_trainer(resumed, tmp_path / "b", [spy2])
    trainer.train(resume_from_checkpoint=str(mid))
    assert trainer.state.global_step == MAX_STEPS
    assert sorted(spy2.losses) == list(range(MAX_STEPS // 2 + 1, MAX_STEPS + 1))
    assert spy2.losses == {s: spy.losses[s] for s in spy2.losses}  # bit for bit
    assert len(set(spy.losses.values())) > 1
    tensors, meta = model_state(straight)
    tensors2, meta2 = model_state(resumed)
    meta.pop("mask_version", None), meta2.pop("mask_version", None)  # a cache key (bumped by a load)
    assert meta2 == meta and tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert resumed.rank_pattern == straight.rank_pattern
    if method == "hyperadalora":
        assert resumed.total_rank == resumed.n_layers and "allocator.ipt" in tensors  # the EMAs travel too
        assert meta["allocator"]["n_maskings"] >= 2
    # and the final checkpoints are the same adapter
    a = ha.load_adapter(make_bert(num_layers=1), str(tmp_path / "a" / f"checkpoint-{MAX_STEPS}"))
    b = ha.load_adapter(make_bert(num_layers=1), str(tmp_path / "b" / f"checkpoint-{MAX_STEPS}"))
    assert torch.equal(outputs(a, EVAL_BATCH), outputs(b, EVAL_BATCH))


@pytest.mark.filterwarnings("ignore:The rank budget schedule assumes")  # stopped halfway on purpose
def test_resume_refuses_another_run_and_a_corrupted_training_state(tmp_path):
    """resume_from_checkpoint continues the run the checkpoint records: a model built with other adapter options or
    TrainingArguments that define another run are refused, naming what differs; a flipped byte in the training
    state is refused, naming the file (safetensors alone would load it)."""
    from hyperadalora.checkpoint import CheckpointError

    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    hyper_trainer(model, tmp_path / "a", max_steps=MAX_STEPS // 2).train()
    ckpt = tmp_path / "a" / f"checkpoint-{MAX_STEPS // 2}"
    other = ha.get_peft_model(make_bert(num_layers=1), hyper_config(momentum=0.9))
    with pytest.raises(CheckpointError, match=r"another run than this one \(momentum: checkpoint .*, now 0.9\)"):
        hyper_trainer(other, tmp_path / "b").train(resume_from_checkpoint=str(ckpt))
    same = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    with pytest.raises(CheckpointError, match=r"learning_rate: checkpoint 0.001, now 0.01"):
        hyper_trainer(same, tmp_path / "c", learning_rate=1e-2).train(resume_from_checkpoint=str(ckpt))
    state = ckpt / "training_state.safetensors"
    data = bytearray(state.read_bytes())
    data[-5] ^= 0x10  # in the tensor data, past the header
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(state))} is corrupted"):
        hyper_trainer(same, tmp_path / "d").train(resume_from_checkpoint=str(ckpt))


@pytest.mark.filterwarnings("ignore:The rank budget schedule assumes")  # stopped halfway on purpose
def test_an_older_whole_model_checkpoint_is_still_read(tmp_path):
    from safetensors.torch import load_file

    class WholeModelTrainer(ha.HyperAdaLoraTrainer):  # how checkpoints were written before
        _save = Trainer._save

    runs = {}
    for name, cls in (("new", ha.HyperAdaLoraTrainer), ("old", WholeModelTrainer)):
        model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
        cls(model=model, args=hyper_trainer(model, tmp_path / name, max_steps=MAX_STEPS // 2).args,
            train_dataset=TinyDataset()).train()
        runs[name] = tmp_path / name / f"checkpoint-{MAX_STEPS // 2}"
    assert "model.safetensors" in os.listdir(runs["old"])
    assert "training_state.safetensors" not in os.listdir(runs["old"])

    fresh = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    hyper_trainer(fresh, tmp_path / "b")._load_from_checkpoint(str(runs["old"]))  # Trainer's own loading
    reference = load_file(str(runs["new"] / "training_state.safetensors"))
    generators = {k: v for k, v in fresh.generators.state_dict().items()}
    assert generators and all(torch.equal(v, reference[f"model.generators.{k}"]) for k, v in generators.items())
    # the whole-model file never held the rank allocator (not a module): its masks are lost, so such a resume is
    # not exact (only the hypernetworks and heads come back)
    assert fresh.allocator.mask.all() and not reference["allocator.mask"].all()


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from hyperadalora.checkpoint import model_state

    scores = iter([1.0, 0.0])  # the first evaluation (step 6) is the best
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    trainer = hyper_trainer(model, tmp_path, eval_strategy="steps", eval_steps=MAX_STEPS // 2,
                            load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                            eval_dataset=TinyDataset(n=8), compute_metrics=lambda pred: {"score": next(scores)})
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{MAX_STEPS // 2}")
    best = load_file(str(tmp_path / f"checkpoint-{MAX_STEPS // 2}" / "training_state.safetensors"))
    last = load_file(str(tmp_path / f"checkpoint-{MAX_STEPS}" / "training_state.safetensors"))
    now = model_state(model)[0]
    assert now.keys() == best.keys()
    assert all(torch.equal(now[k], best[k]) for k in best)
    assert not all(torch.equal(now[k], last[k]) for k in last)
    assert model.allocator.last_step == MAX_STEPS // 2 and torch.equal(model.allocator.mask.cpu(),
                                                                         best["allocator.mask"])


@pytest.mark.parametrize("method", OURS)
def test_save_model_writes_a_loadable_adapter(tmp_path, method):
    from transformers import AutoTokenizer, default_data_collator

    from hyperadalora.base_models import minilm_path

    config = (hyper_config(total_step=4, tinit=1, tfinal=1, deltaT=1) if method == "hyperadalora"
              else method_config(method))
    model = ha.get_peft_model(make_bert(num_layers=1), config)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    trainer = hyper_trainer(model, tmp_path / "run", save_strategy="no", max_steps=4, processing_class=tokenizer,
                            data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    names = set(os.listdir(tmp_path / "final"))
    config_name = "hyperadalora_config.json" if method == "hyperadalora" else "method_config.json"
    assert {"adapter_model.safetensors", config_name, "training_state.safetensors", "training_args.bin",
            "tokenizer_config.json"} <= names
    assert "model.safetensors" not in names
    loaded = ha.load_adapter(make_bert(num_layers=1), str(tmp_path / "final"))
    assert loaded.rank_pattern == model.rank_pattern
    torch.testing.assert_close(outputs(loaded, EVAL_BATCH), outputs(model, EVAL_BATCH), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_training_state_is_refused(tmp_path):
    model = ha.get_peft_model(make_bert(num_layers=1), hyper_config())
    model.save_pretrained(str(tmp_path / "adapter"))  # an adapter only: nothing to resume training from
    trainer = hyper_trainer(model, tmp_path / "run")
    with pytest.raises(ValueError, match="has no training_state.safetensors"):
        trainer._load_from_checkpoint(str(tmp_path / "adapter"))


def test_other_models_keep_the_trainers_saving(tmp_path):
    lora = peft.get_peft_model(make_bert(num_layers=1), peft.LoraConfig(r=2, target_modules=["query"]))
    hyper_trainer(lora, tmp_path / "lora").save_model(str(tmp_path / "lora"))
    names = set(os.listdir(tmp_path / "lora"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names  # peft's own adapter
    assert not names & {"training_state.safetensors", "hyperadalora_config.json", "model.safetensors"}

    plain = make_bert(num_layers=1)
    hyper_trainer(plain, tmp_path / "plain").save_model(str(tmp_path / "plain"))
    names = set(os.listdir(tmp_path / "plain"))
    assert {"config.json", "model.safetensors"} <= names and "training_state.safetensors" not in names


def test_trainer_accepts_the_adapter_model_of_a_quantized_base():
    # Trainer refuses a quantized model without adapters (a bitsandbytes base; SmolLM2 converted from GGUF keeps
    # quantization_config in its config): with this package's adapters attached it must train
    import types

    from transformers.trainer_utils import validate_quantization_for_training

    from conftest import make_llama

    base = make_llama()
    base.is_quantized = True
    base.hf_quantizer = types.SimpleNamespace(is_trainable=True, is_qat_trainable=False)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)
    wrapped = ha.get_peft_model(base, ha.HyperAdaLoraConfig(init_r=2, target_r=1, total_step=10, tinit=1, tfinal=2,
                                                            target_modules=["q_proj"], task_type="CAUSAL_LM"))
    validate_quantization_for_training(wrapped)
    assert not getattr(base, "_hf_peft_config_loaded")  # the base model itself is left as it was
