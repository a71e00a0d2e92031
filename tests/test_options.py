"""One source of truth for the options: the config fields' metadata gives the groups (hypernetwork / AdaLoRA /
adapter), the options under ``TrainArgs.hyper``, the nullable ones and the command-line flags with their help."""

import dataclasses
import typing

import pytest

from hyperadalora import cli, config, training
from hyperadalora import methods as M
from hyperadalora.config import HyperAdaLoraConfig
from hyperadalora.training import TrainArgs, args_from_dict

# Every TrainArgs field has a flag, but:
NOT_FLAGS = {"hyper": "holds the options of HYPER_FIELDS, each a flag of its own"}


def flags() -> set:
    return set(cli.TRAIN_FLAGS) | set(cli.SWITCHES) | set(cli.NEGATED)


def method_configs() -> dict:
    return {m: training.config_class(m) for m in training.METHODS if training.config_class(m) is not None}


def test_every_field_has_a_group_and_help():
    for f in dataclasses.fields(HyperAdaLoraConfig):
        assert f.metadata.get("group") in config.GROUPS, f.name
        assert f.metadata.get("help"), f.name
    groups = config.ADAPTER_FIELDS + config.ADALORA_ONLY_FIELDS + config.HYPERNET_FIELDS
    assert sorted(groups) == sorted(f.name for f in dataclasses.fields(HyperAdaLoraConfig))  # a partition
    for f in dataclasses.fields(TrainArgs):
        assert f.metadata.get("help"), f.name


def test_the_lists_agree():
    # methods/: the same groups (imported), and the generated methods' hypernetwork options are exactly them
    assert M.base.HYPERNET_FIELDS == config.HYPERNET_FIELDS
    assert M.base.ADALORA_ONLY_FIELDS == config.ADALORA_ONLY_FIELDS
    assert M.base.ADAPTER_FIELDS == config.ADAPTER_FIELDS
    assert tuple(f.name for f in dataclasses.fields(M.HypernetOptions)) == config.HYPERNET_FIELDS
    # training: the options under ``hyper`` are the hypernetwork options and HyperAdaLoRA's rank allocation options
    # that no TrainArgs field sets
    adalora_rest = [n for n in config.ADALORA_ONLY_FIELDS if n not in training.TRAIN_ARG_FIELDS
                    and n not in training.FROM_THE_RUN]
    assert adalora_rest == ["importance", "beta1", "beta2"]
    assert set(training.HYPER_FIELDS) == set(config.HYPERNET_FIELDS) | set(adalora_rest)
    assert not set(training.HYPER_FIELDS) & set(training.TRAIN_ARG_FIELDS)
    # nullable: exactly the options under ``hyper`` whose type admits None
    hints = typing.get_type_hints(HyperAdaLoraConfig)
    optional = {n for n in training.HYPER_FIELDS if type(None) in typing.get_args(hints[n])}
    assert set(training.NULLABLE_HYPER_FIELDS) == optional == {"feature_dim", "feature_lr_ratio",
                                                               "feature_lr_ratio_final", "identity"}
    # cli: every option under ``hyper`` is a flag, parsed as the train flags parse it; the schedule options
    assert set(training.HYPER_FIELDS) <= set(cli.TRAIN_FLAGS)
    assert cli.SCHEDULE_OPTIONS == ("target_r", "tinit", "tfinal", "deltaT", "orth_reg_weight")


def test_every_config_field_is_reachable_from_the_cli():
    """A field of any method's config is a flag of its own, or set from one (FROM_THE_RUN: max_steps -> total_step,
    init_r -> r), or set from the task (task_type, modules_to_save: FROM_THE_RUN says why)."""
    for f in dataclasses.fields(TrainArgs):
        assert f.name in flags() or f.name in NOT_FLAGS, f"TrainArgs.{f.name} has no flag"
    assert set(NOT_FLAGS) <= set(training.TRAIN_ARG_FIELDS)
    for method, cls in method_configs().items():
        for f in dataclasses.fields(cls):
            source = training.FROM_THE_RUN.get(f.name, f.name)
            assert source in flags() or f.name in training.FROM_THE_RUN, f"{method}: {cls.__name__}.{f.name}"
            if source in training.TRAIN_ARG_FIELDS:
                assert source in flags()
    for name, source in training.FROM_THE_RUN.items():  # a flag, or a stated reason
        assert source in flags() or " " in source, name


def test_the_flags_take_the_fields_help_and_defaults():
    parser = cli.build_parser()
    text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for name in ("--init-std", "--max-element-tokens", "--hypernet-checkpointing", "--importance", "--beta1",
                 "--no-save-adapter", "--no-progress", "--load-in-4bit"):
        assert name in text, name
    assert "Std of the 'normal' initialisation. (default: 0.02)" in cli.TRAIN_FLAGS["init_std"][1]
    # a default that differs between the methods is said per method
    assert "principal for hyperadalora; orthonormal for hyperlora" in cli.TRAIN_FLAGS["init"][1]
    assert cli.TRAIN_FLAGS["importance"][1].startswith("hyperadalora: ")
    assert "10% of the steps" in cli.TRAIN_FLAGS["tinit"][1]


@pytest.mark.parametrize("argv, hyper", [
    (["--init-std", "0.05"], {"init_std": 0.05}),
    (["--max-element-tokens", "1000"], {"max_element_tokens": 1000}),
    (["--hypernet-checkpointing", "false"], {"hypernet_checkpointing": False}),
    (["--importance", "sensitivity", "--beta1", "0.9"], {"importance": "sensitivity", "beta1": 0.9}),
    (["--feature-dim", "none"], {"feature_dim": None}),
])
def test_new_flags_reach_the_config(argv, hyper):
    ns = cli.build_parser().parse_args(["train"] + argv)
    args = args_from_dict(cli.collect_options(ns))
    assert args.hyper == hyper
    cfg = training.adapter_config(args, ["query"], "SEQ_CLS")
    for k, v in hyper.items():
        assert getattr(cfg, k) == v


def test_no_save_adapter_flag():
    ns = cli.build_parser().parse_args(["train", "--no-save-adapter", "--no-progress"])
    args = args_from_dict(cli.collect_options(ns))
    assert args.save_adapter is False and args.progress is False


@pytest.mark.parametrize("argv, message", [
    (["--method", "hyperlora", "--importance", "sensitivity"],
     "--importance: options of HyperAdaLoRA's rank allocation (--method hyperadalora only), not of --method hyperlora"),
    (["--method", "adalora", "--beta1", "0.9", "--beta2", "0.9"], "--beta1, --beta2: options of HyperAdaLoRA's rank "
                                                                  "allocation (--method hyperadalora only), not of "
                                                                  "--method adalora"),
])
def test_rank_allocation_options_apply_to_hyperadalora_only(argv, message, capsys, tmp_path):
    assert cli.main(["train", "--max-steps", "5", "--output-dir", str(tmp_path / "o")] + argv) == 2
    assert message in capsys.readouterr().err


def test_generated_methods_take_init_std_and_max_element_tokens():
    args = TrainArgs(method="hyperlora", hyper={"init_std": 0.5, "max_element_tokens": 99})
    cfg = training.adapter_config(args, ["query"], "SEQ_CLS")
    assert cfg.init_std == 0.5 and cfg.max_element_tokens == 99
    options = training.hypernetwork_options(args)
    assert options["init_std"] == 0.5 and "importance" not in options  # hyperlora has no rank allocation
    assert training.hypernetwork_options(TrainArgs())["importance"] == "magnitude"


def test_options_added_to_the_record_match_every_earlier_run():
    """A record from before init_std / max_element_tokens / beta1 / beta2 were options reads as their defaults (the
    only values any run could have used), so that earlier runs are still reused and resumed."""
    cfg = HyperAdaLoraConfig()
    for name, value in training.OPTIONS_ADDED_LATER.items():
        assert getattr(cfg, name) == value, name
    old = {k: v for k, v in training.hypernetwork_options(TrainArgs()).items()
           if k not in ("init_std", "max_element_tokens", "beta1", "beta2")}
    assert training.recorded_options(old) == {**training.OPTIONS_ADDED_LATER, **old}
    assert all(training.recorded_options(old)[k] == v for k, v in training.hypernetwork_options(TrainArgs()).items())
