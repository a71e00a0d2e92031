"""The adapter of a run: its config, the wrapped model, its optimizer groups, and what the loop reads from it.

`build_adapter_model` is the default adapter builder of `train` (``train(args, build_adapter=...)`` takes another
one with the same signature: ``(args, model, task_type) -> (wrapped model, allocate(step) or None)``).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft import AdaLoraConfig, LoraConfig
from peft import get_peft_model as peft_get_peft_model

from .. import methods as method_lib
from .. import quantization as quant_lib
from ..config import HyperAdaLoraConfig
from ..mapping import get_peft_model
from ..methods import AdapterModel
from .args import TrainArgs


def default_target_modules(model) -> list[str]:
    """All attention and MLP projections of common architectures (same set for every method): BERT / RoBERTa,
    DeBERTa(-v2/-v3: the paper's encoders), Llama-style decoders; any other: peft's 'all-linear' (every linear
    layer but the output head)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bert = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    deberta = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for candidate in (bert, deberta, llama):
        if {c.rsplit(".", 1)[-1] for c in candidate} <= names:
            return candidate
    return "all-linear"


def build_adapter_model(args: TrainArgs, model, task_type: str):
    """Wrap ``model`` with the method's adapter. Returns (wrapped model, allocate(step) callable or None)."""
    with warnings.catch_warnings():
        # peft's PeftModel reads transformers 5's deprecated ``is_gradient_checkpointing``: not the user's to fix.
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        return _build_adapter_model(args, model, task_type)


def quantization_config(args: TrainArgs, kind: str):
    """The BitsAndBytesConfig of ``args`` (4-bit computes in the run's precision); the task head stays unquantized
    (trained in full): an encoder's classifier and pooler, a causal LM's lm_head."""
    skip = ["classifier", "pooler", "score"] if kind == "classification" else ["lm_head"]
    return quant_lib.bnb_config(args.load_in_4bit, args.load_in_8bit, args.quant_type or "nf4",
                                compute_dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32,
                                skip_modules=skip)


def task_type_of(kind: str) -> str:
    """peft's task type for a task kind (`data.TaskSpec.kind`): SEQ_CLS (classification) or CAUSAL_LM (instruction
    tuning)."""
    return "SEQ_CLS" if kind == "classification" else "CAUSAL_LM"


def adapter_config(args: TrainArgs, targets, task_type: str):
    """The adapter config of ``args.method`` (validated by its own ``__post_init__``)."""
    common = dict(target_modules=targets, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  task_type=task_type)
    if args.method == "hyperadalora":
        return HyperAdaLoraConfig(init_r=args.init_r, target_r=args.target_r, tinit=args.tinit, tfinal=args.tfinal,
                                  deltaT=args.deltaT, total_step=args.max_steps, orth_reg_weight=args.orth_reg_weight,
                                  seed=args.seed, **common, **args.hyper)
    if args.method in method_lib.METHODS:  # hyperlora, hyperdora, hydralora, hyperhydralora
        return method_lib.config_from_options(args.method, r=args.init_r, seed=args.seed, n_heads=args.n_heads,
                                              hyper=args.hyper, **common)
    if args.hyper:
        raise ValueError(f"Option(s) {sorted(args.hyper)} do not apply to method {args.method!r} (peft's own "
                         f"{args.method}: it has no hypernetworks).")
    if args.method == "adalora":
        return AdaLoraConfig(init_r=args.init_r, target_r=args.target_r, tinit=args.tinit, tfinal=args.tfinal,
                             deltaT=args.deltaT, total_step=args.max_steps, orth_reg_weight=args.orth_reg_weight,
                             **common)
    return LoraConfig(r=args.init_r, use_dora=args.method == "dora", **common)


def _build_adapter_model(args: TrainArgs, model, task_type: str):
    cfg = adapter_config(args, args.target_modules or default_target_modules(model), task_type)
    if args.method == "hyperadalora":
        wrapped = get_peft_model(model, cfg)
        return wrapped, wrapped.update_and_allocate
    if args.method in method_lib.METHODS:
        wrapped = get_peft_model(model, cfg)
        return wrapped, wrapped.after_optimizer_step
    wrapped = peft_get_peft_model(model, cfg)
    return wrapped, (wrapped.base_model.update_and_allocate if args.method == "adalora" else None)


def make_optimizer(wrapped, args: TrainArgs) -> torch.optim.AdamW:
    """The run's AdamW over `param_groups`, with torch's multi-tensor implementation (``foreach=True``): a handful of
    operators per step for all the parameters instead of about 9 per parameter. torch picks it by itself only for
    CUDA tensors; on the CPU it cut HyperAdaLoRA's fixed per-step operators by about a quarter (its hypernetworks are
    many small tensors, `benchmarks/op_count.py`). The updates are the same to the bit as the one-tensor-at-a-time
    loop's (`benchmarks/recorded_losses.json` still matches)."""
    return torch.optim.AdamW(param_groups(wrapped, args), lr=args.lr, weight_decay=args.weight_decay, foreach=True)


def param_groups(wrapped, args: TrainArgs) -> list[dict]:
    if isinstance(wrapped, AdapterModel):
        return wrapped.optimizer_param_groups(args.lr, args.weight_decay)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if args.pq_lr_ratio == 1.0:
        return [{"params": params, "lr": args.lr, "weight_decay": args.weight_decay}]
    # peft AdaLoRA with P (lora_B) and Q (lora_A) at lr * pq_lr_ratio; lambda (lora_E) and the head at lr
    pq = {id(p) for n, p in wrapped.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n)}
    if not pq:
        raise ValueError(f"pq_lr_ratio={args.pq_lr_ratio}: the model has no AdaLoRA P / Q (lora_A / lora_B) to train "
                         f"at another lr.")
    return [{"params": [p for p in params if id(p) in pq], "lr": args.lr * args.pq_lr_ratio,
             "weight_decay": args.weight_decay, "name": "adalora_pq"},
            {"params": [p for p in params if id(p) not in pq], "lr": args.lr, "weight_decay": args.weight_decay,
             "name": "others"}]


def total_rank(wrapped) -> int:
    """Kept ranks over all adapted layers (peft AdaLoRA: from its rank pattern once it masks)."""
    if isinstance(wrapped, AdapterModel):
        return wrapped.total_rank
    inner = getattr(wrapped, "base_model", None)
    cfg = wrapped.peft_config["default"]
    if type(inner).__name__ == "AdaLoraModel":
        if cfg.rank_pattern:
            return int(sum(sum(bool(b) for b in v) for v in cfg.rank_pattern.values()))
        return cfg.init_r * sum(1 for m in inner.modules() if hasattr(m, "lora_E") and "default" in m.lora_E)
    return int(sum(m.r["default"] for m in wrapped.modules()
                   if hasattr(m, "lora_A") and isinstance(getattr(m, "r", None), dict) and "default" in m.r))


def rank_pattern(model) -> dict:
    if isinstance(model, AdapterModel):
        return model.rank_pattern
    cfg = getattr(model, "peft_config", {}).get("default")
    return dict(getattr(cfg, "rank_pattern", None) or {}) if cfg is not None else {}


class TaskLossProbe:
    """Reads the task loss of a peft model before peft's AdaLoRA adds its regulariser.

    peft calls ``self.model.forward(...)`` directly (no module hooks fire), so the probe wraps the
    transformers model's ``forward`` for the duration of the run (`remove` restores it).
    """

    def __init__(self, wrapped):
        self.value: Optional[torch.Tensor] = None
        self.inner = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
        original = self.inner.forward

        def forward(*args, **kwargs):
            output = original(*args, **kwargs)
            loss = getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor):
                self.value = loss.detach().clone()
            return output

        self.inner.forward = forward

    def remove(self) -> None:
        self.inner.__dict__.pop("forward", None)
