"""Gradient checkpointing: the same per-step losses (bit for bit) with and without it, for every method, in a plain
training loop (with dropout: the recomputation replays the RNG), through the training
loop's ``gradient_checkpointing`` flag, and under `HyperAdaLoraTrainer` with Trainer's own
``gradient_checkpointing=True``; and the layers really are recomputed in backward."""

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert
from hyperadalora import get_peft_model
from hyperadalora.quantization import enable_gradient_checkpointing
from test_every_method import EVERY, OURS, config_cls, is_generated

STEPS = 5


def bert_with_dropout(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(cfg)


def config(method):
    if method == "hyperadalora":
        return ha.HyperAdaLoraConfig(init_r=4, target_r=2, total_step=STEPS, tinit=1, tfinal=1, deltaT=1,
                                     lora_dropout=0.1, task_type="SEQ_CLS", target_modules=BERT_TARGETS,
                                     hypernet_dim=16)
    return config_cls(method)(r=4, lora_dropout=0.1, task_type="SEQ_CLS", target_modules=BERT_TARGETS,
                              **({"hypernet_dim": 16} if is_generated(method) else {}))


def run(method, checkpointing):
    wrapped = get_peft_model(bert_with_dropout(), config(method))
    if checkpointing:
        enable_gradient_checkpointing(wrapped)
    calls = []
    wrapped.adapters[0].register_forward_hook(lambda *a: calls.append(1))
    wrapped.train()
    opt = torch.optim.AdamW(wrapped.optimizer_param_groups(1e-2), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(123)  # dropout masks
    losses = []
    for step in range(1, STEPS + 1):
        b = {"input_ids": torch.randint(0, 100, (8, 12), generator=g), "labels": torch.randint(0, 2, (8,), generator=g)}
        out = wrapped(**b)
        out.loss.backward()
        opt.step()
        wrapped.update_and_allocate(step)
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses, len(calls), wrapped


@pytest.mark.parametrize("method", OURS)
def test_same_losses_with_and_without_checkpointing(method):
    plain, plain_calls, a = run(method, False)
    ckpt, ckpt_calls, b = run(method, True)
    assert plain_calls == STEPS and ckpt_calls == 2 * STEPS  # recomputed in backward
    assert ckpt == plain  # bit for bit: the recomputation replays the same ops and dropout masks
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    if method == "hyperadalora":
        assert a.rank_pattern == b.rank_pattern


def test_reentrant_checkpointing_is_refused_for_generated_adapters_and_works_for_trained_ones():
    """Reentrant checkpointing runs one backward per layer: the first would free the generation graph that every
    layer's generated tensors share, so it is refused for them. Trained adapters (hydralora) get their gradients:
    the input embeddings' output is made to require grad."""
    from hyperadalora.methods import HydraLoraConfig

    wrapped = get_peft_model(make_bert(), config("hyperlora"))
    with pytest.raises(ValueError, match="use_reentrant=False"):
        wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    wrapped = get_peft_model(make_bert(), HydraLoraConfig(r=4, task_type="SEQ_CLS", target_modules=BERT_TARGETS))
    wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    wrapped.train()
    out = wrapped(input_ids=torch.randint(0, 100, (4, 8)), labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for p in wrapped.adapter_parameters())


def test_a_model_without_checkpointing_support_is_refused():
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.mark.parametrize("method", EVERY)
def test_training_loop_flag_gives_the_same_losses(tmp_path, tokenizer, method):
    from test_train import toy_examples

    from hyperadalora.training import TrainArgs, train

    losses = {}
    for flag in (False, True):
        args = TrainArgs(method=method, max_steps=4, batch_size=8, lr=1e-2, max_length=16, seed=0,
                         gradient_checkpointing=flag, output_dir=str(tmp_path / str(flag)), progress=False,
                         lora_dropout=0.1)
        summary = train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                        train_examples=toy_examples(32), eval_examples=toy_examples(16, seed=1))
        assert summary["args"]["gradient_checkpointing"] is flag
        with open(tmp_path / str(flag) / "metrics.jsonl") as f:
            losses[flag] = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    assert len(losses[True]) == 4 and losses[True] == losses[False]


class LossSpy(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.losses.append(model.last_task_loss.item())


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8):
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(1, 100, (n, seq), generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_hyperadalora_trainer_with_trainers_gradient_checkpointing(tmp_path):
    results = {}
    for flag in (False, True):
        model = get_peft_model(bert_with_dropout(), config("hyperadalora"))
        calls = []
        model.adapters[0].register_forward_hook(lambda *a: calls.append(1))
        spy = LossSpy()
        args = TrainingArguments(output_dir=str(tmp_path / str(flag)), max_steps=STEPS, per_device_train_batch_size=4,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                 remove_unused_columns=False, disable_tqdm=True, learning_rate=1e-2, seed=0,
                                 dataloader_num_workers=0, gradient_checkpointing=flag)
        ha.HyperAdaLoraTrainer(model=model, args=args, train_dataset=TinyDataset(), callbacks=[spy]).train()
        results[flag] = (spy.losses, len(calls), model.rank_pattern)
    assert results[False][1] == STEPS and results[True][1] == 2 * STEPS
    assert len(results[True][0]) == STEPS and results[True][0] == results[False][0]
    assert results[True][2] == results[False][2]
