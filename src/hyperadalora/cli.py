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
import typing
import warnings

from . import __version__, training
from .config import ADALORA, ADALORA_ONLY_FIELDS, HYPERNET_FIELDS, HyperAdaLoraConfig
from .resume import ResumeNote

NONE = "none"  # a command-line value that stands for None (see collect_options)


def _optional(value: str, kind, name: str):
    """A value, or none / null (None: see `training.NULLABLE_HYPER_FIELDS`)."""
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


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation):
    """int for Optional[int]; list for a list or a union holding one (target_modules)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:
        return list if any(typing.get_origin(a) is list or a is list for a in args) else _base_type(args[0])
    return typing.get_origin(annotation) or annotation


def _parser(name: str, annotation, nullable: bool):
    """How a flag's value is read: by the field's type (true / false for a bool; ``none`` for a nullable field)."""
    kind, flag = _base_type(annotation), _flag_name(name)
    if kind is bool:
        return lambda v: _flag(v, flag)
    kind = kind if kind in (int, float) else str  # str: also a list (comma-separated, split in collect_options)
    return (lambda v: _optional(v, kind, flag)) if nullable else kind


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _default_text(name: str) -> str:
    """A hyper option's default, per method where the methods' configs differ (e.g. init)."""
    by_value: dict = {}
    for method in training.METHODS:
        cls = training.config_class(method)
        found = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
        if name in found and found[name].default is not dataclasses.MISSING:
            by_value.setdefault(_show(found[name].default), []).append(method)
    if len(by_value) == 1:
        return f" (default: {next(iter(by_value))})"
    return " (default: " + "; ".join(f"{v} for {', '.join(ms)}" for v, ms in by_value.items()) + ")"


def _train_flags() -> tuple[dict, dict, dict]:
    """The train flags, generated from the fields' metadata (one source: `training.TrainArgs` and the methods'
    configs): ({name: (parse, help)} of the flags that take a value, {name: help} of the switches (on when given),
    {name: (flag, help)} of the flags that turn an option off)."""
    flags, switches, negated = {}, {}, {}
    hints = typing.get_type_hints(training.TrainArgs)
    for f in dataclasses.fields(training.TrainArgs):
        help_ = f.metadata["help"]
        if f.metadata.get("cli") is False:
            continue
        if f.metadata.get("switch"):
            switches[f.name] = help_
        elif f.metadata.get("negate"):
            negated[f.name] = (f.metadata["negate"], help_)
        else:
            if f.default not in (None, dataclasses.MISSING) and "default" not in help_:
                help_ += f" (default: {_show(f.default)})"
            flags[f.name] = (_parser(f.name, hints[f.name], False), help_)
    hints = typing.get_type_hints(HyperAdaLoraConfig)
    fields = {f.name: f for f in dataclasses.fields(HyperAdaLoraConfig)}
    for name in training.HYPER_FIELDS:
        f = fields[name]
        help_ = f.metadata["help"]
        if f.metadata["group"] == ADALORA:
            help_ = "hyperadalora: " + help_
        flags[name] = (_parser(name, hints[name], name in training.NULLABLE_HYPER_FIELDS),
                       help_ + ("" if "default" in help_.lower() else _default_text(name)))
    return flags, switches, negated


# flag -> (type, help), switch -> help, negated option -> (flag, help); every flag is also a YAML key of --config
TRAIN_FLAGS, SWITCHES, NEGATED = _train_flags()


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


# Options that only some methods use: given for another method, they are an error, not silently ignored. The rank
# budget schedule: AdaLoRA's fields that a TrainArgs field sets, but init_r (the other methods' rank r).
SCHEDULE_OPTIONS = tuple(name for name in ADALORA_ONLY_FIELDS if name in training.TRAIN_ARG_FIELDS and name != "init_r")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same keys as the flags (flags win)")
    for name, (typ, help_) in TRAIN_FLAGS.items():
        parser.add_argument(_flag_name(name), dest=name, type=typ, default=None, help=help_.replace("%", "%%"))
    for name, help_ in SWITCHES.items():
        parser.add_argument(_flag_name(name), dest=name, action="store_true", default=None,
                            help=help_.replace("%", "%%"))
    for name, (flag, help_) in NEGATED.items():
        parser.add_argument(flag, dest=name, action="store_false", default=None,
                            help=f"do not {help_}".replace("%", "%%"))


def check_options_apply(options: dict) -> None:
    """Options given (flags or YAML) that the chosen method does not use are an error: a user who sets them
    expects them to act. dtype and precision name the same setting and must agree when both are given."""
    method = options.get("method", "hyperadalora")

    def hint(names) -> str:
        one = "it" if len(names) == 1 else "them"
        return f"leave {one} out, or choose a method that uses {one}"

    given = [k for k in SCHEDULE_OPTIONS if options.get(k) is not None]
    if given and method not in training.SCHEDULED_METHODS:
        raise ValueError(f"{', '.join(_flag_name(k) for k in given)}: the rank budget schedule applies "
                         f"to hyperadalora and adalora only, not to --method {method} ({hint(given)}).")
    if method not in training.METHODS:
        return  # TrainArgs names the valid methods
    with_heads = [m for m in training.METHODS if training.config_class(m) is not None
                  and "n_heads" in {f.name for f in dataclasses.fields(training.config_class(m))}]
    if options.get("n_heads") is not None and method not in with_heads:
        raise ValueError(f"--n-heads applies to {' and '.join(with_heads)} only, not to --method {method} "
                         f"({hint(['n_heads'])}).")
    hyper = [k for k in training.HYPER_FIELDS if k in options or k in (options.get("hyper") or {})]
    nets = [k for k in hyper if k in HYPERNET_FIELDS]
    if nets and not training.has_hypernetworks(method):
        raise ValueError(f"{', '.join(_flag_name(k) for k in nets)}: hypernetwork options; "
                         f"--method {method} has no hypernetworks ({hint(nets)}).")
    cls = training.config_class(method)
    foreign = [k for k in hyper if cls is None or k not in {f.name for f in dataclasses.fields(cls)}]
    if foreign:  # HyperAdaLoRA's rank allocation (importance, beta1, beta2)
        raise ValueError(f"{', '.join(_flag_name(k) for k in foreign)}: options of HyperAdaLoRA's rank allocation "
                         f"(--method hyperadalora only), not of --method {method} ({hint(foreign)}).")
    dtype, precision = options.get("dtype"), options.get("precision")
    if dtype is not None and precision is not None:
        if training.DTYPES.get(precision, precision) != dtype:
            raise ValueError(f"--dtype {dtype} and --precision {precision} disagree (they name the same setting): "
                             f"give one of them.")


def collect_options(ns: argparse.Namespace) -> dict:
    options = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    for name in list(TRAIN_FLAGS) + list(SWITCHES) + list(NEGATED):
        value = getattr(ns, name, None)
        if value is not None:
            options[name] = None if value is NONE else value
    if isinstance(options.get("target_modules"), str) and options["target_modules"] != "all-linear":
        options["target_modules"] = [t.strip() for t in options["target_modules"].split(",") if t.strip()]
    return options


def cmd_train(ns) -> int:
    options = collect_options(ns)
    if not options.get("resume"):  # resuming: the record's method applies; anything that would change it is refused
        check_options_apply(options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResumeNote)
        args = training.args_from_dict(options)
    for w in caught:  # one line per option a resumed run changes; other warnings as they were
        if issubclass(w.category, ResumeNote):
            print(f"hyperadalora train: note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    try:
        summary = training.train(args)  # looked up at the call: a replaced training.train applies
    except training.TrainingInterrupted as e:  # SIGINT / SIGTERM: a checkpoint was written
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

    given = collect_options(ns)
    if "method" in given:
        raise ValueError(f"demo always compares adalora with hyperadalora (method={given['method']!r} given): drop "
                         f"--method, or train one method with `hyperadalora train --method {given['method']}`.")
    check_options_apply(given)
    options = {"task": "sentiment", "max_steps": 200, "batch_size": 16, "max_length": 64, "lr": 1e-3,
               "max_eval_examples": 500, "output_dir": ns.output_dir, **given}
    base = training.args_from_dict(options)
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
