"""The support matrix: every method of this package on tiny random-weight models of many transformers families.

Each *family* is a transformers config small enough for a CPU test (hidden 16, one or two layers, vocabulary 100),
built here (no download), with the task type a practitioner would use it for and the batch of that task. Each
(family, method) *case* runs the same checks (`run_case`):

- ``identity``: before training the adapted model gives the base model's outputs;
- ``train``: a few optimizer steps (HyperAdaLoRA with its rank allocation, which prunes some ranks) give finite
  losses, a lower evaluation loss than the base's, and other outputs;
- ``save/load``: ``save_pretrained`` then ``load_adapter`` onto a fresh base gives the same outputs;
- ``merge``: ``merge_and_unload`` of the loaded adapter gives the same outputs (n/a: HydraLoRA's router, which makes
  the update depend on the input, when it has more than one head);
- ``peft export``: ``export_lora`` loads in peft (``PeftModel.from_pretrained``) with the same outputs (n/a: DoRA,
  whose magnitude rescales the update, and HydraLoRA with more than one head).

``tests/test_support_matrix.py`` runs every case; ``python benchmarks/support_matrix.py`` runs them too and writes the
table ``docs/support-matrix.md`` (``--families`` / ``--methods`` run a part of it and print the table instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Optional

import torch
from torch import nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
METHODS = ("hyperadalora", "hyperlora", "hyperdora", "hydralora", "hyperhydralora")
CHECKS = ("identity", "train", "save/load", "merge", "peft export")
VOCAB, SEQ = 100, 8
SMALL = dict(vocab_size=VOCAB)


@dataclasses.dataclass
class Family:
    """A tiny model of one transformers family, the task it is adapted for and that task's batch."""

    name: str
    kind: str                       # encoder / decoder / encoder-decoder / vision / speech
    build: Callable[[], nn.Module]  # the same random weights at every call
    task_type: Optional[str]
    batch: Callable[[], dict]
    target_modules: object = None   # None: the defaults of the model type (peft's mappings)
    note: str = ""


def _seeded(factory):
    def build():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return factory().eval()
    return build


def _ids(n=2, length=SEQ, seed=1, low=3):
    return torch.randint(low, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def cls_batch():
    return {"input_ids": _ids(), "labels": torch.tensor([0, 1])}


def token_batch():
    return {"input_ids": _ids(), "labels": torch.randint(0, 2, (2, SEQ), generator=torch.Generator().manual_seed(2))}


def qa_batch():
    return {"input_ids": _ids(), "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}


def lm_batch():
    ids = _ids()
    return {"input_ids": ids, "labels": ids}


def features_batch():
    return {"input_ids": _ids()}


def s2s_batch():
    return {"input_ids": _ids(), "labels": _ids(length=5, seed=3)}


def image_batch(labels=True):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return {"pixel_values": x, **({"labels": torch.tensor([0, 1])} if labels else {})}


def speech_batch():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    return {"input_features": x, "labels": _ids(length=4, seed=3)}


def _t():
    import transformers
    return transformers


def _encoder(name, config_cls, model="AutoModelForSequenceClassification", task="SEQ_CLS", batch=cls_batch,
             targets=None, note="", **kw):
    def factory():
        t = _t()
        cfg = getattr(t, config_cls)(**{**SMALL, **kw})
        if task in ("SEQ_CLS", "TOKEN_CLS"):
            cfg.num_labels = 2
        return getattr(t, model).from_config(cfg)
    return Family(name, "encoder", _seeded(factory), task, batch, targets, note)


BERTLIKE = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32)
DECODER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=32)
GQA = dict(DECODER, num_key_value_heads=1)


def _decoder(name, config_cls, targets=None, note="", model="AutoModelForCausalLM", task="CAUSAL_LM", batch=lm_batch,
             **kw):
    def factory():
        t = _t()
        cfg = getattr(t, config_cls)(**{**SMALL, **kw})
        if task == "SEQ_CLS":
            cfg.num_labels, cfg.pad_token_id = 2, 0
        return getattr(t, model).from_config(cfg)
    return Family(name, "decoder", _seeded(factory), task, batch, targets, note)


def _vit():
    t = _t()
    return t.ViTForImageClassification(t.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, image_size=16, patch_size=8, num_labels=2))


def _clip_vision():
    t = _t()
    return t.CLIPVisionModel(t.CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=32, image_size=16, patch_size=8,
                                                projection_dim=16))


def _whisper():
    t = _t()
    cfg = t.WhisperConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                          max_source_positions=8, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
                          eos_token_id=2, bos_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)
    return t.WhisperForConditionalGeneration(cfg)


def _s2s(name, config_cls, **kw):
    def factory():
        t = _t()
        return t.AutoModelForSeq2SeqLM.from_config(getattr(t, config_cls)(**{**SMALL, **kw}))
    return Family(name, "encoder-decoder", _seeded(factory), "SEQ_2_SEQ_LM", s2s_batch)


BART = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
MOE = dict(GQA, num_experts_per_tok=1)

FAMILIES: list[Family] = [
    # encoders: sequence classification (the head, a module with sub-layers for RoBERTa-style models, trained whole)
    _encoder("bert", "BertConfig", **BERTLIKE),
    _encoder("roberta", "RobertaConfig", note="head with sub-layers (classifier.dense, classifier.out_proj)",
             **BERTLIKE),
    _encoder("xlm-roberta", "XLMRobertaConfig", **BERTLIKE),
    _encoder("distilbert", "DistilBertConfig", targets="all-linear",
             note="modules to save: pre_classifier and classifier (peft's suffix rule)",
             dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32),
    _encoder("albert", "AlbertConfig", targets=["query", "value"], embedding_size=8, **BERTLIKE),
    _encoder("electra", "ElectraConfig", embedding_size=8, **BERTLIKE),
    _encoder("deberta", "DebertaConfig", **BERTLIKE),
    _encoder("deberta-v2", "DebertaV2Config", **BERTLIKE),
    # the other task types of peft
    _encoder("bert-token-cls", "BertConfig", model="AutoModelForTokenClassification", task="TOKEN_CLS",
             batch=token_batch, note="TOKEN_CLS", **BERTLIKE),
    _encoder("roberta-qa", "RobertaConfig", model="AutoModelForQuestionAnswering", task="QUESTION_ANS",
             batch=qa_batch, note="QUESTION_ANS (qa_outputs trained whole)", **BERTLIKE),
    _encoder("bert-features", "BertConfig", model="AutoModel", task="FEATURE_EXTRACTION", batch=features_batch,
             note="FEATURE_EXTRACTION", **BERTLIKE),
    # decoders
    _decoder("gpt2", "GPT2Config", note="Conv1D layers (fan_in_fan_out); every projection targeted",
             targets=["c_attn", "c_proj", "c_fc"], n_embd=16, n_layer=1, n_head=2, n_positions=32),
    _decoder("gpt-neo", "GPTNeoConfig", hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
             max_position_embeddings=32),
    _decoder("gptj", "GPTJConfig", n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=32),
    _decoder("gpt-neox", "GPTNeoXConfig", **DECODER),
    _decoder("opt", "OPTConfig", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
             max_position_embeddings=32, word_embed_proj_dim=16),
    _decoder("bloom", "BloomConfig", hidden_size=16, n_layer=1, n_head=2),
    _decoder("llama", "LlamaConfig", **GQA),
    _decoder("llama-seq-cls", "LlamaConfig", model="AutoModelForSequenceClassification", task="SEQ_CLS",
             batch=cls_batch, note="SEQ_CLS (score trained whole)", **GQA),
    _decoder("mistral", "MistralConfig", **GQA),
    _decoder("qwen2", "Qwen2Config", **GQA),
    _decoder("qwen3", "Qwen3Config", head_dim=8, **GQA),
    _decoder("gemma", "GemmaConfig", head_dim=8, **GQA),
    _decoder("phi", "PhiConfig", **DECODER),
    _decoder("phi3", "Phi3Config", targets=["qkv_proj", "o_proj"], note="no peft default: targets named",
             pad_token_id=0, bos_token_id=1, eos_token_id=2, **GQA),
    _decoder("falcon", "FalconConfig", hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
    _decoder("stablelm", "StableLmConfig", **GQA),
    # mixture of experts (transformers 5: the experts are fused 3-D parameters; the attention is adapted)
    _decoder("mixtral", "MixtralConfig", note="MoE: attention adapted, fused experts and router not",
             num_local_experts=2, **MOE),
    _decoder("qwen2-moe", "Qwen2MoeConfig", note="MoE: attention adapted, fused experts and router not",
             num_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=16, **MOE),
    _decoder("qwen3-moe", "Qwen3MoeConfig", note="MoE: attention adapted, fused experts and router not",
             num_experts=2, moe_intermediate_size=16, head_dim=8, **MOE),
    # encoder-decoders
    _s2s("t5", "T5Config", d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
         decoder_start_token_id=0, pad_token_id=0),
    _s2s("bart", "BartConfig", **BART),
    # vision and speech
    Family("vit", "vision", _seeded(_vit), None, image_batch, "all-linear", "image classification (classifier saved)"),
    Family("clip-vision", "vision", _seeded(_clip_vision), None, lambda: image_batch(labels=False),
           ["q_proj", "v_proj"], "CLIP's vision tower (features: a regression loss)"),
    Family("whisper", "speech", _seeded(_whisper), None, speech_batch, "all-linear", "speech-to-text"),
]
FAMILY = {f.name: f for f in FAMILIES}
MODULES_TO_SAVE = {"vit": ["classifier"]}


# ---------------------------------------------------------------------------------------------- configs
def method_config(method: str, family: Family, **options):
    import hyperadalora as ha
    from hyperadalora import methods as M

    common = dict(target_modules=family.target_modules, task_type=family.task_type, lora_alpha=4.0)
    if family.name in MODULES_TO_SAVE:
        common["modules_to_save"] = MODULES_TO_SAVE[family.name]
    if method == "hyperadalora":
        return ha.HyperAdaLoraConfig(init_r=2, target_r=1, total_step=6, tinit=1, tfinal=1, deltaT=1,
                                     **{**common, **options})
    extra = {"n_heads": 2} if "n_heads" in {f.name for f in dataclasses.fields(M.get_method(method).config_cls)} \
        else {}
    return M.get_method(method).config_cls(r=2, **{**common, **extra, **options})


# ---------------------------------------------------------------------------------------------- checks
def outputs(model, batch) -> torch.Tensor:
    """The model's main output in evaluation (logits, else the last hidden state), without the labels."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    if "labels" in batch and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = batch["labels"]  # encoder-decoders: teacher forcing
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value.float()
    return out[0].float()


def loss_of(model, batch, target: Optional[torch.Tensor]) -> torch.Tensor:
    """The task loss; for a model without one (feature extraction) the mean squared distance of its features to a
    fixed random target."""
    if target is not None:
        inputs = dict(batch)
        out = model(**inputs)
        feats = getattr(out, "last_hidden_state", None)
        if feats is None:
            feats = getattr(out, "pooler_output")
        return ((feats - target) ** 2).mean()
    return model(**batch).loss


@dataclasses.dataclass
class Result:
    check: str
    status: str   # pass / fail / n/a
    detail: str = ""


def _close(a, b, atol=1e-5) -> tuple[bool, str]:
    diff = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
    return diff <= atol * max(1.0, b.abs().max().item()), f"max |diff| {diff:.2e}"


def run_case(family: Family, method: str, steps: int = 4, lr: float = 1e-2, **options) -> list[Result]:
    """The checks of one (family, method) case (`CHECKS`), in order; a check after a failed one that it needs is
    reported as failed too. ``options``: config fields other than the matrix's (e.g. ``n_heads=1``)."""
    import hyperadalora as ha

    results: dict[str, Result] = {}
    workdir = tempfile.mkdtemp(prefix=f"support-{family.name}-{method}-")
    try:
        batch = family.batch()
        base = family.build()
        reference = outputs(base, batch)
        target = None if any(k in batch for k in ("labels", "start_positions")) else \
            torch.randn(reference.shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            base_loss = float(loss_of(base, batch, target))
        model = ha.get_peft_model(base, method_config(method, family, **options))
        model.eval()
        ok, detail = _close(outputs(model, batch), reference)
        results["identity"] = Result("identity", "pass" if ok else "fail", detail)

        opt = torch.optim.AdamW(model.optimizer_param_groups(lr))
        losses = []
        ranks0 = model.total_rank
        for step in range(1, steps + 1):
            model.train()
            loss = loss_of(model, batch, target)
            loss.backward()
            opt.step()
            model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        model.eval()
        trained = outputs(model, batch)
        with torch.no_grad():
            after = float(loss_of(model, batch, target))
        moved = (trained - reference).abs().max().item()
        problems = []
        if not all(map(torch.isfinite, map(torch.tensor, losses + [after]))):
            problems.append(f"non-finite loss {losses}")
        if not after < base_loss:
            problems.append(f"loss did not fall ({base_loss:.4f} -> {after:.4f})")
        if moved == 0:
            problems.append("outputs did not move")
        if model.ALLOCATES_RANK and not model.total_rank < ranks0:
            problems.append(f"no rank pruned ({ranks0} -> {model.total_rank})")
        ranks = f", rank {ranks0} -> {model.total_rank}" if model.ALLOCATES_RANK else ""
        results["train"] = Result("train", "fail" if problems else "pass",
                                  "; ".join(problems) or f"loss {base_loss:.3f} -> {after:.3f}{ranks}")

        directory = os.path.join(workdir, "adapter")
        model.save_pretrained(directory)
        loaded = ha.load_adapter(family.build(), directory)
        ok, detail = _close(outputs(loaded, batch), trained)
        results["save/load"] = Result("save/load", "pass" if ok else "fail", detail)

        if "n_heads" in dataclasses.asdict(model.peft_config) and model.peft_config.n_heads > 1:
            results["merge"] = Result("merge", "n/a", "router: the update depends on the input")
        else:
            merged = loaded.merge_and_unload()
            ok, detail = _close(outputs(merged, batch), trained, atol=1e-4)
            results["merge"] = Result("merge", "pass" if ok else "fail", detail)

        if model.exports_lora:
            from peft import PeftModel

            model.export_lora(os.path.join(workdir, "lora"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = PeftModel.from_pretrained(family.build(), os.path.join(workdir, "lora")).eval()
            ok, detail = _close(outputs(peft_model, batch), trained, atol=1e-4)
            results["peft export"] = Result("peft export", "pass" if ok else "fail", detail)
        else:
            results["peft export"] = Result("peft export", "n/a", "not a plain B @ A update (DoRA, a router)")
    except Exception as e:  # noqa: BLE001 - every failure is a cell of the table
        failed = next((c for c in CHECKS if c not in results), CHECKS[-1])
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        results[failed] = Result(failed, "fail", tb[:300])
    finally:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return [results.get(c, Result(c, "fail", "not reached")) for c in CHECKS]


# ---------------------------------------------------------------------------------------------- the table
MARK = {"pass": "✓", "fail": "✗", "n/a": "–"}


def table(rows: dict, methods=METHODS) -> str:
    """Markdown: per method, one row per family with a column per check."""
    lines = []
    for method in methods:
        lines += [f"### {method}", "", "| family | kind | task | " + " | ".join(CHECKS) + " |",
                  "|---|---|---|" + "---|" * len(CHECKS)]
        for family in FAMILIES:
            if (family.name, method) not in rows:
                continue
            cells = [MARK[r.status] for r in rows[(family.name, method)]]
            lines.append(f"| {family.name} | {family.kind} | {family.task_type or '-'} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def failures(rows: dict) -> list[str]:
    return [f"{f} / {m} / {r.check}: {r.detail}" for (f, m), results in rows.items() for r in results
            if r.status == "fail"]


def document(rows: dict, seconds: float) -> str:
    import peft
    import transformers

    n_fail = len(failures(rows))
    n_pass = sum(r.status == "pass" for results in rows.values() for r in results)
    families = "\n".join(f"| {f.name} | {f.kind} | {f.task_type or '-'} | "
                         f"{f.target_modules if f.target_modules is not None else 'default (peft mapping)'} | "
                         f"{f.note} |" for f in FAMILIES)
    return f"""# Support matrix

Generated by `python benchmarks/support_matrix.py` (do not edit by hand): every method of this package on a tiny
random-weight model (hidden size 16, one layer, vocabulary 100; built from a transformers config, no download) of
{len(FAMILIES)} transformers families, with the checks of `benchmarks/support_matrix.py` (`run_case`), the same that
`tests/test_support_matrix.py` runs. transformers {transformers.__version__}, peft {peft.__version__}, torch
{torch.__version__}; {len(rows)} cases, {n_pass} checks passed, {n_fail} failed, in {seconds:.0f} s on one CPU thread.

✓ passed, ✗ failed, – not applicable:

- **identity**: before training, the adapted model's outputs are the base model's;
- **train**: {4} AdamW steps (HyperAdaLoRA with rank allocation: init_r 2 -> target_r 1, so ranks are pruned) give
  finite losses, an evaluation loss below the base model's, and outputs that moved;
- **save/load**: `save_pretrained`, then `load_adapter` onto a freshly built base: the same outputs;
- **merge**: `merge_and_unload()` of the loaded adapter: the same outputs (– for HydraLoRA with 2 heads: its router
  weighs the heads per token, so no single weight reproduces the update; `n_heads=1` merges);
- **peft export**: `export_lora`, then `peft.PeftModel.from_pretrained` on a fresh base: the same outputs (– for
  DoRA, whose trained magnitude rescales each output feature, and HydraLoRA with 2 heads: neither is a plain
  `B @ A` update).

A 4-bit (bitsandbytes nf4) base, the GGUF export of GPT-2 and Llama, the refusal of fused mixture-of-experts
parameters and unsupported combinations are tested in `tests/test_support_matrix.py` beside the matrix.

## What a model brings, and what happens to it

- **Which layers are adapted.** `target_modules=None` takes peft's defaults for the model type: its AdaLoRA mapping,
  then its LoRA mapping (and `q_proj` / `v_proj` for the mixture-of-experts types neither names: qwen2_moe,
  qwen3_moe, olmoe, granitemoe). A model type without defaults (distilbert, phi3, vit, whisper, clip, ...) is refused
  at `get_peft_model` with the layer names it could target. A list matches name suffixes, a string is a full-match
  regex, and `"all-linear"` is peft's: every `nn.Linear` and `Conv1D` but the output layer
  (`get_output_embeddings`), the task heads and the mixture-of-experts routers.
- **`Conv1D`** (GPT-2 and the families built on it; weight stored `(in, out)`) is adapted by every method as peft's
  `fan_in_fan_out`: merging writes the transposed update back into the `Conv1D`, the peft LoRA export sets
  `fan_in_fan_out=True`, the GGUF export (architecture `gpt2`) writes llama.cpp's layout.
- **Modules to save** are matched as peft matches them (a module whose name ends with an entry: for SEQ_CLS
  `classifier` also takes DistilBERT's `pre_classifier`) and trained, saved, loaded, merged and exported *whole*: a
  head with sub-layers (RoBERTa's `classifier.dense` / `classifier.out_proj`), an embedding (`embed_tokens`). A target
  layer inside a module to save is left to that module (trained in full, not adapted). As with peft's
  `ModulesToSaveWrapper`, the saved weights are the trained module's and `load_adapter` puts them back; the module is
  trained in place (this package has no `disable_adapter` that would need the original).
- **Mixture of experts** (transformers 5: Mixtral, Qwen2-MoE, Qwen3-MoE fuse each layer's experts into 3-D
  parameters): the attention projections are adapted by default; naming the experts (`experts`, `gate_up_proj`) is
  refused at `get_peft_model`, naming what can be targeted (peft's LoRA reaches fused experts with
  `target_parameters`; this package's methods do not); the router is never adapted by default.
- **Not supported**, refused at `get_peft_model` (the model left unchanged): a target that is not a linear layer
  (an embedding, a norm, fused expert parameters). Refused where the operation itself is undefined, with the
  reason: merging or LoRA-exporting a HydraLoRA with more than one head (its router makes the update depend on the
  input), LoRA-exporting DoRA (its magnitude rescales the update), a GGUF export of an architecture llama.cpp's LoRA
  loader is not mapped for here (llama, mistral, qwen2, qwen3, gpt2).
- **Quantized bases**: bitsandbytes 4-bit / 8-bit layers are adapted as any `nn.Linear`; the SmolLM2 alias and any
  `.gguf` model are converted once to a plain fp32 checkpoint (without GGUF's `quantization_config`), which then
  loads in 4-bit or 8-bit.

## Families

| family | kind | task type | target_modules | note |
|---|---|---|---|---|
{families}

## Results

{table(rows)}"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=None, help="a part of the families (default: all)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "support-matrix.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.path.join(ROOT, "src"))
    families = [FAMILY[n] for n in args.families] if args.families else FAMILIES
    rows, start = {}, time.perf_counter()
    for family in families:
        for method in args.methods:
            t0 = time.perf_counter()
            rows[(family.name, method)] = run_case(family, method)
            status = "".join(MARK[r.status] for r in rows[(family.name, method)])
            print(f"{family.name:16s} {method:15s} {status} {time.perf_counter() - t0:5.1f}s", flush=True)
    seconds = time.perf_counter() - start
    for line in failures(rows):
        print("FAIL", line)
    if args.families or set(args.methods) != set(METHODS):
        print(table(rows, args.methods))
    else:
        with open(args.output, "w") as f:
            f.write(document(rows, seconds))
        print(f"wrote {args.output}")
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
