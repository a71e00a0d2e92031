"""The training loop and the CLI, end to end on a tiny BERT (no network, no shared data)."""

import json
import re

import pytest
import torch

from conftest import WORDS_NEG, WORDS_POS, toy_examples  # noqa: F401 (other tests import them from here)
from conftest import make_bert
from hyperadalora import cli
from hyperadalora.training import TrainArgs, read_metrics, train
from test_every_method import EVERY

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_row_embedding_lr_follows_its_schedule(tmp_path, tokenizer):
    # feature_lr_ratio 30 -> feature_lr_ratio_final 1, geometrically, on top of the run's linear decay
    args = TrainArgs(method="hyperadalora", task="sst2", max_steps=5, batch_size=8, lr=1e-3, max_length=16, seed=0,
                     output_dir=str(tmp_path / "run"), progress=False, tinit=1, tfinal=1, deltaT=1,
                     hyper={"feature_lr_ratio": 30.0, "feature_lr_ratio_final": 1.0})
    summary = train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                    train_examples=toy_examples(64), eval_examples=toy_examples(8, seed=1))
    rows, _ = read_metrics(summary["metrics"])
    for i, row in enumerate(rows):
        decay = (5 - i) / 5                                  # the run's linear schedule at 0-based step i
        assert row["lr"] == pytest.approx(1e-3 * decay)      # the run's scheduled lr
        assert row["lr_rows"] == pytest.approx(1e-3 * decay * 30.0 * (1 / 30.0) ** (i / 4))
    assert summary["hypernetwork_options"]["feature_lr_ratio_final"] == 1.0
    constant = train(TrainArgs(**{**args.__dict__, "output_dir": str(tmp_path / "constant"),
                                  "hyper": {"hypernet_lr_ratio": 3.0}}),
                     model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                     train_examples=toy_examples(64), eval_examples=toy_examples(8, seed=1))
    rows, _ = read_metrics(constant["metrics"])
    assert [r["lr_rows"] for r in rows] == pytest.approx([r["lr"] * 30.0 for r in rows])
    # "lr" is the run's lr, not the first group's (the bodies, here at 3x)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * (5 - i) / 5 for i in range(5)])


def test_hypernetwork_warmup_in_the_training_loop(tmp_path, tokenizer):
    # hypernet_warmup_steps=3: the row embeddings' lr rises over 3 steps, on top of the run's linear decay
    args = TrainArgs(method="hyperadalora", task="sst2", max_steps=5, batch_size=8, lr=1e-3, max_length=16, seed=0,
                     output_dir=str(tmp_path / "run"), progress=False, tinit=1, tfinal=1, deltaT=1,
                     hyper={"hypernet_warmup_steps": 3})
    summary = train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                    train_examples=toy_examples(64), eval_examples=toy_examples(8, seed=1))
    rows, _ = read_metrics(summary["metrics"])
    warmup = [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert [r["lr_rows"] for r in rows] == pytest.approx([1e-3 * (5 - i) / 5 * 30.0 * warmup[i] for i in range(5)])
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * (5 - i) / 5 for i in range(5)])
    assert summary["hypernetwork_options"]["hypernet_warmup_steps"] == 3


@pytest.mark.parametrize("method", ["hyperadalora", "adalora", "lora"])
def test_short_run_lowers_the_loss(tmp_path, tokenizer, method):
    # AdaLoRA and HyperAdaLoRA (increment_scale='width') start from lambda = 0 and move it by ~lr per step: they need
    # a larger lr to move in 30 steps.
    lr = 5e-3 if method == "lora" else 5e-2
    args = TrainArgs(method=method, task="sst2", max_steps=30, batch_size=8, lr=lr, max_length=16, seed=0,
                     output_dir=str(tmp_path / method), progress=False, tinit=3, tfinal=5, deltaT=2)
    model = make_bert(vocab=tokenizer.vocab_size, hidden=32)
    summary = train(args, model=model, tokenizer=tokenizer, train_examples=toy_examples(64),
                    eval_examples=toy_examples(16, seed=1))
    rows, evals = read_metrics(summary["metrics"])
    assert len(rows) == 30
    for key in ("step", "loss", "task_loss", "lr", "time", "total_rank"):
        assert key in rows[0]
    first = sum(r["task_loss"] for r in rows[:5]) / 5
    last = sum(r["task_loss"] for r in rows[-5:]) / 5
    assert last < first, (method, first, last)
    assert evals and evals[-1]["final"] and "accuracy" in evals[-1]
    if method in ("hyperadalora", "adalora"):
        assert rows[-1]["total_rank"] == 2 * 12  # target_r * n_layers (2 BERT layers x 6 projections)
        assert all(r["loss"] >= r["task_loss"] - 1e-6 for r in rows)
    assert (tmp_path / method / "summary.json").is_file()
    assert (tmp_path / method / "adapter").is_dir()


@pytest.mark.parametrize("method", EVERY)
def test_wrapping_a_model_shows_no_deprecation_warning_of_a_dependency(method):
    # peft's PeftModel reads transformers 5's deprecated ``is_gradient_checkpointing``: a FutureWarning the user
    # can do nothing about; the wrapper keeps it out of their log (and leaves every other warning alone).
    import warnings

    from hyperadalora.training import build_adapter_model

    args = TrainArgs(method=method, task="sst2", max_steps=10, tinit=2, tfinal=2, deltaT=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped, _ = build_adapter_model(args, make_bert(), "SEQ_CLS")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) > 0


def test_same_data_order_for_every_method(tmp_path, tokenizer):
    """Every method with the same seed sees the same batches and starts as the identity: their first-step task
    losses are equal."""
    first = {}
    for method in EVERY:
        args = TrainArgs(method=method, task="sst2", max_steps=4, batch_size=8, max_length=16, seed=3,
                         output_dir=str(tmp_path / method), progress=False, tinit=0, tfinal=1, save_adapter=False)
        summary = train(args, model=make_bert(vocab=tokenizer.vocab_size), tokenizer=tokenizer,
                        train_examples=toy_examples(64), eval_examples=toy_examples(8))
        first[method] = read_metrics(summary["metrics"])[0][0]["task_loss"]
    assert set(first) >= {"hyperadalora", "adalora", "lora", "hyperlora", "hydralora"}
    for method, loss in first.items():
        assert loss == pytest.approx(first["adalora"], abs=1e-5), method


@pytest.mark.parametrize("method", EVERY)
def test_eval_loss_is_the_task_loss_for_every_method(tmp_path, tokenizer, method):
    """peft's AdaLoRA adds gamma * its orthogonal regulariser to ``out.loss`` in evaluation too: the dev loss must
    leave it out, as HyperAdaLoRA's does, or the methods' dev losses are not comparable."""
    from hyperadalora import data as data_lib

    args = TrainArgs(method=method, task="sst2", max_steps=3, batch_size=8, max_length=16, seed=0, progress=False,
                     output_dir=str(tmp_path / method), tinit=0, tfinal=1, orth_reg_weight=5.0, save_adapter=False,
                     keep_checkpoints=0)
    summary = train(args, model=make_bert(vocab=tokenizer.vocab_size), tokenizer=tokenizer,
                    train_examples=toy_examples(32), eval_examples=toy_examples(16, seed=1))
    model = summary["model"].eval()
    inner = model.get_base_model()
    ds = data_lib.build_classification_dataset(toy_examples(16, seed=1), tokenizer, 16)
    loader = data_lib.make_dataloader(ds, 8, shuffle=False, seed=0, collate_fn=data_lib.make_collator(tokenizer))
    with torch.no_grad():
        task = [float(inner(**batch).loss) for batch in loader]
        full = [float(model(**batch).loss) for batch in loader]
    assert summary["final_eval"]["eval_loss"] == pytest.approx(sum(task) / len(task), abs=1e-6)
    if method == "adalora":  # the regulariser is there in peft's own output, and left out of eval_loss
        assert sum(full) / len(full) > sum(task) / len(task) + 1e-3


def write_tiny_model(path, tokenizer):
    model = make_bert(vocab=tokenizer.vocab_size, hidden=32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_sst2(root, n_train=48, n_dev=16):
    d = root / "SST-2"
    d.mkdir(parents=True)
    for name, n, seed in (("train.tsv", n_train, 0), ("dev.tsv", n_dev, 1)):
        lines = ["sentence\tlabel"] + [f"{e['text_a']}\t{e['label']}" for e in toy_examples(n, seed)]
        (d / name).write_text("\n".join(lines) + "\n")
    return str(root)


def test_cli_train_with_yaml_config(tmp_path, tokenizer, capsys):
    model_dir = write_tiny_model(tmp_path / "model", tokenizer)
    data_dir = write_sst2(tmp_path / "glue")
    (tmp_path / "run.yaml").write_text(f"method: hyperadalora\ntask: sst2\nmax_steps: 12\nbatch_size: 8\n"
                                       f"max_length: 16\nlr: 0.005\nmomentum: 0.5\ndata_dir: {data_dir}\n")
    out = tmp_path / "out"
    code = cli.main(["train", "--config", str(tmp_path / "run.yaml"), "--model", model_dir, "--output-dir", str(out),
                     "--tinit", "2", "--tfinal", "3", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["hyper"]["momentum"] == 0.5 and summary["steps"] == 12
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 12 + 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "rte", "--data-dir", "/nonexistent/glue"], "nonexistent"),
    (["train", "--task", "nope"], "unknown task"),
    (["train", "--method", "qlora"], "--method 'qlora'"),
    (["train", "--max-steps", "0"], "--max-steps 0"),
    (["train", "--momentum", "2"], "momentum"),
    (["train", "--hypernet", "rnn", "--max-steps", "10"], "hypernet"),
    (["train", "--config", "/nonexistent.yaml"], "nonexistent.yaml"),
    (["train", "--model", "./no/such/model", "--max-steps", "5"], "does not exist"),
])
def test_cli_bad_input_gives_a_clear_message(argv, message, capsys, tmp_path):
    code = cli.main(argv + ["--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--method", "lora", "--hypernet", "attention"], "--hypernet: hypernetwork options; --method lora has none"),
    (["--method", "adalora", "--momentum", "0.5"], "--method adalora has no hypernetworks"),
    (["--method", "lora", "--target-r", "1", "--tinit", "2"], "--target-r, --tinit: the rank budget schedule"),
    (["--method", "hyperlora", "--deltaT", "5"], "not to --method hyperlora"),
    (["--n-heads", "4"], "--n-heads applies to hydralora and hyperhydralora only"),
    (["--dtype", "bfloat16", "--precision", "fp32"], "--dtype and --precision set the same option"),
    (["--device", "gpu"], "not a device name"),
])
def test_cli_refuses_options_the_method_does_not_use(argv, message, capsys, tmp_path):
    message = message.replace("has none", "has no hypernetworks")
    code = cli.main(["train", "--max-steps", "5", "--output-dir", str(tmp_path / "o")] + argv)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_demo_refuses_a_method(capsys, tmp_path):
    assert cli.main(["demo", "--method", "lora", "--output-dir", str(tmp_path / "d")]) == 2
    assert "demo always compares adalora with hyperadalora" in capsys.readouterr().err


def test_device_that_is_not_there_fails_before_the_model_loads(tmp_path):
    from hyperadalora.training import check_device

    check_device(None)
    check_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            train(TrainArgs(task="sst2", model=str(tmp_path / "none"), device="cuda", output_dir=str(tmp_path / "o")))
        assert not (tmp_path / "o").exists()


def test_schedule_defaults_fit_a_very_short_run():
    for steps in (1, 2, 3, 10):
        args = TrainArgs(method="hyperadalora", max_steps=steps)
        assert args.tinit + args.tfinal < steps
    assert (TrainArgs(max_steps=300).tinit, TrainArgs(max_steps=300).tfinal) == (30, 60)  # 10% / 20%, as before
    TrainArgs(method="lora", max_steps=1, tinit=1, tfinal=1)  # no schedule: not checked
    assert TrainArgs(method="adalora", max_steps=2).tfinal == 0  # peft's AdaLoRA needs a step before the final budget
    with pytest.raises(ValueError, match="peft's AdaLoRA sets the final budget"):
        TrainArgs(method="adalora", max_steps=1)
    with pytest.raises(ValueError, match="tinit \\+ tfinal"):
        TrainArgs(method="adalora", max_steps=5, tinit=2, tfinal=3)


def test_a_run_directory_is_never_overwritten_by_accident(tmp_path, tokenizer):
    def run(steps, lr, **kw):
        args = TrainArgs(method="hyperadalora", task="sst2", max_steps=steps, batch_size=8, lr=lr, max_length=16,
                         progress=False, save_every=2, keep_checkpoints=2, tinit=0, tfinal=1, deltaT=1, **kw)
        return train(args, model=make_bert(vocab=tokenizer.vocab_size, hidden=32), tokenizer=tokenizer,
                     train_examples=toy_examples(32), eval_examples=toy_examples(8, seed=1))

    out = tmp_path / "run"
    run(6, 1e-3, output_dir=str(out))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already holds a run.*--resume.*--overwrite"):
        run(4, 5e-3, output_dir=str(out))
    assert (out / "metrics.jsonl").read_text() == before                      # untouched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    summary = run(4, 5e-3, output_dir=str(out), overwrite=True)               # replaced: no stale checkpoint left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert summary["checkpoint"].endswith("step-0000004") and summary["args"]["lr"] == 5e-3
    # resuming without an output dir continues in the resumed run's directory (a checkpoint's run, too)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-0000004")
    resumed = run(4, 5e-3, resume=str(out / "checkpoints" / "step-0000002"))
    assert resumed["args"]["output_dir"] == str(out) and resumed["resumed_from"].endswith("step-0000002")
    assert len(read_metrics(str(out / "metrics.jsonl"))[0]) == 4
    # resuming into another directory that holds a run is refused as well
    other = tmp_path / "other"
    run(2, 1e-3, output_dir=str(other))
    with pytest.raises(FileExistsError):
        run(4, 5e-3, resume=str(out), output_dir=str(other))


def test_a_failed_run_leaves_no_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError):  # the embedded task's data loads; the model does not exist
        train(TrainArgs(task="sentiment", model=str(tmp_path / "no-such-model"), max_steps=5,
                        max_train_examples=16, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        train(TrainArgs(task="sentiment", model=str(tmp_path / "empty"), max_steps=5, max_train_examples=16,
                        output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, hyper, message", [
    ("hyperadalora", {"hypernet_warmup_steps": -1}, "hypernet_warmup_steps=-1"),
    ("hyperadalora", {"hypernet_warmup_steps": 50}, "> total_step=5"),
    ("hyperlora", {"feature_lr_ratio": 0}, "feature_lr_ratio=0.0"),
])
def test_adapter_options_are_checked_before_the_model_loads(tmp_path, method, hyper, message):
    """A bad option fails at once, not after loading a (possibly large) model: here the model does not exist, so
    only the option's own message can come first; nothing is written."""
    args = TrainArgs(method=method, task="sst2", model=str(tmp_path / "no-such-model"), max_steps=5,
                     output_dir=str(tmp_path / "out"), hyper=hyper)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, expected", [("true", True), ("False", False), ("1", True), ("off", False)])
def test_cli_boolean_hypernetwork_option(value, expected):
    ns = cli.build_parser().parse_args(["train", "--center-increment", value])
    assert ns.center_increment is expected


@pytest.mark.parametrize("value, expected", [("none", None), ("None", None), ("8", 8)])
def test_cli_nullable_options_take_a_value_or_none(value, expected):
    from hyperadalora.training import args_from_dict

    ns = cli.build_parser().parse_args(["train", "--feature-dim", value, "--feature-lr-ratio", "none"])
    args = args_from_dict(cli.collect_options(ns))
    assert args.hyper == {"feature_dim": expected, "feature_lr_ratio": None}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--feature-dim", "wide"])
    ns = cli.build_parser().parse_args(["train", "--identity", "none"])
    assert args_from_dict(cli.collect_options(ns)).hyper == {"identity": None}
    ns = cli.build_parser().parse_args(["train", "--feature-lr-ratio-final", "3"])
    assert args_from_dict(cli.collect_options(ns)).hyper == {"feature_lr_ratio_final": 3.0}
    ns = cli.build_parser().parse_args(["train", "--basis", "orthonormal"])
    assert args_from_dict(cli.collect_options(ns)).hyper == {"basis": "orthonormal"}
    ns = cli.build_parser().parse_args(["train", "--lambda-codes", "true"])
    assert args_from_dict(cli.collect_options(ns)).hyper == {"lambda_codes": True}


def test_yaml_null_sets_a_nullable_hypernetwork_option_and_is_ignored_elsewhere():
    from hyperadalora.training import args_from_dict

    args = args_from_dict({"feature_dim": None, "max_steps": None, "hypernet": None})
    assert args.hyper == {"feature_dim": None}


def test_cli_boolean_option_rejects_other_words(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["train", "--center-increment", "maybe"])
    assert e.value.code == 2
    assert "--center-increment takes true or false, got 'maybe'" in capsys.readouterr().err


def test_cli_demo_compares_both_methods_side_by_side(tmp_path, tokenizer, capsys):
    # `make demo` runs `hyperadalora demo` on the embedded task; here on a tiny model and the toy SST-2 copy
    model_dir = write_tiny_model(tmp_path / "model", tokenizer)
    data_dir = write_sst2(tmp_path / "glue")
    out = tmp_path / "demo"
    code = cli.main(["demo", "--task", "sst2", "--data-dir", data_dir, "--model", model_dir, "--max-steps", "12",
                     "--batch-size", "8", "--max-length", "16", "--tinit", "2", "--tfinal", "3", "--no-progress",
                     "--output-dir", str(out)])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["reference"] == "adalora" and set(result["methods"]) == {"adalora", "hyperadalora"}
    ada = result["methods"]["adalora"]
    assert ada["steps_to_target"] is not None and ada["steps_ratio"] == 1.0  # the reference reaches its own loss
    for m in result["methods"].values():
        assert m["median_step_s"] > 0 and "accuracy" in m["final_eval"]
    assert len(result["curves"]["hyperadalora"]) == 12
    report = (out / "report.md").read_text()
    assert "| hyperadalora |" in report and "ratio (90%)" in report
    assert "lr 0.001, batch 8, max_length 16, 12 steps" in report  # the shared settings are stated
    assert (out / result["plot"]).is_file()
    assert "| adalora |" in capsys.readouterr().out
    # peft's AdaLoRA adapter reloads in peft, layers pruned to rank 0 included
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    config = json.loads((out / "adalora" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(base, str(out / "adalora" / "adapter"))
    ids = tokenizer(["good movie", "bad movie"], return_tensors="pt")
    assert torch.isfinite(reloaded(**ids).logits).all()


@pytest.mark.parametrize("method", ["hyperadalora", "adalora"])
def test_deberta_gets_the_papers_target_modules_and_trains_a_step(method):
    """DeBERTa-v3 (one of the paper's encoders) names its projections query_proj / key_proj / value_proj: every
    method adapts the paper's six matrices per layer (not the pooler, as 'all-linear' would)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from hyperadalora.training import build_adapter_model, default_target_modules

    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, pooler_hidden_size=32, num_labels=2)
    model = DebertaV2ForSequenceClassification(config)
    targets = default_target_modules(model)
    assert targets[:3] == ["query_proj", "key_proj", "value_proj"]
    args = TrainArgs(method=method, task="sst2", max_steps=10, tinit=2, tfinal=2, deltaT=2)
    wrapped, _ = build_adapter_model(args, model, "SEQ_CLS")
    adapted = sorted(n.split("deberta.", 1)[1] for n, m in wrapped.named_modules() if type(m).__name__ == "SVDLinear")
    per_layer = ["attention.output.dense", "attention.self.key_proj", "attention.self.query_proj",
                 "attention.self.value_proj", "intermediate.dense", "output.dense"]
    assert adapted == [f"encoder.layer.{i}.{name}" for i in range(2) for name in per_layer]  # no pooler, no head
    inputs = torch.randint(0, 100, (2, 8))
    out = wrapped(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
