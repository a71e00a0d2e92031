"""HyperAdaLoraConfig: every invalid setting fails when the config is built, with a message that says what to fix."""

import dataclasses
import json
import re

import pytest

import hyperadalora as ha
from conftest import BERT_TARGETS, make_bert
from hyperadalora.config import CONFIG_NAME, HyperAdaLoraConfig




def test_defaults_are_valid():
    cfg = HyperAdaLoraConfig()
    assert cfg.init_r == 3 and cfg.target_r == 2 and cfg.total_step is None
    assert isinstance(cfg.lora_alpha, float)
    HyperAdaLoraConfig(total_step=10, tinit=4, tfinal=5)  # tinit + tfinal == total_step - 1 is fine
    HyperAdaLoraConfig(target_r=1)  # down to rank 1 per layer on average
    HyperAdaLoraConfig(init_r=4, target_r=4)


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("kwargs, pattern", [
    (dict(init_r=2, target_r=3), r"target_r=3 > init_r=2.*only shrink"),
    (dict(init_r=0, target_r=0), r"init_r=0 must be >= 1"),
    (dict(target_r=-1), r"target_r=-1 must be >= 1"),
    (dict(deltaT=0), r"deltaT=0 must be >= 1"),
    (dict(tinit=-1), r"tinit=-1 must be >= 0"),
    (dict(tfinal=-2), r"tfinal=-2 must be >= 0"),
    (dict(total_step=10, tinit=5, tfinal=5), r"tinit \+ tfinal = 5 \+ 5 >= total_step = 10"),
    (dict(total_step=10, tinit=11), r"tinit \+ tfinal = 11 \+ 0 >= total_step = 10.*Lower tinit/tfinal"),
    (dict(total_step=0), r"total_step=0 must be >= 1"),
    (dict(total_step=-5), r"total_step=-5 must be >= 1"),
    (dict(momentum=1.5), r"momentum=1.5 must be in \[0, 1\]"),
    (dict(momentum=-0.1), r"momentum=-0.1 must be in \[0, 1\]"),
    (dict(lora_dropout=1.0), r"lora_dropout=1.0 must be in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"lora_dropout=-0.1"),
    (dict(orth_reg_weight=-1), r"orth_reg_weight=-1.0 must be >= 0"),
    (dict(hypernet_lr_ratio=0), r"hypernet_lr_ratio, output_scale and init_std must be > 0"),
    (dict(output_scale=-1.0), r"output_scale"),
    (dict(init_std=0.0), r"init_std"),
    (dict(beta1=1.0), r"beta1=1.0 must be in \[0, 1\)"),
    (dict(beta2=-0.5), r"beta2=-0.5 must be in \[0, 1\)"),
    (dict(hypernet_dim=30, hypernet_heads=4), r"hypernet_dim=30 must be divisible by hypernet_heads=4"),
])
def test_invalid_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HyperAdaLoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs, named, fix", [
    (dict(lora_alpha=0), "lora_alpha=0.0", "Use a positive value"),
    (dict(lora_alpha=-8), "lora_alpha=-8.0", "Use a positive value"),
    (dict(target_r=0), "target_r=0", "Set target_r between 1 and init_r=3"),
    (dict(target_r=-2), "target_r=-2", "Set target_r between 1 and init_r=3"),
    (dict(lora_dropout=1.5), "lora_dropout=1.5", "0: no dropout"),
    (dict(tinit=-1), "tinit=-1", "0: none"),
    (dict(tfinal=-3), "tfinal=-3", "0: none"),
    (dict(deltaT=0), "deltaT=0", "1: at every step"),
    (dict(total_step=0), "total_step=0", "set it to the number of optimizer steps"),
    (dict(total_step=10, tinit=6, tfinal=4), "tinit + tfinal = 6 + 4 >= total_step = 10", "Lower tinit/tfinal"),
])
def test_adapter_and_schedule_values_are_refused_when_the_config_is_built(kwargs, named, fix):
    # lora_alpha <= 0 used to train (with a switched-off or sign-flipped adapter) and target_r=0 to prune every layer
    # to rank 0, refused only by export_lora at the end; the message names the field, the value and what to change
    with pytest.raises(ValueError) as info:
        HyperAdaLoraConfig(**kwargs)
    assert named in str(info.value) and fix in str(info.value)


def test_total_step_may_be_left_for_later_but_is_required_to_train():
    cfg = HyperAdaLoraConfig(total_step=None, tinit=50, tfinal=100)  # the schedule is checked once total_step is known
    with pytest.raises(ValueError, match="total_step is required for training"):
        ha.get_peft_model(make_bert(), dataclasses.replace(cfg, target_modules=BERT_TARGETS))


@pytest.mark.parametrize("field", ["hypernet_dim", "hypernet_heads", "n_induced", "element_chunk"])
@pytest.mark.parametrize("value", [0, -4])
def test_size_fields_must_be_positive(field, value):
    # Otherwise: hypernet_heads=0 -> bare ZeroDivisionError in the config; hypernet_dim<=0 -> obscure reshape /
    # negative-dimension errors at model build; element_chunk=0 -> ZeroDivisionError at the first forward;
    # n_induced=0 -> silently degenerate hypernetworks.
    with pytest.raises(ValueError, match=rf"{field}={value}"):
        HyperAdaLoraConfig(**{field: value})


def test_ffn_mult_zero_drops_the_feed_forward_block_except_for_the_mlp():
    assert HyperAdaLoraConfig(hypernet_ffn_mult=0, hypernet="cnn").hypernet_ffn_mult == 0
    assert HyperAdaLoraConfig(hypernet_ffn_mult=0, hypernet="attention").hypernet_ffn_mult == 0
    with pytest.raises(ValueError, match=r"hypernet_ffn_mult=-1 must be >= 0"):
        HyperAdaLoraConfig(hypernet_ffn_mult=-1)
    with pytest.raises(ValueError, match=r"hypernet='mlp' is made of feed-forward blocks"):
        HyperAdaLoraConfig(hypernet_ffn_mult=0, hypernet="mlp")


@pytest.mark.parametrize("field, value, choices", [
    ("hypernet", "transformer", ("attention", "mlp", "cnn")),
    ("generation", "autoregressive", ("recurrent", "static")),
    ("tokens", "column", ("row", "element")),
    ("context", "layer", ("module", "none")),
    ("importance", "gradient", ("magnitude", "sensitivity")),
    ("attention", "sparse", ("full", "induced")),
    ("init", "xavier", ("orthonormal", "normal")),
    ("basis", "cayley", ("free", "unit", "orthonormal")),
    ("task_type", "CLASSIFY", ("SEQ_CLS", "CAUSAL_LM")),
])
def test_unknown_choices(field, value, choices):
    with pytest.raises(ValueError) as info:
        HyperAdaLoraConfig(**{field: value})
    message = str(info.value)
    assert f"{field}={value!r} is not supported" in message
    for choice in choices:
        assert repr(choice) in message


@pytest.mark.parametrize("field, value", [
    ("init_r", "3"), ("target_r", 1.0), ("deltaT", 2.5), ("tinit", "0"), ("tfinal", None), ("hypernet_dim", 32.0),
    ("hypernet_heads", True), ("seed", "0"), ("n_induced", 16.0), ("element_chunk", [1024]),
])
def test_integer_fields_reject_other_types(field, value):
    with pytest.raises(TypeError, match=re.escape(f"{field} must be an integer, got {value!r}")):
        HyperAdaLoraConfig(**{field: value})


@pytest.mark.parametrize("value", [1.5, "10", 10.0, True])
def test_total_step_must_be_an_integer(value):
    with pytest.raises(TypeError, match="total_step must be an integer"):
        HyperAdaLoraConfig(total_step=value)


@pytest.mark.parametrize("field, value", [
    ("lora_alpha", "16"), ("lora_dropout", None), ("momentum", True), ("beta1", "0.85"), ("orth_reg_weight", [0.1]),
])
def test_number_fields_reject_other_types(field, value):
    with pytest.raises(TypeError, match=rf"{field} must be a number"):
        HyperAdaLoraConfig(**{field: value})


def test_numbers_are_normalised_and_task_type_enum_accepted():
    from peft import TaskType

    cfg = HyperAdaLoraConfig(lora_alpha=8, momentum=1, task_type=TaskType.SEQ_CLS, target_modules=("query", "key"))
    assert cfg.lora_alpha == 8.0 and isinstance(cfg.lora_alpha, float)
    assert isinstance(cfg.momentum, float)
    assert cfg.task_type == "SEQ_CLS" and type(cfg.task_type) is str
    assert cfg.modules_to_save == ["classifier", "score"]
    assert cfg.target_modules == ["key", "query"]
    json.dumps(cfg.to_dict())  # serialisable


# ------------------------------------------------------------------------------------------ get_peft_model
def test_get_peft_model_requires_total_step():
    cfg = HyperAdaLoraConfig(init_r=2, target_r=1, target_modules=BERT_TARGETS)
    with pytest.raises(ValueError, match="total_step"):
        ha.get_peft_model(make_bert(num_layers=1), cfg)


def test_target_modules_matching_nothing_names_them():
    cfg = HyperAdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["query", "q_proj", "nonexistent"])
    with pytest.raises(ValueError) as info:
        ha.get_peft_model(make_bert(num_layers=1), cfg)
    message = str(info.value)
    assert "q_proj" in message and "nonexistent" in message
    assert "query" not in message.split("match no")[0]  # only the unmatched ones are named
    assert "nn.Linear" in message


def test_target_modules_that_are_not_linear_give_a_hint():
    cfg = HyperAdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["LayerNorm"])
    with pytest.raises(ValueError, match=r"\['LayerNorm'\].*is a LayerNorm, not nn\.Linear"):
        ha.get_peft_model(make_bert(num_layers=1), cfg)


def test_target_modules_regex_matching_nothing():
    cfg = HyperAdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=r".*\.q_proj")
    with pytest.raises(ValueError, match=r"q_proj.*matches no nn\.Linear module"):
        ha.get_peft_model(make_bert(num_layers=1), cfg)


def test_get_peft_model_rejects_a_non_config():
    with pytest.raises(TypeError, match="HyperAdaLoraConfig"):
        ha.HyperAdaLoraModel(make_bert(num_layers=1), {"init_r": 2})


# ------------------------------------------------------------------------------------------ (de)serialisation
def _nondefault_config():
    return HyperAdaLoraConfig(init_r=5, target_r=2, lora_alpha=7, lora_dropout=0.1, target_modules=BERT_TARGETS,
                              task_type="SEQ_CLS", total_step=100, tinit=10, tfinal=20, deltaT=5,
                              importance="sensitivity", beta1=0.9, beta2=0.8, orth_reg_weight=0.3, hypernet="mlp",
                              attention="full", n_induced=8, generation="static", tokens="element", context="none",
                              hypernet_dim=24, hypernet_heads=3, hypernet_ffn_mult=3, output_scale=0.5, momentum=0.7,
                              hypernet_lr_ratio=2.0, init="normal", init_std=0.05, element_chunk=64,
                              max_element_tokens=1000, seed=7)


def test_save_and_from_pretrained_round_trip(tmp_path):
    cfg = _nondefault_config()
    cfg.save_pretrained(str(tmp_path / "adapter"), rank_pattern={"a": 1})
    with open(tmp_path / "adapter" / CONFIG_NAME) as f:
        data = json.load(f)
    assert data["peft_type"] == "HYPERADALORA" and data["rank_pattern"] == {"a": 1}
    loaded = HyperAdaLoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    # default config too (total_step None, target_modules None)
    HyperAdaLoraConfig().save_pretrained(str(tmp_path / "default"))
    assert HyperAdaLoraConfig.from_pretrained(str(tmp_path / "default")) == HyperAdaLoraConfig()


def test_model_save_pretrained_writes_a_loadable_config(tmp_path):
    cfg = HyperAdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=BERT_TARGETS, task_type="SEQ_CLS",
                             hypernet="mlp", hypernet_dim=8)
    model = ha.get_peft_model(make_bert(num_layers=1, hidden=16), cfg)
    model.save_pretrained(str(tmp_path))
    assert HyperAdaLoraConfig.from_pretrained(str(tmp_path)) == cfg


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"No {CONFIG_NAME} in .*save_pretrained"):
        HyperAdaLoraConfig.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        HyperAdaLoraConfig.from_pretrained(str(tmp_path / "does-not-exist"))


@pytest.mark.parametrize("text", ["{not json", "", '{"init_r": 3,}'])
def test_from_pretrained_invalid_json(tmp_path, text):
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match="is not valid JSON"):
        HyperAdaLoraConfig.from_pretrained(str(tmp_path))


def test_from_pretrained_unknown_field_and_invalid_value(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"init_r": 3, "rank": 4}))
    with pytest.raises(ValueError, match=r"Unknown HyperAdaLoraConfig field\(s\) \['rank'\]"):
        HyperAdaLoraConfig.from_pretrained(str(tmp_path))
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"init_r": 2, "target_r": 3}))
    with pytest.raises(ValueError, match="target_r=3 > init_r=2"):
        HyperAdaLoraConfig.from_pretrained(str(tmp_path))
