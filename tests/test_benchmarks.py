"""The benchmark scripts' own logic: the paired time ratio and its interval, and the hypernetwork description
that the scaling report prints (read from the library's defaults)."""

import json
import os
import sys

import numpy as np
import pytest

import hyperadalora as ha

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import scaling  # noqa: E402
import step_time  # noqa: E402


def test_paired_ratio_is_the_median_of_per_iteration_ratios_with_a_bootstrap_interval():
    ref = np.array([100.0, 200.0, 100.0, 200.0, 100.0, 200.0, 100.0, 200.0])
    same = step_time.paired_ratio(ref * 1.05, ref)          # a drifting load hits both alike: the ratio is exact
    assert same["median"] == pytest.approx(1.05)
    assert same["ci95"] == pytest.approx([1.05, 1.05])
    rng = np.random.default_rng(3)
    noisy = step_time.paired_ratio(ref * rng.uniform(0.9, 1.1, ref.size), ref)
    lo, hi = noisy["ci95"]
    assert 0.9 <= lo <= noisy["median"] <= hi <= 1.1
    assert hi > lo                                            # noise gives a band, not a point


def test_both_benchmarks_time_one_training_step():
    """step_time.py and quantized.py time the same step: forward, backward, optimizer step, allocate(step),
    zero_grad."""
    import contextlib

    import torch

    import quantized
    from conftest import BERT_TARGETS, make_bert

    assert quantized.train_step is step_time.train_step
    model = ha.get_peft_model(make_bert(), ha.HyperLoraConfig(r=2, target_modules=BERT_TARGETS, task_type="SEQ_CLS"))
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    allocated = []
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "labels": torch.tensor([0, 1])}
    assert step_time.train_step(model, opt, allocated.append, 4, batch) == 5
    assert allocated == [5]                                               # allocate(steps done)
    after = [p for g in opt.param_groups for p in g["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))      # the optimizer stepped
    assert all(p.grad is None for p in after)                             # zero_grad(set_to_none=True)
    entered = []

    @contextlib.contextmanager
    def autocast():  # the forward runs inside it
        entered.append(True)
        yield

    assert step_time.train_step(model, opt, None, 5, batch, autocast) == 6 and allocated == [5] and entered


def test_summary_table_shows_the_paired_ratio_and_the_verdict():
    res = {"hyperadalora": {"median_ms": 101.0, "peak_mib": 10.0, "time_vs_adalora": 1.01, "time_vs_lora": 1.05,
                            "mem_vs_adalora": 0.999, "paired_vs_adalora": {"median": 1.004, "ci95": [0.97, 1.03]}},
           "adalora": {"median_ms": 100.0, "peak_mib": 10.01}, "lora": {"median_ms": 96.0, "peak_mib": 9.9}}
    text, verdicts = step_time.summary({"results": {"8": res, "1": res}})
    assert "1.004 [0.970, 1.030]" in text
    assert verdicts == {"8": {"time_vs_adalora": False, "mem_vs_adalora": True, "time_vs_lora": True}}
    assert "missed: time_vs_adalora" in text


def test_scaling_report_describes_the_current_defaults():
    text = scaling.hypernetwork_description()
    c = ha.HyperAdaLoraConfig()
    for part in (c.hypernet, f"d_h={c.hypernet_dim}", f"context={c.context}", f"feature_dim={c.feature_dim}",
                 c.generation):
        assert part in text


def test_scaling_runs_only_the_chosen_sweeps(tmp_path):
    out = scaling.main(["--quick", "--sweeps", "width", "--layouts", "row", "--repeats", "1", "--warmup", "0",
                        "--threads", "1", "--json", str(tmp_path / "s.json")])
    rows = out["rows"]
    assert {r["sweep"] for r in rows} == {"width"} and [r["width"] for r in rows] == scaling.QUICK_SWEEPS["width"]
    assert all(r["gen_ms"] > 0 and r["step_ms"] > 0 and r["adalora_ms"] > 0 for r in rows)
    assert "width/row" in out["fits"] and (tmp_path / "s.json").exists()
    with pytest.raises(SystemExit):
        scaling.parse_args(["--sweeps", "depth"])


def test_trainer_path_runs_every_row_and_flags_the_default_optimizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import trainer_path
    from conftest import make_bert
    from hyperadalora.base_models import minilm_path

    model_dir = tmp_path / "bert"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    make_bert(vocab=tokenizer.vocab_size, hidden=32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = trainer_path.main(["--model", str(model_dir), "--steps", "4", "--batch-size", "4", "--max-length", "16",
                             "--max-eval", "8", "--window", "2", "--json", str(tmp_path / "t.json")])
    results = out["results"]
    assert list(results) == list(trainer_path.ROWS)
    assert all(len(r["losses"]) == 4 and 0.0 <= r["dev_accuracy"] <= 1.0 for r in results.values())
    assert "feature_embeddings" in results["HyperAdaLoraTrainer"]["groups"]
    assert results["Trainer, default optimizer"]["optimizer_warning"]            # the callback flags it
    assert not results["HyperAdaLoraTrainer"]["optimizer_warning"]
    assert "| Trainer, default optimizer |" in out["report"] and "loss 3-4" in out["report"]


def test_quantized_benchmark_counts_the_4bit_state_and_averages_seeds():
    pytest.importorskip("bitsandbytes")
    import quantized
    from conftest import make_bert, quantize_linears

    dense = make_bert(hidden=64)
    model = quantize_linears(make_bert(hidden=64), bits=4)
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    scales = sum(m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
                 for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state"))
    assert scales > 0 and quantized.base_bytes(model) >= tensors + scales
    assert quantized.base_bytes(model) < quantized.base_bytes(dense)
    runs = {f"m b seed{s}": {"method": "m", "base": "b", "seed": s, "task_loss": [1.0] * 5 + [v] * 10,
                             "final_eval": {"eval_loss": v, "accuracy": 1 - v}} for s, v in ((0, 0.2), (1, 0.4))}
    mean = quantized.mean_over_seeds(runs)[("m", "b")]
    assert mean["final_task_loss"] == pytest.approx(0.3) and mean["dev_accuracy"] == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------- gpu_check.sh
GPU_CHECK = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_check.sh")


def test_gpu_check_script_parses_and_refuses_to_run_without_cuda(tmp_path):
    import subprocess

    import torch

    assert subprocess.run(["bash", "-n", GPU_CHECK]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    proc = subprocess.run(["bash", GPU_CHECK], capture_output=True, text=True,
                          env={**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "runs nothing without one" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_train_records_a_run_and_a_failed_one_and_the_table_shows_both(tmp_path):
    from transformers import AutoTokenizer

    import gpu_check_report
    from hyperadalora.base_models import minilm_path
    from test_train import write_sst2, write_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model_dir = write_tiny_model(tmp_path / "model", tokenizer)
    data_dir = write_sst2(tmp_path / "glue")
    common = ["--model", model_dir, "--task", "sst2", "--data-dir", data_dir, "--max-steps", "6", "--batch-size", "8",
              "--max-length", "16", "--tinit", "1", "--tfinal", "1", "--keep-checkpoints", "0", "--no-progress",
              "--device", "cpu"]
    out = tmp_path / "out"
    out.mkdir()
    ok = gpu_check_report.run_train(str(out / "train_hyperadalora_fp32-base.json"),
                                    ["--method", "hyperadalora", *common, "--output-dir", str(tmp_path / "r1")])
    assert ok["rc"] == 0 and ok["median_step_ms"] > 0 and ok["total_rank"] == 2 * 12
    bad = gpu_check_report.run_train(str(out / "train_adalora_4bit-nf4.json"),
                                     ["--method", "adalora", *common, "--no-such-flag", "--output-dir",
                                      str(tmp_path / "r2")])
    assert bad["rc"] == 2 and "--no-such-flag" in bad["error"]
    (out / "tests.xml").write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/>'
                                   '</testsuites>')
    (out / "step_time_minilm.json").write_text(json.dumps({"results": {"8": {
        "hyperadalora": {"median_ms": 10.0, "peak_mib": 100.0, "time_vs_adalora": 0.9, "mem_vs_adalora": 0.99},
        "adalora": {"median_ms": 11.1, "peak_mib": 101.0}, "lora": {"median_ms": 9.0, "peak_mib": 99.0}}}}))
    (out / "step_time_smollm2.rc").write_text("1\n")
    text = gpu_check_report.table(str(out))
    lines = text.splitlines()
    assert lines[0] == "| check | model | setting | hyperadalora | adalora | lora | note |"
    assert "3 passed, 1 failed, 0 errors, 1 skipped" in text
    assert "| step time ms (bf16) | minilm | batch 8 | 10.0 | 11.1 | 9.0 | time / adalora 0.900 |" in lines
    assert "| peak memory MiB (bf16) | minilm | batch 8 | 100 | 101 | 99 | memory / adalora 0.990 |" in lines
    assert any("smollm2" in ln and "FAILED (exit 1)" in ln for ln in lines)
    row = next(ln for ln in lines if "4bit-nf4" in ln)
    assert "FAILED: " in row and "--no-such-flag" in row
    row = next(ln for ln in lines if "fp32-base" in ln)
    assert row.startswith("| train (sst2) | minilm | fp32-base |") and "ms/step" in row and f"rank {2 * 12}" in row
    assert all(ln.count("|") == 8 for ln in lines)
