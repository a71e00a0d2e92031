"""Any model a practitioner brings (issue 30): the support matrix (every method on tiny random-weight models of many
transformers families, `benchmarks/support_matrix.py`), and beside it what the matrix does not show: Conv1D layers
(GPT-2), heads with sub-layers and embeddings as modules to save, default targets, mixture-of-experts models, a
4-bit base, the GGUF export of GPT-2, the SmolLM2 alias in 4-bit, and the combinations refused at get_peft_model."""

import json
import os
import sys

import pytest
import torch

import hyperadalora as ha
from conftest import quantize_linears

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import support_matrix as S  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
CASES = [(f.name, m) for f in S.FAMILIES for m in S.METHODS]


def test_the_matrix_covers_25_families_of_every_kind_and_every_task_type():
    assert len(S.FAMILIES) >= 25
    assert {f.kind for f in S.FAMILIES} >= {"encoder", "decoder", "encoder-decoder", "vision", "speech"}
    assert {f.task_type for f in S.FAMILIES} >= {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM",
                                                  "FEATURE_EXTRACTION"}
    assert set(S.METHODS) == {"hyperadalora", "hyperlora", "hyperdora", "hydralora", "hyperhydralora"}


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_support_matrix(family, method):
    """identity at step 0; training (with rank allocation) lowers the loss and moves the outputs; save / load, merge
    and the peft LoRA export give the trained outputs (`support_matrix.run_case`)."""
    results = S.run_case(S.FAMILY[family], method)
    failed = [f"{r.check}: {r.detail}" for r in results if r.status == "fail"]
    assert not failed, failed
    statuses = {r.check: r.status for r in results}
    assert statuses["identity"] == statuses["train"] == statuses["save/load"] == "pass"


def test_the_committed_table_lists_every_case():
    with open(os.path.join(ROOT, "docs", "support-matrix.md")) as f:
        text = f.read()
    for family in S.FAMILIES:
        assert f"| {family.name} |" in text, family.name
    for method in S.METHODS:
        assert f"### {method}" in text
    assert "✗" not in text.split("## Results", 1)[1], "the committed table has failed checks"


# ---------------------------------------------------------------------------------------------- Conv1D (GPT-2)
def gpt2():
    return S.FAMILY["gpt2"].build()


def test_gpt2_defaults_to_its_conv1d_attention_and_exports_with_fan_in_fan_out(tmp_path):
    from peft import PeftModel

    model = ha.get_peft_model(gpt2(), ha.HyperAdaLoraConfig(init_r=2, target_r=1, total_step=4, task_type="CAUSAL_LM"))
    assert model.target_names == ["transformer.h.0.attn.c_attn"]  # peft's mapping for gpt2
    layer = model.adapters[0]
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 48)
    batch = S.lm_batch()
    model.export_lora(str(tmp_path / "lora"))
    with open(tmp_path / "lora" / "adapter_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(gpt2(), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(S.outputs(peft_model, batch), S.outputs(model.eval(), batch))
    model.save_pretrained(str(tmp_path / "a"))
    with open(tmp_path / "a" / "hyperadalora_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is True
    assert ha.export.read_adapter(str(tmp_path / "a")).fan_in_fan_out


def test_merging_a_conv1d_keeps_the_layer_a_conv1d_with_its_weight_transposed():
    from transformers.pytorch_utils import Conv1D

    base = gpt2()
    w0 = base.transformer.h[0].attn.c_attn.weight.detach().clone()
    model = ha.get_peft_model(base, ha.HyperLoraConfig(r=2, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    batch = S.lm_batch()
    for step in (1, 2):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()
    S.outputs(model, batch)  # an evaluation forward installs the adapter of the trained hypernetworks
    delta = model.adapters[0].delta_weight().detach()  # (out, in)
    merged = model.merge_and_unload()
    layer = merged.transformer.h[0].attn.c_attn
    assert type(layer) is Conv1D
    torch.testing.assert_close(layer.weight, w0 + delta.t())


def test_gguf_export_of_gpt2_names_llama_cpp_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    from hyperadalora.export import GgufBase, lora_weights, write_gguf

    base = gpt2()
    model = ha.get_peft_model(base, ha.HyperAdaLoraConfig(init_r=2, target_r=2, total_step=4, task_type="CAUSAL_LM",
                                                          target_modules=["c_attn", "c_fc"]))
    weights = lora_weights(model)
    path = str(tmp_path / "gpt2-lora.gguf")
    write_gguf(weights, path, GgufBase.from_hf_config(base.config))
    tensors = {t.name: tuple(int(s) for s in t.shape) for t in gguf.GGUFReader(path).tensors}
    assert tensors["blk.0.attn_qkv.weight.lora_a"] == (16, 2)   # ne: (in, r)
    assert tensors["blk.0.attn_qkv.weight.lora_b"] == (2, 48)   # ne: (r, out)
    assert tensors["blk.0.ffn_up.weight.lora_a"] == (16, 2)


# ---------------------------------------------------------------------------------------------- modules to save
def test_a_head_with_sub_layers_is_trained_saved_and_loaded_whole(tmp_path):
    roberta = S.FAMILY["roberta"]
    model = ha.get_peft_model(roberta.build(), ha.HyperLoraConfig(r=2, task_type="SEQ_CLS"))
    assert model.saved_module_names == ["classifier"]
    assert not any(n.startswith("classifier.") for n in model.target_names)  # peft's "dense" target: not the head's
    head = model.base_model.classifier
    assert all(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        head.dense.weight.add_(0.5)
        head.out_proj.bias.add_(0.5)
    model.save_pretrained(str(tmp_path / "a"))
    loaded = ha.load_adapter(roberta.build(), str(tmp_path / "a"))
    batch = roberta.batch()
    torch.testing.assert_close(S.outputs(loaded, batch), S.outputs(model.eval(), batch))
    torch.testing.assert_close(loaded.base_model.classifier.dense.weight, head.dense.weight)


def test_distilbert_saves_pre_classifier_and_classifier_as_peft_does():
    model = ha.get_peft_model(S.FAMILY["distilbert"].build(),
                              ha.HyperLoraConfig(r=2, task_type="SEQ_CLS", target_modules=["q_lin", "v_lin"]))
    assert model.saved_module_names == ["pre_classifier", "classifier"]


def test_an_embedding_as_module_to_save_is_trained_saved_loaded_and_merged(tmp_path):
    llama = S.FAMILY["llama"]
    config = ha.HyperLoraConfig(r=2, task_type="CAUSAL_LM", modules_to_save=["embed_tokens"])
    model = ha.get_peft_model(llama.build(), config)
    assert model.saved_module_names == ["model.embed_tokens"]
    batch = llama.batch()
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    before = model.base_model.model.embed_tokens.weight.detach().clone()
    for step in (1, 2):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    assert not torch.equal(model.base_model.model.embed_tokens.weight, before)
    model.eval()
    trained = S.outputs(model, batch)
    model.save_pretrained(str(tmp_path / "a"))
    loaded = ha.load_adapter(llama.build(), str(tmp_path / "a"))
    torch.testing.assert_close(S.outputs(loaded, batch), trained)
    torch.testing.assert_close(S.outputs(loaded.merge_and_unload(), batch), trained, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- default targets
@pytest.mark.parametrize("family,expected", [("mistral", ["q_proj", "v_proj"]),      # peft's LoRA mapping
                                             ("roberta", ["query", "key", "value", "dense"]),  # AdaLoRA's, not LoRA's
                                             ("mixtral", ["q_proj", "v_proj"]),
                                             ("qwen3-moe", ["q_proj", "v_proj"])])
def test_default_targets_come_from_peft_adalora_then_lora_mapping(family, expected):
    model = S.FAMILY[family].build()
    assert ha.tuner_utils.default_targets(model) == expected


@pytest.mark.parametrize("family", ["distilbert", "phi3", "vit", "whisper"])
def test_a_model_type_without_defaults_is_refused_listing_what_to_target(family):
    model = S.FAMILY[family].build()
    with pytest.raises(ValueError, match="No default target_modules") as info:
        ha.get_peft_model(model, ha.HyperLoraConfig(r=2))
    names = ha.tuner_utils.candidate_names(model)
    assert names and str(names[0]) in str(info.value) and "all-linear" in str(info.value)


def test_all_linear_takes_conv1d_and_leaves_out_the_output_layer_the_heads_and_moe_routers():
    names = ha.get_peft_model(gpt2(), ha.HyperLoraConfig(r=2, target_modules="all-linear")).target_names
    assert set(n.rsplit(".", 1)[-1] for n in names) == {"c_attn", "c_proj", "c_fc"} and "lm_head" not in names
    names = ha.get_peft_model(S.FAMILY["qwen2-moe"].build(),
                              ha.HyperLoraConfig(r=2, target_modules="all-linear")).target_names
    assert not any(n.endswith(("gate", "shared_expert_gate")) for n in names), names
    assert any(n.endswith("shared_expert.down_proj") for n in names)
    names = ha.get_peft_model(S.FAMILY["distilbert"].build(),
                              ha.HyperLoraConfig(r=2, task_type="SEQ_CLS", target_modules="all-linear")).target_names
    assert "pre_classifier" not in names and "classifier" not in names


@pytest.mark.parametrize("target", ["experts", "gate_up_proj"])
def test_fused_expert_parameters_are_refused_naming_what_can_be_targeted(target):
    base = S.FAMILY["mixtral"].build()
    with pytest.raises(ValueError) as info:
        ha.get_peft_model(base, ha.HyperLoraConfig(r=2, target_modules=[target]))
    message = str(info.value)
    assert "fused" in message and "q_proj" in message and "target_parameters" in message, message
    assert not any(isinstance(m, ha.wrapper.BaseAdapterLayer) for m in base.modules())  # untouched


def test_the_router_of_a_moe_model_is_not_adapted():
    model = ha.get_peft_model(S.FAMILY["mixtral"].build(), ha.HyperLoraConfig(r=2, target_modules="all-linear"))
    assert all(".self_attn." in n for n in model.target_names), model.target_names
    assert type(model.base_model.model.layers[0].mlp.gate).__name__.endswith("Router")


# ---------------------------------------------------------------------------------------------- refused early
@pytest.mark.parametrize("target", ["embed_tokens", "norm"])
def test_a_layer_that_is_not_linear_is_refused_at_get_peft_model(target):
    with pytest.raises(ValueError, match=r"not nn.Linear or Conv1D"):
        ha.get_peft_model(S.FAMILY["llama"].build(), ha.HyperLoraConfig(r=2, target_modules=[target]))


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("family", ["llama", "bert", "qwen2"])
@pytest.mark.parametrize("method", ["hyperadalora", "hyperlora"])
def test_a_4bit_base_trains_saves_and_loads(tmp_path, family, method):
    pytest.importorskip("bitsandbytes")
    fam = S.FAMILY[family]
    batch = fam.batch()

    def base():
        return quantize_linears(fam.build(), bits=4, skip=("classifier", "pooler", "lm_head", "score"))

    quantized = base()
    reference = S.outputs(quantized, batch)
    model = ha.get_peft_model(quantized, S.method_config(method, fam))
    assert ha.quantization.is_quantized(model)
    torch.testing.assert_close(S.outputs(model.eval(), batch), reference)  # identity at step 0
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    losses = []
    for step in range(1, 4):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    trained = S.outputs(model, batch)
    assert not torch.equal(trained, reference)
    model.save_pretrained(str(tmp_path / "a"))
    loaded = ha.load_adapter(base(), str(tmp_path / "a"))
    torch.testing.assert_close(S.outputs(loaded, batch), trained)


# ---------------------------------------------------------------------------------------------- GGUF conversions
def test_a_cached_gguf_conversion_loads_in_4bit(tmp_path):
    """The fp32 conversion of a .gguf model (the SmolLM2 alias) kept ``quantization_config: gguf`` in its config.json,
    and transformers then refused --load-in-4bit / --load-in-8bit ("The model is quantized with GgufConfig")."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from hyperadalora.base_models import convert_gguf
    from hyperadalora.quantization import bnb_config, quantization_kind

    out = tmp_path / "model-fp32"
    S.FAMILY["llama"].build().save_pretrained(str(out))
    with open(out / "config.json") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "gguf"}  # what the earlier conversions kept
    with open(out / "config.json", "w") as f:
        json.dump(config, f)
    (out / ".complete").touch()
    assert convert_gguf(str(tmp_path / "model.gguf"), out_dir=str(out)) == str(out)  # the cached one
    with open(out / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    for bits in ("4", "8"):
        quant = bnb_config(load_in_4bit=bits == "4", load_in_8bit=bits == "8", skip_modules=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(str(out), quantization_config=quant, device_map={"": "cpu"})
        kinds = {quantization_kind(m) for m in model.modules()} - {None}
        assert kinds == {f"{bits}bit"}


# ---------------------------------------------------------------------------------------------- peft LoRA export
@pytest.mark.parametrize("method", ["hydralora", "hyperhydralora"])
def test_one_head_hydralora_merges_and_exports_on_conv1d(method):
    results = S.run_case(S.FAMILY["gpt2"], method, n_heads=1)
    assert [r.status for r in results] == ["pass"] * len(S.CHECKS), results


def test_a_saved_hyperlora_adapter_exports_from_its_directory(tmp_path):
    from peft import PeftModel

    from hyperadalora.cli import main

    roberta = S.FAMILY["roberta"]
    model = ha.get_peft_model(roberta.build(), ha.HyperLoraConfig(r=2, task_type="SEQ_CLS"))
    with torch.no_grad():
        model.base_model.classifier.dense.weight.add_(0.5)  # the head with sub-layers travels whole
    model.save_pretrained(str(tmp_path / "a"))
    assert main(["export", str(tmp_path / "a"), "--format", "peft", "--output", str(tmp_path / "lora")]) == 0
    batch = roberta.batch()
    peft_model = PeftModel.from_pretrained(roberta.build(), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(S.outputs(peft_model, batch), S.outputs(model.eval(), batch))


def test_dora_and_a_multi_head_hydralora_refuse_the_lora_export(tmp_path):
    for method, options in (("hyperdora", {}), ("hydralora", {"n_heads": 2})):
        model = ha.get_peft_model(S.FAMILY["llama"].build(),
                                  S.method_config(method, S.FAMILY["llama"], **options))
        assert not model.exports_lora
        with pytest.raises(ValueError, match="plain LoRA update"):
            model.export_lora(str(tmp_path / method))
        model.save_pretrained(str(tmp_path / f"{method}-saved"))
        with pytest.raises(ValueError, match="not a plain LoRA"):
            ha.export.read_adapter(str(tmp_path / f"{method}-saved"))


def test_a_quantized_module_to_save_is_refused_at_get_peft_model():
    pytest.importorskip("bitsandbytes")
    # DistilBERT's pre_classifier is a module to save of SEQ_CLS (peft's rule); quantized, it could not train
    base = quantize_linears(S.FAMILY["distilbert"].build(), bits=4, skip=("classifier",))
    assert ha.quantization.quantization_kind(base.pre_classifier) == "4bit"
    with pytest.raises(ValueError, match=r"'pre_classifier' holds a 4bit quantized layer.*llm_int8_skip_modules"):
        ha.get_peft_model(base, ha.HyperLoraConfig(r=2, task_type="SEQ_CLS", target_modules=["q_lin", "v_lin"]))
    assert not any(isinstance(m, ha.wrapper.BaseAdapterLayer) for m in base.modules())


def test_gpt2_loaded_in_4bit_by_transformers_trains_and_merges(tmp_path):
    """transformers' bitsandbytes loading turns GPT-2's Conv1D into Linear4bit layers (weights transposed to
    (out, in)): adapted as any quantized linear layer."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from hyperadalora.quantization import bnb_config, quantization_kind

    gpt2().save_pretrained(str(tmp_path / "gpt2"))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2"), device_map={"": "cpu"},
                                                quantization_config=bnb_config(load_in_4bit=True,
                                                                               skip_modules=["lm_head"]))
    assert quantization_kind(base.transformer.h[0].attn.c_attn) == "4bit"
    batch = S.lm_batch()
    reference = S.outputs(base, batch)
    model = ha.get_peft_model(base, ha.HyperLoraConfig(r=2, task_type="CAUSAL_LM"))
    torch.testing.assert_close(S.outputs(model.eval(), batch), reference)
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    for step in (1, 2):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    trained = S.outputs(model.eval(), batch)
    assert not torch.equal(trained, reference)
    torch.testing.assert_close(S.outputs(model.merge_and_unload(dequantize=True), batch), trained,
                               atol=1e-5, rtol=1e-5)
