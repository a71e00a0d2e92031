"""The command line: ``hyperadalora {train,demo,experiment} ...`` (one parser, subcommands mapped to functions).

- ``hyperadalora train``: fine-tune one model with one method (HyperAdaLoRA, peft's LoRA / DoRA / AdaLoRA, or the
  other generated-adapter methods), writing metrics, a summary, checkpoints and the adapter;
- ``hyperadalora demo``: a short offline comparison of AdaLoRA and HyperAdaLoRA, with a report and a plot;
- ``hyperadalora experiment NAME``: the paper's experiments (``hyperadalora experiment --help`` lists them);
- ``hyperadalora export ADAPTER_DIR --format {peft,peft-uniform,gguf}``: a saved adapter in a serving engine's form.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from . import __version__, cli_spec, experiment_args, extras

# Nothing above imports torch or transformers: every argument error is reported before they load (seconds). The
# options' metadata comes from `cli_spec` (a snapshot of `training.TrainArgs` and the methods' configs).
SPEC = cli_spec.load()
NONE = "none"  # a command-line value that stands for None (see collect_options)
FIELDS = {f["name"]: f for f in SPEC["fields"]}
HYPER_FIELDS = tuple(SPEC["hyper_fields"])
TRAIN_ARG_FIELDS = tuple(SPEC["train_defaults"])


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


def flag_of(name: str) -> str:
    """The command-line flag of an option (its TrainingArguments-style name where it has one)."""
    if name in ("dtype", "precision"):
        return "--bf16"
    return cli_spec.FLAG_NAMES.get(name, (_flag_name(name),))[0]


def _parser(entry: dict):
    """How a flag's value is read: by the field's type (true / false for a bool; ``none`` for a nullable field)."""
    kind, flag = entry["kind"], _flag_name(entry["name"])
    if kind == "bool":
        return lambda v: _flag(v, flag)
    kind = {"int": int, "float": float}.get(kind, str)  # str: also a list (comma-separated, split in collect_options)
    return (lambda v: _optional(v, kind, flag)) if entry["nullable"] else kind


def _train_flags() -> tuple[dict, dict, dict]:
    """The train flags, generated from the fields' metadata (one source: `training.TrainArgs` and the methods'
    configs, read through `cli_spec`): ({name: (parse, help)} of the flags that take a value, {name: help} of the
    switches (on when given), {name: (flag, help)} of the flags that turn an option off)."""
    flags, switches, negated = {}, {}, {}
    for entry in SPEC["fields"]:
        if entry["action"] == "switch":
            switches[entry["name"]] = entry["help"]
        elif entry["action"] == "negate":
            negated[entry["name"]] = (entry["negate"], entry["help"])
        else:
            flags[entry["name"]] = (_parser(entry), entry["help"])
    return flags, switches, negated


# flag -> (type, help), switch -> help, negated option -> (flag, help); every flag is also a YAML key of --config
TRAIN_FLAGS, SWITCHES, NEGATED = _train_flags()

# Options that only some methods use: given for another method, they are an error, not silently ignored. The rank
# budget schedule: AdaLoRA's fields that a TrainArgs field sets, but init_r (the other methods' rank r).
SCHEDULE_OPTIONS = tuple(SPEC["schedule_options"])


def _concept(dest: str) -> str:
    return "precision" if dest in cli_spec.PRECISION_ALIASES or dest == "bf16" else dest


class _Given(argparse.Action):
    """Stores a flag's value and refuses two spellings of one option (``--lr 1e-3 --learning-rate 2e-3``): one flag
    per concept, whichever name is used."""

    def __init__(self, option_strings, dest, const=None, nargs=None, **kwargs):
        self.fixed = const
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        spellings = namespace.__dict__.setdefault("_spellings", {})
        concept = _concept(self.dest)
        earlier = spellings.get(concept)
        if earlier is not None and earlier != option_string:  # refused by collect_options (exit status 2)
            namespace.__dict__.setdefault("_conflicts", []).append(
                f"{earlier} and {option_string} set the same option: give one of them.")
        spellings[concept] = option_string
        if self.dest == "bf16":  # --bf16 [true|false]: the precision
            setattr(namespace, "precision", "bf16" if values in (None, True) else "fp32")
            return
        setattr(namespace, self.dest, self.fixed if self.nargs == 0 else values)


def _help(text: str) -> str:
    return text.replace("%", "%%")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The train / demo flags, in the groups of `cli_spec.GROUPS` (as transformers groups TrainingArguments)."""
    groups = {key: parser.add_argument_group(title) for key, title in cli_spec.GROUP_TITLES.items()}
    groups["logging"].add_argument("--config", metavar="RUN.YAML",
                                   help="YAML file of option: value, with the names of these flags (e.g. "
                                        "learning_rate: 3e-3; the earlier names too); flags win")
    for entry in SPEC["fields"]:
        name = entry["name"]
        group = groups["hypernet" if entry["hyper"] and name not in cli_spec.GROUPS
                       else cli_spec.GROUPS.get(name, "training")]
        if name in cli_spec.PRECISION_ALIASES:  # earlier spellings of --bf16 (one flag per concept)
            group.add_argument(_flag_name(name), dest=name, action=_Given, type=TRAIN_FLAGS[name][0], default=None,
                               help=argparse.SUPPRESS)
            continue
        primary, aliases = cli_spec.FLAG_NAMES.get(name, (_flag_name(name), ()))
        if entry["action"] == "switch":
            group.add_argument(primary, *aliases, dest=name, action=_Given, nargs=0, const=True, default=None,
                               help=_help(entry["help"]))
        elif entry["action"] == "negate":
            strings = (primary, *aliases) if name in cli_spec.FLAG_NAMES else (entry["negate"],)
            group.add_argument(*strings, dest=name, action=_Given, nargs=0, const=False, default=None,
                               help=_help(f"do not {entry['help']}"))
        else:
            group.add_argument(primary, *aliases, dest=name, action=_Given, type=TRAIN_FLAGS[name][0], default=None,
                               metavar=primary[2:].upper().replace("-", "_"), help=_help(entry["help"]))
        if name == "seed":
            groups["training"].add_argument(
                "--bf16", dest="bf16", action=_Given, nargs="?", const=True, default=None,
                type=lambda v: _flag(v, "--bf16"), metavar="true|false",
                help="bf16 autocast of the model (the hypernetworks and their state stay fp32); default fp32. "
                     "Earlier spellings: --dtype bfloat16, --precision bf16")


def yaml_keys() -> dict:
    """{YAML key: option} of --config: the flags' names (with _ or -), the earlier names and the field names."""
    keys = {}
    for entry in SPEC["fields"]:
        name = entry["name"]
        keys[name] = name
        primary, aliases = cli_spec.FLAG_NAMES.get(name, (_flag_name(name), ()))
        for flag in (primary, *aliases):
            keys[flag[2:].replace("-", "_")] = name
        if entry["action"] == "negate" and name not in cli_spec.FLAG_NAMES:
            keys[entry["negate"][2:].replace("-", "_")] = name
    keys["bf16"] = "precision"
    return keys


def load_yaml(path: str) -> dict:
    """The options of a --config file, under their option (field) names; unknown or repeated keys are an error."""
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
    keys, options, spelled = yaml_keys(), {}, {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm == "hyper" and isinstance(value, dict):  # the options under hyper, as a mapping
            options["hyper"] = value
            continue
        if norm not in keys:
            raise ValueError(f"{path}: unknown option {key!r}. Valid keys: the names of `hyperadalora train --help`'s "
                             f"flags, e.g. learning_rate, per_device_train_batch_size, max_steps.")
        name = keys[norm]
        if _concept(name) in spelled:
            raise ValueError(f"{path}: {spelled[_concept(name)]!r} and {key!r} set the same option: give one of them.")
        spelled[_concept(name)] = key
        if norm == "bf16":
            value = "bf16" if value is True else "fp32" if value is False else value
        elif norm in ("disable_tqdm", "no_progress", "no_save_adapter") and isinstance(value, bool):
            value = not value  # the flag turns the option off
        if isinstance(value, str) and name in TRAIN_FLAGS and FIELDS[name]["kind"] in ("int", "float", "bool"):
            try:  # a string where a number is meant (YAML reads 3e-3 as a string): read as the flag reads it
                value = TRAIN_FLAGS[name][0](value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{path}: {key}: {e}") from None
            except ValueError:
                raise ValueError(f"{path}: {key}: expected a{'n integer' if FIELDS[name]['kind'] == 'int' else ' number'}"
                                 f", got {value!r}.") from None
            value = None if value is NONE else value
        options[name] = value
    return options


def check_options_apply(options: dict) -> None:
    """Options given (flags or YAML) that the chosen method does not use are an error: a user who sets them
    expects them to act. dtype and precision name the same setting and must agree when both are given."""
    method = options.get("method", "hyperadalora")

    def hint(names) -> str:
        one = "it" if len(names) == 1 else "them"
        return f"leave {one} out, or choose a method that uses {one}"

    given = [k for k in SCHEDULE_OPTIONS if options.get(k) is not None]
    if given and method not in SPEC["scheduled_methods"]:
        raise ValueError(f"{', '.join(flag_of(k) for k in given)}: the rank budget schedule applies "
                         f"to hyperadalora and adalora only, not to --method {method} ({hint(given)}).")
    if method not in SPEC["methods"]:
        return  # check_values names the valid methods
    fields = SPEC["method_fields"]
    with_heads = [m for m in SPEC["methods"] if fields[m] is not None and "n_heads" in fields[m]]
    if options.get("n_heads") is not None and method not in with_heads:
        raise ValueError(f"--n-heads applies to {' and '.join(with_heads)} only, not to --method {method} "
                         f"({hint(['n_heads'])}).")
    hyper = [k for k in HYPER_FIELDS if k in options or k in (options.get("hyper") or {})]
    nets = [k for k in hyper if k in SPEC["hypernet_fields"]]
    if nets and method not in SPEC["hypernet_methods"]:
        raise ValueError(f"{', '.join(_flag_name(k) for k in nets)}: hypernetwork options; "
                         f"--method {method} has no hypernetworks ({hint(nets)}).")
    foreign = [k for k in hyper if fields[method] is None or k not in fields[method]]
    if foreign:  # HyperAdaLoRA's rank allocation (importance, beta1, beta2)
        raise ValueError(f"{', '.join(_flag_name(k) for k in foreign)}: options of HyperAdaLoRA's rank allocation "
                         f"(--method hyperadalora only), not of --method {method} ({hint(foreign)}).")
    dtype, precision = options.get("dtype"), options.get("precision")
    if dtype is not None and precision is not None:
        if SPEC["dtypes"].get(precision, precision) != dtype:
            raise ValueError(f"--dtype {dtype} and --precision {precision} disagree (they name the same setting): "
                             f"give one of them (--bf16).")


def _int(options: dict, name: str, low: int) -> None:
    v = options.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
        raise ValueError(f"{flag_of(name)} {v!r}: must be {'a positive integer' if low == 1 else f'an integer >= {low}'}.")


def _choice(options: dict, name: str, valid) -> None:
    v = options.get(name)
    if v is not None and v not in valid:
        raise ValueError(f"{flag_of(name) if name not in ('dtype', 'precision') else '--' + name} {v!r}: choose one "
                         f"of {', '.join(map(str, valid))}.")


def _missing(path, what: str, flag: str, want_dir: bool = False) -> None:
    if path is None:
        return
    ok = os.path.isdir(path) if want_dir else os.path.exists(path)
    if not ok:
        raise FileNotFoundError(f"{flag} {path!r} does not exist{' (or is not a directory)' if want_dir else ''}: "
                                f"{what} was expected.")


def check_values(options: dict) -> None:
    """The checks of `training.TrainArgs` that need no model, data or torch, run on the options given before
    anything heavy is imported (TrainArgs checks them again, and the rest): unknown names, bad values, conflicting
    flags, missing files. Raises ValueError / FileNotFoundError / FileExistsError."""
    resume = options.get("resume")
    _missing(resume, "a checkpoint, or the output directory of a run", flag_of("resume"))
    _missing(options.get("data_path"), "an Alpaca-style JSON / JSONL file", "--data-path")
    _missing(options.get("data_dir"), "the GLUE TSV root", "--data-dir", want_dir=True)
    model = options.get("model")
    if isinstance(model, str) and (model.startswith((".", "/", "~")) or model.endswith(".gguf")):
        _missing(os.path.expanduser(model), "a model directory or .gguf file", flag_of("model"))
    _choice(options, "method", SPEC["methods"])
    task = options.get("task")
    if task is not None and str(task).strip().lower().replace("-", "") not in SPEC["tasks"]:
        raise ValueError(f"--task {task!r}: unknown task; valid tasks: {', '.join(SPEC['tasks'])}.")
    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "init_r"):
        _int(options, name, 1)
    for name, low in (("save_every", 0), ("keep_checkpoints", 0), ("max_nonfinite", 1), ("logging_steps", 0),
                      ("eval_every", 0), ("warmup_steps", 0)):
        if name in FIELDS:
            _int(options, name, low)
    lr = options.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
        raise ValueError(f"--learning-rate {lr!r}: must be a positive number.")
    _choice(options, "report_to", SPEC["report_to"])
    _choice(options, "scheduler", ("linear", "constant"))
    _choice(options, "dtype", list(SPEC["dtypes"].values()))
    _choice(options, "precision", list(SPEC["dtypes"]))
    if options.get("load_in_4bit") and options.get("load_in_8bit"):
        raise ValueError("--load-in-4bit and --load-in-8bit are both set: choose one.")
    if options.get("quant_type") is not None and not options.get("load_in_4bit") and not resume:
        raise ValueError(f"{flag_of('quant_type')} {options['quant_type']!r} applies to a 4-bit base only: add "
                         f"--load-in-4bit, or leave it out.")
    _choice(options, "quant_type", SPEC["quant_types"])
    if options.get("load_in_4bit") or options.get("load_in_8bit"):  # an optional extra: looked up, not imported
        extras.require("bitsandbytes", "--load-in-4bit" if options.get("load_in_4bit") else "--load-in-8bit")
    if options.get("report_to") not in (None, "none"):
        extras.require(options["report_to"], f"--report-to {options['report_to']}")
    if resume:
        return  # the rest come from the checkpoint's record
    check_options_apply(options)
    defaults = SPEC["train_defaults"]
    method = options.get("method", defaults["method"])
    steps = options.get("max_steps", defaults["max_steps"])
    tinit, tfinal = options.get("tinit"), options.get("tfinal")
    tinit = max(0, min(steps // 10, steps - 1)) if tinit is None else tinit
    tfinal = max(0, min(max(1, steps // 5), steps - 2 - tinit)) if tfinal is None else tfinal
    if method in SPEC["scheduled_methods"] and tinit + tfinal >= steps:
        raise ValueError(f"tinit + tfinal = {tinit} + {tfinal} >= max_steps = {steps}: lower them or raise "
                         f"--max-steps.")
    if method == "adalora" and steps - tfinal < 2:
        raise ValueError(f"max_steps - tfinal = {steps} - {tfinal} < 2: peft's AdaLoRA needs at least one step "
                         f"before the final budget: raise --max-steps to {tfinal + 2} or lower --tfinal.")
    check_method_config(options, method, steps, tinit, tfinal)


def check_method_config(options: dict, method: str, steps: int, tinit: int, tfinal: int) -> None:
    """The values of HyperAdaLoRA's options and of the hypernetwork options (``--hypernet rnn``, ``--beta1 2``,
    ``--target-r 0``...), checked by `config.HyperAdaLoraConfig` itself (a module without torch) as the run would
    build it: for --method hyperadalora the whole config (`training.adapters.adapter_config`), for the other
    generated methods their hypernetwork options (`methods.base.HypernetOptions` validates them the same way)."""
    if method != "hyperadalora" and method not in SPEC["hypernet_methods"]:
        return  # peft's methods and hydralora: their own configs check them, after the imports
    from .config import HyperAdaLoraConfig  # no torch: the dataclass and its checks only

    hyper = {k: v for k, v in {**(options.get("hyper") or {}), **{k: options[k] for k in HYPER_FIELDS if k in options}}
             .items() if v is not None or k in SPEC["nullable_hyper_fields"]}  # as training.args_from_dict reads them
    if method == "hyperadalora":
        given = {**SPEC["train_defaults"], **{k: v for k, v in options.items() if v is not None}}
        HyperAdaLoraConfig(init_r=given["init_r"], target_r=given["target_r"], tinit=tinit, tfinal=tfinal,
                           deltaT=given["deltaT"], total_step=steps, orth_reg_weight=given["orth_reg_weight"],
                           lora_alpha=given["lora_alpha"], lora_dropout=given["lora_dropout"], seed=given["seed"],
                           **hyper)
    else:
        HyperAdaLoraConfig(**{k: v for k, v in hyper.items() if k in SPEC["hypernet_fields"]})


def collect_options(ns: argparse.Namespace) -> dict:
    """The options of a train / demo command: the --config file's, then the flags' (flags win)."""
    conflicts = getattr(ns, "_conflicts", None)
    if conflicts:
        raise ValueError(conflicts[0])
    options = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    if any(getattr(ns, k, None) is not None for k in cli_spec.PRECISION_ALIASES):
        for k in cli_spec.PRECISION_ALIASES:  # a precision flag replaces the file's, whichever spelling
            options.pop(k, None)
    for name in list(TRAIN_FLAGS) + list(SWITCHES) + list(NEGATED):
        value = getattr(ns, name, None)
        if value is not None:
            options[name] = None if value is NONE else value
    if isinstance(options.get("target_modules"), str) and options["target_modules"] != "all-linear":
        options["target_modules"] = [t.strip() for t in options["target_modules"].split(",") if t.strip()]
    return options


def _heavy_imports():
    """torch, transformers, peft and the training code: the first stage of a run (seconds to a minute)."""
    from . import progress

    with progress.stage("import", "importing torch, transformers and peft", quiet_below=2.0):
        from . import training
    return training


def cmd_train(ns) -> int:
    from . import progress

    options = collect_options(ns)
    check_values(options)
    if not options.get("resume"):
        out = options.get("output_dir") or SPEC["default_output_dir"]
        present = [n for n in SPEC["run_files"] if os.path.exists(os.path.join(out, n))]
        if present and not options.get("overwrite"):
            raise FileExistsError(f"{out!r} already holds a run ({', '.join(present)}). Continue it with "
                                  f"--resume-from-checkpoint {out}, replace it with --overwrite-output-dir, or "
                                  f"choose another --output-dir.")
    progress.STAGES.enabled = options.get("progress", True) and os.environ.get("RANK", "0") == "0"
    training = _heavy_imports()
    from .resume import ResumeNote

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
    print(json.dumps({k: summary.get(k) for k in ("method", "task", "steps", "final_eval", "final_loss",
                                                   "train_time_s", "median_step_s", "total_rank", "process_time_s",
                                                   "metrics", "adapter")}, indent=2))
    return 0


def cmd_demo(ns) -> int:
    given = collect_options(ns)
    if "method" in given:
        raise ValueError(f"demo always compares adalora with hyperadalora (method={given['method']!r} given): drop "
                         f"--method, or train one method with `hyperadalora train --method {given['method']}`.")
    check_values({"max_steps": 200, **given, "output_dir": "", "method": "hyperadalora"})
    options = {"task": "sentiment", "max_steps": 200, "batch_size": 16, "max_length": 64, "lr": 1e-3,
               "max_eval_examples": 500, "output_dir": ns.output_dir, **given}
    training = _heavy_imports()
    from .experiments import compare, format_table

    base = training.args_from_dict(options)
    command = "hyperadalora demo " + " ".join(sys.argv[2:])
    result = compare(base, {"adalora": {"method": "adalora"}, "hyperadalora": {"method": "hyperadalora"}},
                     base.output_dir, reference="adalora", command=command.strip(),
                     title=f"adalora vs hyperadalora on {base.task} ({base.max_steps} steps)")
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
    report = {"format": ns.format, "output": path, "layers": len(ranks),
              "layers_at_rank_0": sum(r == 0 for r in ranks), "max_rank": max(ranks), "total_rank": sum(ranks)}
    if ns.format == "peft-uniform":  # the rank it wrote (its config's r): the trained ranks padded to one
        with open(os.path.join(path, "adapter_config.json")) as f:
            report = {**report, "r": json.load(f)["r"], "trained_max_rank": report.pop("max_rank"),
                      "trained_total_rank": report.pop("total_rank")}
    print(json.dumps(report, indent=2))
    return 0


def cmd_experiment(ns) -> int:
    _heavy_imports()
    from .experiments import cmd_experiment as run

    return run(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperadalora", description=__doc__.replace("``", "'"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hyperadalora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune one model with one method (--method: hyperadalora, adalora, lora, "
                                     "dora, hyperlora, hyperdora, hydralora, hyperhydralora)",
                       usage="hyperadalora train [--config RUN.YAML] [options]  (--help: the options, by group)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="a short real comparison of adalora and hyperadalora (offline)",
                       usage="hyperadalora demo [options]  (--help: the options, by group)")
    add_train_flags(p)
    p.set_defaults(func=cmd_demo, output_dir="runs/demo")
    experiment_args.add_parser(sub, SPEC["experiments"], SPEC["formulation_variants"], cmd_experiment)
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
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError, extras.MissingExtraError) as e:
        if os.environ.get("HYPERADALORA_DEBUG"):
            raise
        print(f"hyperadalora {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hyperadalora {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
