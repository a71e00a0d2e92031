"""Experiment tracking (`hyperadalora.tracking`): ``--report-to tensorboard`` writes event files with the loss, task
loss, lr, total rank, the rank per layer and a rank heatmap; W&B (offline) and MLflow (a file:// store) receive the
same through fake modules; a missing package is named; `HyperAdaLoraTrainer` hands the ranks to Trainer's own
``report_to``."""

import json
import sys
import types

import pytest
import torch

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert
from hyperadalora import cli, tracking
from hyperadalora.training import TrainArgs, read_metrics, train
from test_train import toy_examples, write_sst2, write_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_cli_report_to_tensorboard_writes_the_scalars_and_the_heatmap(tmp_path, tokenizer):
    model_dir = write_tiny_model(tmp_path / "model", tokenizer)
    data_dir = write_sst2(tmp_path / "glue")
    out = tmp_path / "out"
    code = cli.main(["train", "--task", "sst2", "--data-dir", data_dir, "--model", model_dir, "--output-dir", str(out),
                     "--max-steps", "10", "--batch-size", "8", "--max-length", "16", "--init-r", "3", "--target-r",
                     "1", "--tinit", "2", "--tfinal", "3", "--deltaT", "1", "--lr", "0.005", "--eval-every", "5",
                     "--report-to", "tensorboard", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rows, _ = read_metrics(summary["metrics"])
    acc = read_events(out / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "task_loss", "lr", "total_rank"):
        events = acc.Scalars(f"train/{name}")
        assert [e.step for e in events] == list(range(1, 11))
        assert [e.value for e in events] == pytest.approx([r[name] for r in rows], rel=1e-6)
    layers = summary["rank_pattern"]
    assert len(layers) == 12 and {f"train/rank/{name}" for name in layers} <= tags  # the Trainer path's tag too
    for name, final in layers.items():  # the per-layer curves end at the final rank pattern and sum to total_rank
        assert acc.Scalars(f"train/rank/{name}")[-1].value == final
    totals = [sum(acc.Scalars(f"train/rank/{n}")[i].value for n in layers) for i in range(10)]
    assert totals == [e.value for e in acc.Scalars("train/total_rank")]
    assert totals[0] == 3 * 12 and totals[-1] == 1 * 12  # from init_r to the budget
    assert [e.step for e in acc.Scalars("eval/eval_loss")] == [5, 10]
    images = acc.Images("rank/heatmap")
    assert len(images) == 1 and images[0].step == 10 and images[0].encoded_image_string.startswith(b"\x89PNG")
    assert images[0].width > 100 and images[0].height > 100


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        outer = self

        class Run:
            def log(self, values, step):
                outer.calls.append(("log", step, values))

            def finish(self):
                outer.calls.append(("finish",))

        self.Run = Run

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self.Run()

    def Image(self, fig):
        return ("image", fig.get_size_inches().tolist())


class FakeMlflow(types.ModuleType):
    def __init__(self):
        super().__init__("mlflow")
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def small_run(tmp_path, tokenizer, report_to):
    args = TrainArgs(method="hyperadalora", task="sst2", max_steps=6, batch_size=8, lr=5e-3, max_length=16, seed=0,
                     init_r=2, target_r=1, tinit=1, tfinal=1, deltaT=1, output_dir=str(tmp_path / report_to),
                     progress=False, save_adapter=False, keep_checkpoints=0, report_to=report_to)
    return train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                 train_examples=toy_examples(48), eval_examples=toy_examples(8, seed=1))


def test_wandb_logs_offline_with_the_ranks_and_the_heatmap(tmp_path, tokenizer, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    summary = small_run(tmp_path, tokenizer, "wandb")
    init = fake.calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "wandb") and init["config"]["max_steps"] == 6
    logs = [c for c in fake.calls if c[0] == "log"]
    steps = [c for c in logs if "train/loss" in c[2]]
    assert [c[1] for c in steps] == list(range(1, 7))
    last = steps[-1][2]
    assert last["train/total_rank"] == summary["total_rank"] == 12
    assert {k[len("train/rank/"):]: v for k, v in last.items() if k.startswith("train/rank/")} == summary["rank_pattern"]
    assert any("rank/heatmap" in c[2] and c[2]["rank/heatmap"][0] == "image" for c in logs)
    assert fake.calls[-1] == ("finish",)


def test_mlflow_logs_to_a_local_file_store(tmp_path, tokenizer, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = small_run(tmp_path, tokenizer, "mlflow")
    names = [c[0] for c in fake.calls]
    assert fake.calls[0] == ("set_tracking_uri", ("file://" + str(tmp_path / "mlflow" / "mlruns"),), {})
    assert names[:4] == ["set_tracking_uri", "set_experiment", "start_run", "log_params"]
    metrics = [c for c in fake.calls if c[0] == "log_metrics" and "train/loss" in c[1][0]]
    assert [c[2]["step"] for c in metrics] == list(range(1, 7))
    assert metrics[-1][1][0]["train/total_rank"] == summary["total_rank"]
    figure = [c for c in fake.calls if c[0] == "log_figure"]
    assert len(figure) == 1 and figure[0][1][1] == "rank_heatmap.png"
    assert names[-1] == "end_run"


@pytest.mark.parametrize("report_to", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_named_before_the_model_loads(tmp_path, monkeypatch, report_to):
    monkeypatch.setitem(sys.modules, report_to, None)  # import fails
    args = TrainArgs(task="sst2", model=str(tmp_path / "no-model"), max_steps=5, output_dir=str(tmp_path / "o"),
                     report_to=report_to)
    with pytest.raises(ImportError, match=f"pip install {report_to}"):
        train(args)
    assert not (tmp_path / "o").exists()


def test_report_to_is_validated():
    with pytest.raises(ValueError, match="report_to='comet'"):
        TrainArgs(report_to="comet")


def test_hyperadalora_trainer_reports_the_ranks_to_trainers_own_report_to(tmp_path):
    from transformers import TrainingArguments

    from test_callback import TinyDataset

    config = ha.HyperAdaLoraConfig(init_r=3, target_r=1, total_step=8, tinit=1, tfinal=2, deltaT=1,
                                   target_modules=BERT_TARGETS, task_type="SEQ_CLS", hypernet="mlp", hypernet_dim=16)
    model = ha.get_peft_model(make_bert(), config)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=["tensorboard"], logging_steps=2,
                             use_cpu=True, save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    trainer = ha.HyperAdaLoraTrainer(model=model, args=args, train_dataset=TinyDataset())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["total_rank"] for h in logged][0] > logged[-1]["total_rank"] == 12 == model.total_rank
    assert {k[len("rank/"):]: v for k, v in logged[-1].items() if k.startswith("rank/")} == model.rank_pattern
    acc = read_events(next(tmp_path.rglob("events.out.tfevents.*")).parent)
    assert acc.Scalars("train/total_rank")[-1].value == 12
    assert {f"train/rank/{n}" for n in model.rank_pattern} <= set(acc.Tags()["scalars"])


def test_rank_per_layer_of_peft_models():
    import peft

    from hyperadalora.training import total_rank

    lora = peft.get_peft_model(make_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    ranks = tracking.rank_per_layer(lora)
    assert len(ranks) == 4 and set(ranks.values()) == {4} and sum(ranks.values()) == total_rank(lora)
    adalora = peft.get_peft_model(make_bert(), peft.AdaLoraConfig(init_r=3, target_r=1, total_step=10,
                                                                  target_modules=["query", "value"]))
    ranks = tracking.rank_per_layer(adalora)
    assert len(ranks) == 4 and sum(ranks.values()) == total_rank(adalora) == 12
    with pytest.raises(TypeError, match="adapter model"):
        tracking.rank_per_layer(torch.nn.Linear(2, 2))
