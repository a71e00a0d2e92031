"""The GGUF LoRA export loaded by llama.cpp (llama-cpp-python) on SmolLM2's GGUF base: the adapter changes
llama.cpp's logits as it changes the HF model's (HyperAdaLoRA on the same weights, dequantized)."""

import numpy as np
import pytest
import torch

import hyperadalora as ha
from hyperadalora import export as ex
from hyperadalora.base_models import load_model_and_tokenizer, smollm2_gguf_path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        "### Instruction: Name three primary colours. ### Response:")


def _known_adapter(model, seed=0, size=2.0):
    """HyperAdaLoRA on every projection of ``model`` with fixed random tensors: per-layer ranks 0..4 (some 0)."""
    wrapped = ha.get_peft_model(model, ha.HyperAdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=4, total_step=10, tinit=1, tfinal=2, deltaT=1, init="normal",
        target_modules=TARGETS, task_type="CAUSAL_LM"))
    wrapped.drop_hypernetworks()
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(0, 5, (len(wrapped.adapters),), generator=g).tolist()
    for layer, r in zip(wrapped.adapters, ranks):
        P = torch.randn(layer.out_features, r, generator=g) / layer.out_features ** 0.5
        Q = torch.randn(r, layer.in_features, generator=g) / layer.in_features ** 0.5
        layer.set_fixed(P, size * torch.randn(r, generator=g), Q)
    return wrapped.eval(), ranks


def _cpp_logits(gguf_base, ids, lora=None):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_base, lora_path=lora, n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                n_threads=2, seed=0)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    return out


def _compare(d_ref, d):
    rel = float(np.linalg.norm(d - d_ref) / np.linalg.norm(d_ref))
    corr = float(np.corrcoef(d_ref.ravel(), d.ravel())[0, 1])
    return rel, corr


@pytest.mark.slow
def test_gguf_adapter_changes_llama_cpp_logits_as_the_merged_model(tmp_path, monkeypatch):
    gguf_base = smollm2_gguf_path()
    model, tok, _ = load_model_and_tokenizer("smollm2", "instruction")
    ids = tok(TEXT)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        base_hf = model(input_ids=x).logits[0].double().numpy()
        wrapped, ranks = _known_adapter(model)
        assert 0 in ranks and len(set(ranks)) > 2
        adapted_hf = wrapped(input_ids=x).logits[0].double().numpy()
    weights = ex.lora_weights(wrapped)
    ex.export(weights, str(tmp_path / "adapter.gguf"), "gguf", base="smollm2")
    # the same adapter written without llama.cpp's q/k row order: a control that the comparison can tell layouts apart
    monkeypatch.setattr(ex, "PERMUTED_ARCHES", set())
    ex.export(weights, str(tmp_path / "unpermuted.gguf"), "gguf", base="smollm2")

    d_hf = adapted_hf - base_hf
    f32_base = str(tmp_path / "base-f32.gguf")
    ex.dequantized_gguf(gguf_base, f32_base)
    results = {}
    for kind, path in (("f32", f32_base), ("q4_1", gguf_base)):
        base_cpp = _cpp_logits(path, ids)
        d_cpp = _cpp_logits(path, ids, str(tmp_path / "adapter.gguf")) - base_cpp
        d_wrong = _cpp_logits(path, ids, str(tmp_path / "unpermuted.gguf")) - base_cpp
        results[kind] = {"base_rel": float(np.linalg.norm(base_cpp - base_hf) / np.linalg.norm(base_hf)),
                         "delta": _compare(d_hf, d_cpp), "unpermuted": _compare(d_hf, d_wrong)}
    print(f"\nlogit change by the adapter |d_hf|/|base_hf| = {np.linalg.norm(d_hf) / np.linalg.norm(base_hf):.3f}")
    for kind, r in results.items():
        print(f"{kind} base: llama.cpp vs HF base logits rel {r['base_rel']:.2e}; adapter's change in llama.cpp vs "
              f"HF: rel {r['delta'][0]:.2e}, corr {r['delta'][1]:.6f}; written without the q/k row order: rel "
              f"{r['unpermuted'][0]:.2e}, corr {r['unpermuted'][1]:.6f}")
    assert np.linalg.norm(d_hf) > 0.1 * np.linalg.norm(base_hf)  # the adapter changes the logits visibly
    f32, q4 = results["f32"], results["q4_1"]
    for r in (f32, q4):
        # llama.cpp's change agrees with the HF model's up to llama.cpp's own arithmetic: its base logits deviate from
        # the HF model's by base_rel (F32 base: float rounding and the F16 KV cache; Q4_1 base: also the quantized
        # activations), and a difference of two such runs by about sqrt(2) x that, relative to the change
        noise = np.sqrt(2) * r["base_rel"] * np.linalg.norm(base_hf) / np.linalg.norm(d_hf)
        assert r["delta"][0] < 1.5 * noise and r["delta"][0] < r["unpermuted"][0]
    assert f32["delta"][0] < 0.02 and f32["delta"][1] > 0.9999 and f32["unpermuted"][0] > 10 * f32["delta"][0]
    assert q4["delta"][1] > 0.9
