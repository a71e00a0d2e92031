"""Exports for serving engines: peft per-layer and uniform-rank forms, llama.cpp's GGUF LoRA layout, the CLI."""

import json

import pytest
import torch

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert, make_llama
from hyperadalora import export as ex
from hyperadalora.cli import main


def _trained(batch):
    """A HyperAdaLoRA model trained 20 steps (ranks reallocated) with its first layer pruned to rank 0."""
    model = ha.get_peft_model(make_bert(), ha.HyperAdaLoraConfig(
        init_r=3, target_r=2, total_step=20, tinit=2, tfinal=4, deltaT=2, target_modules=BERT_TARGETS,
        task_type="SEQ_CLS"))
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-2))
    for step in range(1, 21):
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    model.allocator.mask[0] = False
    model._mask_version += 1
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 100, (8, 12), generator=g), "labels": torch.tensor([0, 1] * 4)}
    model = _trained(batch)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits
    return model, batch["input_ids"], ref


def _peft_logits(directory, x):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(make_bert(), directory).eval()(input_ids=x).logits


def test_uniform_export_pads_every_layer_and_keeps_the_outputs(tmp_path, trained):
    from safetensors.torch import load_file

    model, x, ref = trained
    ranks = model.rank_pattern
    first = model.target_names[0]
    assert ranks[first] == 0 and len(set(ranks.values())) > 1  # a pruned layer and layers of different ranks
    model.export_lora(tmp_path / "per-layer")
    model.export_lora(tmp_path / "uniform", rank="auto", allowed_ranks=ex.VLLM_MAX_LORA_RANKS)
    per_layer, uniform = _peft_logits(tmp_path / "per-layer", x), _peft_logits(tmp_path / "uniform", x)
    assert (per_layer - ref).abs().max().item() < 1e-5
    assert (uniform - ref).abs().max().item() < 1e-5
    assert (uniform - per_layer).abs().max().item() < 1e-5

    cfg = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    tensors = load_file(tmp_path / "uniform" / "adapter_model.safetensors")
    for name, r in ranks.items():
        A = tensors[f"base_model.model.{name}.lora_A.weight"]
        B = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape[0] == 8 and B.shape[1] == 8  # every layer, the pruned one included, at rank 8
        assert not A[r:].any() and not B[:, r:].any()  # zero rows in A, zero columns in B
    # the per-layer form leaves the pruned layer out and keeps each rank
    cfg = json.loads((tmp_path / "per-layer" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(n for n, r in ranks.items() if r > 0) and first in ranks
    assert cfg["r"] == max(ranks.values()) and cfg["rank_pattern"] == cfg["alpha_pattern"]


def test_uniform_rank():
    assert ex.uniform_rank([3, 0, 1]) == 3
    assert ex.uniform_rank([3, 0, 1], 5) == 5
    assert ex.uniform_rank([3, 0, 1], allowed=ex.VLLM_MAX_LORA_RANKS) == 8
    assert ex.uniform_rank([0, 0]) == 1
    assert ex.uniform_rank([8], allowed=ex.VLLM_MAX_LORA_RANKS) == 8
    with pytest.raises(ValueError, match="give a rank >= 3"):
        ex.uniform_rank([3, 1], 2)
    with pytest.raises(ValueError, match="no allowed rank holds rank 600"):
        ex.uniform_rank([600], allowed=ex.VLLM_MAX_LORA_RANKS)
    with pytest.raises(ValueError, match="positive integer"):
        ex.uniform_rank([3], 0)


def test_cli_exports_a_saved_adapter(tmp_path, trained, capsys):
    from safetensors.torch import load_file

    model, x, ref = trained
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--format", "peft-uniform", "--rank", "4",
                 "--output", str(tmp_path / "u4")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers_at_rank_0"] == sum(r == 0 for r in model.rank_pattern.values()) >= 1
    assert report["trained_max_rank"] == max(model.rank_pattern.values())
    # the rank printed is the rank written (the config's r), not the trained maximum it was padded from
    assert json.loads((tmp_path / "u4" / "adapter_config.json").read_text())["r"] == 4 == report["r"]
    assert (_peft_logits(tmp_path / "u4", x) - ref).abs().max().item() < 1e-5
    # the per-layer form from the saved adapter = export_lora's from the live model
    assert main(["export", str(tmp_path / "adapter"), "--output", str(tmp_path / "p")]) == 0
    model.export_lora(tmp_path / "live")
    a, b = load_file(tmp_path / "p" / "adapter_model.safetensors"), load_file(tmp_path / "live" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    # a peft LoRA adapter converts too (rank_pattern / alpha_pattern read back)
    assert main(["export", str(tmp_path / "p"), "--format", "peft-uniform", "--output", str(tmp_path / "pu")]) == 0
    assert (_peft_logits(tmp_path / "pu", x) - ref).abs().max().item() < 1e-5


def test_export_refuses_what_does_not_fit(tmp_path, trained, capsys):
    model, _, _ = trained
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--format", "peft-uniform", "--rank", "1",
                 "--output", str(tmp_path / "x")]) == 2
    assert "give a rank >=" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--format", "peft", "--rank", "8",
                 "--output", str(tmp_path / "x")]) == 2
    assert "apply to --format peft-uniform" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--format", "gguf", "--output", str(tmp_path / "x.gguf")]) == 2
    assert "needs the base model" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--dtype", "f16", "--output", str(tmp_path / "x")]) == 2
    assert "dtype applies to --format gguf" in capsys.readouterr().err
    with pytest.raises(ValueError, match="modules_to_save"):  # a classification head is no LoRA update
        ex.write_gguf(ex.read_adapter(tmp_path / "adapter"), str(tmp_path / "x.gguf"), ex.GgufBase("llama", 2, 2, 2))
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        ex.read_adapter(tmp_path)


def _llama_adapter(ranks, seed=0):
    """HyperAdaLoRA on a tiny LLaMA with fixed, known tensors of the given per-layer ranks."""
    base = make_llama()
    model = ha.get_peft_model(base, ha.HyperAdaLoraConfig(
        init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2, deltaT=1, init="normal", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    model.drop_hypernetworks()
    g = torch.Generator().manual_seed(seed)
    for layer, r in zip(model.adapters, ranks):
        layer.set_fixed(torch.randn(layer.out_features, r, generator=g), torch.randn(r, generator=g),
                        torch.randn(r, layer.in_features, generator=g))
    return model


def test_gguf_layout_names_and_values(tmp_path):
    import gguf

    ranks = [3, 0, 1, 4, 2, 2, 1, 3, 4, 1]  # 2 blocks x 5 modules, one layer at rank 0
    model = _llama_adapter(ranks)
    model.base_model.config.save_pretrained(tmp_path / "base")
    deltas = {n: layer.delta_weight() for n, layer in zip(model.target_names, model.adapters)}
    ex.export(ex.lora_weights(model), str(tmp_path / "a.gguf"), "gguf", base=str(tmp_path / "base"))

    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama" and field("adapter.lora.alpha") == 4.0
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    expected = {f"blk.{i}.{t}.weight.lora_{ab}" for i in range(2) for t in
                ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_down") for ab in "ab"}
    expected -= {"blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b"}  # rank 0: left out
    assert set(tensors) == expected
    cfg = model.base_model.config
    gguf_of = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "down_proj": "ffn_down"}
    for name, r in zip(model.target_names, ranks):
        if r == 0:
            continue
        block, kind = name.split(".")[2], name.rsplit(".", 1)[1]
        A, B = (tensors[f"blk.{block}.{gguf_of[kind]}.weight.lora_{ab}"] for ab in "ab")
        assert A.shape == (r, deltas[name].shape[1]) and B.shape == (deltas[name].shape[0], r)
        delta = (4.0 / r) * B @ A  # llama.cpp: scale alpha / rank, rank = the tensor's own
        if kind in ("q_proj", "k_proj"):  # llama.cpp's row order for RoPE: undo it
            heads = cfg.num_attention_heads if kind == "q_proj" else cfg.num_key_value_heads
            order = ex._rope_rows(delta.shape[0], heads)
            assert not torch.equal(order, torch.arange(delta.shape[0]))
            delta = delta[torch.argsort(order)]
        assert torch.allclose(delta, deltas[name], atol=1e-5, rtol=1e-5), name


def test_gguf_export_checks_the_base_file(tmp_path):
    from hyperadalora.base_models import smollm2_gguf_path

    model = _llama_adapter([1] * 10)
    with pytest.raises(ValueError, match=r"is \(1536, 576\) \(in, out\) in the base GGUF file but the adapter.s .* is \(64, 32\)"):
        ex.export(ex.lora_weights(model), str(tmp_path / "a.gguf"), "gguf", base=smollm2_gguf_path())
