"""The command line: ``hyperadalora {train,demo,experiment} ...`` (one parser, subcommands mapped to functions).

- ``hyperadalora train``: fine-tune one model with one method (HyperAdaLoRA, peft's LoRA / DoRA / AdaLoRA, or the
  other generated-adapter methods), writing metrics, a summary, checkpoints and the adapter;
- ``hyperadalora demo``: a short offline comparison of AdaLoRA and HyperAdaLoRA, with a report and a plot;
- ``hyperadalora experiment NAME``: the paper's experiments (``hyperadalora experiment --help`` lists them);
- ``hyperadalora export ADAPTER_DIR --format {peft,peft-uniform,gguf}``: a saved adapter in a serving engine's form.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

from . import __version__

TRAIN_FLAGS = {  # flag -> (type, help); every flag is also a YAML key of --config (with underscores)
    "method": (str, "hyperadalora | adalora | lora | dora (peft) | hyperlora | hyperdora | hydralora | hyperhydralora"),
    "model": (str, "model directory, .gguf file, hub name, or 'minilm' / 'smollm2' (default: minilm / smollm2)"),
    "task": (str, "cola sst2 mrpc qqp mnli qnli rte wnli | sentiment (embedded) | alpaca (instruction)"),
    "data_dir": (str, "GLUE TSV root (e.g. ../shared/data/glue); default: embedded data or the hub"),
    "data_path": (str, "instruction data file (Alpaca-style JSON / JSONL)"),
    "max_steps": (int, "optimizer steps"), "batch_size": (int, "examples per micro-batch (per process)"),
    "grad_accum": (int, "micro-batches per optimizer step"), "lr": (float, "learning rate"),
    "weight_decay": (float, "AdamW weight decay"), "warmup_steps": (int, "linear warm-up steps"),
    "scheduler": (str, "linear | constant"), "max_grad_norm": (float, "gradient clipping (0: off)"),
    "seed": (int, "random seed"), "max_length": (int, "max tokens per example"),
    "max_train_examples": (int, "subsample the training set"), "max_eval_examples": (int, "subsample the dev set"),
    "eval_every": (int, "evaluate every N steps (0: only at the end)"),
    "gen_eval_examples": (int, "instruction tasks: held-out prompts to generate for BLEU/ROUGE"),
    "max_new_tokens": (int, "generation length"),
    "output_dir": (str, "where metrics.jsonl, summary.json, checkpoints/ and adapter/ go (default: runs/train; "
                        "with --resume: the resumed run's directory)"),
    "dtype": (str, "float32 | bfloat16"), "device": (str, "cpu | cuda (default: auto)"),
    "precision": (str, "fp32 | bf16 (bf16 autocast of the model; the hypernetworks stay fp32); same as --dtype"),
    "init_r": (int, "initial rank (lora, dora and the other methods: their rank r)"),
    "target_r": (int, "final average rank (hyperadalora, adalora)"), "lora_alpha": (float, "alpha"),
    "lora_dropout": (float, "adapter dropout"), "tinit": (int, "steps before pruning (default: 10%% of the steps)"),
    "tfinal": (int, "steps at the final budget (default: 20%% of the steps)"),
    "deltaT": (int, "re-mask interval (hyperadalora, adalora)"),
    "orth_reg_weight": (float, "gamma of the orthogonal regulariser (hyperadalora, adalora)"),
    "resume": (str, "continue the run recorded in a checkpoint directory, or in a run's output dir (its newest valid "
                    "checkpoint): every option comes from the record; only --max-steps, --save-every, "
                    "--keep-checkpoints, --output-dir, --device, evaluation and progress flags may change"),
    "save_every": (int, "write a checkpoint every N optimizer steps (0: only at the end)"),
    "keep_checkpoints": (int, "newest checkpoints to keep (0: write none)"),
    "max_nonfinite": (int, "stop after this many consecutive NaN/Inf steps (they are skipped)"),
    "report_to": (str, "none | tensorboard (OUTPUT_DIR/tensorboard) | wandb (offline) | mlflow (file://OUTPUT_DIR/"
                       "mlruns): loss, lr, total rank, rank per layer and a rank heatmap"),
    # HyperAdaLoRA
    "hypernet": (str, "attention | mlp | cnn"), "attention": (str, "full | induced"),
    "n_induced": (int, "slots of induced attention"), "generation": (str, "recurrent | static"),
    "tokens": (str, "row | element"), "context": (str, "module | feature | layer_feature | none"), "importance": (str, "magnitude | sensitivity"),
    "hypernet_dim": (int, "hypernetwork width"), "hypernet_heads": (int, "attention heads"),
    "feature_dim": (lambda v: _optional(v, int, "--feature-dim"),
                    "width of the feature / layer_feature row embeddings (default 4; none: hypernet_dim)"),
    "hypernet_ffn_mult": (int, "feed-forward multiplier"), "output_scale": (float, "increment scale"),
    "momentum": (float, "recurrent momentum (1 = paper)"), "hypernet_lr_ratio": (float, "hypernetwork lr / lr"),
    "feature_lr_ratio": (lambda v: _optional(v, float, "--feature-lr-ratio"),
                         "row-embedding lr / lr (default 30; none: hypernet_lr_ratio)"),
    "feature_lr_ratio_final": (lambda v: _optional(v, float, "--feature-lr-ratio-final"),
                               "row-embedding lr / lr at the last step, reached geometrically (default none: "
                               "constant)"),
    "hypernet_warmup_steps": (int, "steps over which the hypernetworks' lr rises linearly to its ratios (default 0)"),
    "init": (str, "seed state of the generated tensors: orthonormal | principal | normal (default: principal for "
                  "hyperadalora, orthonormal for the other generated methods)"),
    "identity": (lambda v: _optional(v, str, "--identity"),
                 "zero_output | offset (static generation) | none (the generation's default)"),
    "increment_scale": (str, "state | width (units of the generated increment)"),
    "center_increment": (lambda v: _flag(v, "--center-increment"),
                         "true | false: remove the row mean of P/Q increments"),
    "basis": (str, "free | unit | orthonormal: what the generated P and Q are made into"),
    "lambda_codes": (lambda v: _flag(v, "--lambda-codes"),
                     "true | false: per-layer codes for every singular value (context layer_feature)"),
    "element_chunk": (int, "element tokens per attention chunk"),
    # HydraLoRA
    "n_heads": (int, "hydralora / hyperhydralora: B heads per layer (default 3)"),
    # quantized base
    "quant_type": (str, "with --load-in-4bit: nf4 | fp4 (default nf4)"),
}
SWITCHES = {  # flag -> help; on when given (also YAML keys, true / false)
    "load_in_4bit": "load the base model's linear layers in 4-bit (bitsandbytes; the task head stays full precision)",
    "load_in_8bit": "load the base model's linear layers in 8-bit (bitsandbytes LLM.int8)",
    "gradient_checkpointing": "recompute each layer's activations in backward (less memory, same losses)",
}


NONE = "none"  # a command-line value that stands for None (see collect_options)


def _optional(value: str, kind, name: str):
    """A number, or none / null (None: see `train.NULLABLE_HYPER_FIELDS`)."""
    if value.strip().lower() in ("none", "null"):
        return NONE
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} takes a{'n integer' if kind is int else ' number'} or none, "
                                         f"got {value!r}.") from None


def _flag(value: str, name: str) -> bool:
    """A true/false command-line value."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{name} takes true or false, got {value!r}.")


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}.")
    return {k.replace("-", "_"): v for k, v in data.items()}


# Options that only some methods use: given for another method, they are an error, not silently ignored.
SCHEDULE_OPTIONS = ("target_r", "tinit", "tfinal", "deltaT", "orth_reg_weight")   # rank budget schedule


def _defaults() -> dict:
    """The train flags' defaults, for the help text: TrainArgs' and HyperAdaLoraConfig's."""
    from .config import HyperAdaLoraConfig
    from .train import TrainArgs

    out = {}
    for cls in (TrainArgs, HyperAdaLoraConfig):
        for f in dataclasses.fields(cls):
            if f.name in TRAIN_FLAGS and f.default is not dataclasses.MISSING and f.default is not None:
                out.setdefault(f.name, f.default)
    return out


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same keys as the flags (flags win)")
    defaults = _defaults()
    for name, (typ, help_) in TRAIN_FLAGS.items():
        if name in defaults and "default" not in help_:
            value = defaults[name]
            help_ += f" (default: {str(value).lower() if isinstance(value, bool) else value})"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    parser.add_argument("--target-modules", dest="target_modules", default=None,
                        help="comma-separated module name suffixes (default: all attention and MLP projections)")
    for name, help_ in SWITCHES.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=help_)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    parser.add_argument("--overwrite", dest="overwrite", action="store_true", default=None,
                        help="replace a run already in --output-dir (its summary, metrics, checkpoints and adapter); "
                             "without it such a directory is refused")


def check_options_apply(options: dict) -> None:
    """Options given (flags or YAML) that the chosen method does not use are an error: a user who sets them
    expects them to act. dtype and precision name the same setting and must agree when both are given."""
    from .train import HYPER_FIELDS, METHODS, SCHEDULED_METHODS, config_class, has_hypernetworks

    method = options.get("method", "hyperadalora")

    def hint(names) -> str:
        one = "it" if len(names) == 1 else "them"
        return f"leave {one} out, or choose a method that uses {one}"

    given = [k for k in SCHEDULE_OPTIONS if options.get(k) is not None]
    if given and method not in SCHEDULED_METHODS:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: the rank budget schedule applies "
                         f"to hyperadalora and adalora only, not to --method {method} ({hint(given)}).")
    if method not in METHODS:
        return  # TrainArgs names the valid methods
    with_heads = [m for m in METHODS if config_class(m) is not None
                  and "n_heads" in {f.name for f in dataclasses.fields(config_class(m))}]
    if options.get("n_heads") is not None and method not in with_heads:
        raise ValueError(f"--n-heads applies to {' and '.join(with_heads)} only, not to --method {method} "
                         f"({hint(['n_heads'])}).")
    hyper = [k for k in HYPER_FIELDS if k in options or k in (options.get("hyper") or {})]
    if hyper and not has_hypernetworks(method):
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in hyper)}: hypernetwork options; "
                         f"--method {method} has no hypernetworks ({hint(hyper)}).")
    dtype, precision = options.get("dtype"), options.get("precision")
    if dtype is not None and precision is not None:
        from .train import DTYPES

        if DTYPES.get(precision, precision) != dtype:
            raise ValueError(f"--dtype {dtype} and --precision {precision} disagree (they name the same setting): "
                             f"give one of them.")


def collect_options(ns: argparse.Namespace) -> dict:
    options = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    for name in list(TRAIN_FLAGS) + list(SWITCHES) + ["target_modules", "progress", "overwrite"]:
        value = getattr(ns, name, None)
        if value is not None:
            options[name] = None if value is NONE else value
    if isinstance(options.get("target_modules"), str) and options["target_modules"] != "all-linear":
        options["target_modules"] = [t.strip() for t in options["target_modules"].split(",") if t.strip()]
    return options


def cmd_train(ns) -> int:
    from .resume import ResumeNote
    from .train import TrainingInterrupted, args_from_dict, train

    options = collect_options(ns)
    if not options.get("resume"):  # resuming: the record's method applies; anything that would change it is refused
        check_options_apply(options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResumeNote)
        args = args_from_dict(options)
    for w in caught:  # one line per option a resumed run changes; other warnings as they were
        if issubclass(w.category, ResumeNote):
            print(f"hyperadalora train: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    try:
        summary = train(args)
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: a checkpoint was written
        print(f"hyperadalora train: {e}", file=sys.stderr)
        return e.exit_code
    summary.pop("model", None)
    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate launch: process 0 reports
        return 0
    print(json.dumps({k: summary[k] for k in ("method", "task", "steps", "final_eval", "final_loss", "train_time_s",
                                              "median_step_s", "total_rank", "metrics", "adapter")}, indent=2))
    return 0


def cmd_demo(ns) -> int:
    from .experiments import compare
    from .train import args_from_dict

    given = collect_options(ns)
    if "method" in given:
        raise ValueError(f"demo always compares adalora with hyperadalora (method={given['method']!r} given): drop "
                         f"--method, or train one method with `hyperadalora train --method {given['method']}`.")
    check_options_apply(given)
    options = {"task": "sentiment", "max_steps": 200, "batch_size": 16, "max_length": 64, "lr": 1e-3,
               "max_eval_examples": 500, "output_dir": ns.output_dir, **given}
    base = args_from_dict(options)
    command = "hyperadalora demo " + " ".join(sys.argv[2:])
    result = compare(base, {"adalora": {"method": "adalora"}, "hyperadalora": {"method": "hyperadalora"}},
                     base.output_dir, reference="adalora", command=command.strip(),
                     title=f"adalora vs hyperadalora on {base.task} ({base.max_steps} steps)")
    from .experiments import format_table

    print("\n" + format_table(result) + "\n")
    print(f"Report:      {os.path.join(base.output_dir, 'report.md')}")
    print(f"Loss curves: {os.path.join(base.output_dir, result['plot'])}")
    print(f"Numbers:     {os.path.join(base.output_dir, 'results.json')}")
    return 0


def cmd_export(ns) -> int:
    from .export import VLLM_MAX_LORA_RANKS, export, read_adapter

    rank = ns.rank
    if rank is not None and rank != "auto":
        try:
            rank = int(rank)
        except ValueError:
            raise ValueError(f"--rank takes a positive integer or auto, got {rank!r}.") from None
    allowed = None
    if ns.allowed_ranks == "vllm":
        allowed = VLLM_MAX_LORA_RANKS
    elif ns.allowed_ranks:
        try:
            allowed = [int(v) for v in ns.allowed_ranks.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--allowed-ranks takes 'vllm' or a comma-separated list of integers, "
                             f"got {ns.allowed_ranks!r}.") from None
    weights = read_adapter(ns.adapter_dir)
    path = export(weights, ns.output, ns.format, rank=rank, allowed_ranks=allowed, base=ns.base, dtype=ns.dtype)
    ranks = [r for r in weights.ranks.values()]
    print(json.dumps({"format": ns.format, "output": path, "layers": len(ranks),
                      "layers_at_rank_0": sum(r == 0 for r in ranks), "max_rank": max(ranks),
                      "total_rank": sum(ranks)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperadalora", description=__doc__.replace("``", "'"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hyperadalora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune one model with one method (--method: hyperadalora, adalora, lora, "
                                     "dora, hyperlora, hyperdora, hydralora, hyperhydralora)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="a short real comparison of adalora and hyperadalora (offline)")
    add_train_flags(p)
    p.set_defaults(func=cmd_demo, output_dir="runs/demo")
    from .experiments import add_experiment_parser

    add_experiment_parser(sub)
    p = sub.add_parser("export", help="write a saved adapter in a serving engine's form: peft (per-layer ranks), "
                                      "peft-uniform (one rank, for vLLM / LoRAX) or gguf (llama.cpp)")
    p.add_argument("adapter_dir", help="a saved HyperAdaLoRA adapter (a run's adapter/) or a peft LoRA adapter")
    p.add_argument("--format", choices=("peft", "peft-uniform", "gguf"), default="peft")
    p.add_argument("--output", required=True, help="output directory (peft forms) or .gguf file")
    p.add_argument("--rank", default=None, help="peft-uniform: the one rank, or auto (default: the smallest that "
                                                 "holds every layer)")
    p.add_argument("--allowed-ranks", dest="allowed_ranks", default=None,
                   help="peft-uniform: round the rank up to one of these: vllm (vLLM's --max-lora-rank values "
                        "1,8,16,32,64,128,256,320,512) or a comma-separated list")
    p.add_argument("--base", default=None, help="gguf (required): the base model's .gguf file, smollm2, or a "
                                                "transformers model directory; peft forms: recorded as "
                                                "base_model_name_or_path")
    p.add_argument("--dtype", choices=("f32", "f16"), default=None, help="gguf: tensor type (default f32)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "output_dir", None) is None and ns.command == "demo":
        ns.output_dir = "runs/demo"
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as e:
        if os.environ.get("HYPERADALORA_DEBUG"):
            raise
        print(f"hyperadalora {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hyperadalora {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
