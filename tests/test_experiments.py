"""The experiment suite on a tiny BERT / Llama and tiny GLUE / instruction files (no network, no shared data)."""

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import hyperadalora as ha
from hyperadalora import cli

from conftest import make_bert, make_llama
from hyperadalora.experiments import (EXPERIMENTS, ExperimentOptions, add_experiment_parser, cmd_experiment,
                                      format_table, run_experiment, steps_to_target, summarize)
from hyperadalora.experiments import nlg
from hyperadalora.experiments.convergence import (convergence, dev_speed, drop_target, final_smoothed, loss_per_epoch,
                                                  paired_gap)
from hyperadalora.experiments.formulation import VARIANTS, parse_option
from hyperadalora.experiments.goal import CLASSIFICATION_BOUND, goal_check, goal_table
from hyperadalora.experiments.options import as_options, command_line, seed_list
from hyperadalora.experiments.rank_allocation import layer_ranks, split_name
from hyperadalora.experiments.report import convergence_table, epoch_section, fmt_stat
from hyperadalora.experiments.stats import stats
from hyperadalora.experiments.task_setup import glue_task_available, window_for
from hyperadalora.training import HYPER_FIELDS, read_metrics

POS = ["good", "great", "fine", "happy", "nice"]
NEG = ["bad", "awful", "poor", "sad", "ugly"]


def sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = POS if i % 2 else NEG
        out.append((" ".join(words[j] for j in torch.randint(0, 5, (4,), generator=g).tolist()) + " movie", i % 2))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("bert")
    make_bert(vocab=tokenizer.vocab_size, hidden=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    (root / "RTE").mkdir()
    (root / "WNLI").mkdir()
    for name, n, seed in (("train.tsv", 48, 0), ("dev.tsv", 12, 1)):
        rows = sentences(n, seed)
        (root / "SST-2" / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
        rte = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{s}\tit is {'good' if y else 'bad'}\t{'entailment' if y else 'not_entailment'}"
            for i, (s, y) in enumerate(rows)]
        (root / "RTE" / name).write_text("\n".join(rte) + "\n")
        wnli = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t{s}\tit is\t{y}" for i, (s, y) in enumerate(rows)]
        (root / "WNLI" / name).write_text("\n".join(wnli) + "\n")
    return str(root)


def tiny(tmp_path, **kw):
    base = dict(steps=6, batch_size=8, max_length=16, max_eval_examples=8, output_dir=str(tmp_path / "out"))
    return ExperimentOptions(**{**base, **kw})


def check_outputs(result, n_png=1):
    out = result["report"].rsplit("/", 1)[0]
    report = open(result["report"]).read()
    assert report.startswith("# ")
    assert "hyperadalora experiment" in "\n".join(report.split("\n")[:6])  # the command, at the top
    assert "Full-size run" in report.split("\n## ")[-1]        # how to run the full-size version, at the bottom
    data = json.load(open(result["results_json"]))
    assert data["command"].startswith("hyperadalora experiment")
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert len(pngs) >= n_png
    for f in pngs:
        assert open(os.path.join(out, f), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    return report, data


# ---------------------------------------------------------------------------------------------- helpers
def test_steps_to_target_on_synthetic_curves():
    rows = [{"step": i + 1, "task_loss": 1.0 - 0.01 * i, "train_time": 0.5 * (i + 1)} for i in range(100)]
    step, t = steps_to_target(rows, 0.5, window=1)
    assert step == 51 and t == pytest.approx(25.0)  # training time from the end of step 1 (0.5 s) to step 51
    slow_start = [{**r, "train_time": r["train_time"] + 3.0} for r in rows]  # a process's one-off first-step cost
    assert steps_to_target(slow_start, 0.5, window=1) == (51, pytest.approx(25.0))
    step5, _ = steps_to_target(rows, 0.5, window=5)
    assert step5 == 53  # the trailing mean lags by (window - 1) / 2 steps
    assert steps_to_target(rows, 0.0, window=1) == (None, None)
    fast = [{"step": r["step"], "task_loss": 1.0 - 0.02 * i, "train_time": r["train_time"]} for i, r in enumerate(rows)]
    runs = {"ref": {"rows": rows, "summary": {"median_step_s": 0.5, "train_time_s": 50, "final_eval": {},
                                               "total_rank": 2}},
            "fast": {"rows": fast, "summary": {"median_step_s": 0.5, "train_time_s": 50, "final_eval": {},
                                                "total_rank": 2}}}
    res = summarize(runs, "ref", window=1)
    assert res["methods"]["ref"]["steps_to_target"] == 100
    assert res["methods"]["fast"]["steps_to_target"] == 51
    assert res["methods"]["fast"]["steps_ratio"] == pytest.approx(0.51)
    assert res["target_90"] is None  # a window of 1 has no noise estimate: no 90%-of-the-drop target
    # paired gap: at step i + 1 (i = 1..99, after the first window) fast is 0.01 i below ref, on every step
    assert res["methods"]["fast"]["loss_gap"] == pytest.approx(-0.5) and res["methods"]["fast"]["steps_below"] == 1.0
    assert res["methods"]["ref"]["loss_gap"] == 0.0 and res["methods"]["ref"]["steps_below"] == 0.0
    res5 = summarize(runs, "ref", window=5)
    # ref's smoothed loss goes from 0.98 (first 5 steps) to 0.03 (last 5): 90% of the way down is 0.125, which
    # the trailing means 1 - 0.01 (i - 2) and 1 - 0.02 (i - 2) reach at step 91 and step 47
    assert res5["target_90"] == pytest.approx(0.125)
    assert res5["methods"]["ref"]["steps_to_90"] == 91 and res5["methods"]["fast"]["steps_to_90"] == 47
    assert res5["methods"]["fast"]["steps_ratio_90"] == pytest.approx(47 / 91)
    assert "ratio (90%)" in format_table(res5) and res5["methods"]["fast"]["final_eval"] == {}


def test_paired_gap_compares_the_same_steps_only():
    ref = [{"step": s, "task_loss": 1.0} for s in range(1, 11)]
    rows = [{"step": s, "task_loss": 0.9 if s % 2 else 1.3} for s in range(1, 9)]  # 8 steps logged, ref 10
    gap = paired_gap(rows, ref, skip=2)                                      # steps 3..8
    assert gap["loss_gap"] == pytest.approx((3 * -0.1 + 3 * 0.3) / 6)
    assert gap["steps_below"] == pytest.approx(0.5)
    assert paired_gap(rows, ref, skip=20) == {"loss_gap": None, "steps_below": None}


def test_loss_per_epoch_splits_the_runs_at_each_pass_over_the_training_set():
    def run(level, n=10, per_epoch=4):
        return {"rows": [{"step": s, "epoch": (s - 1) // per_epoch, "task_loss": level - 0.01 * s}
                         for s in range(1, n + 1)]}

    runs = {0: {"ref": run(1.0), "hyper": run(0.9)}, 1: {"ref": run(1.2), "hyper": run(1.0)}}
    per_epoch = loss_per_epoch(runs, ["ref", "hyper"], "ref")
    assert [(e["epoch"], e["first_step"], e["last_step"]) for e in per_epoch] == [(0, 1, 4), (1, 5, 8), (2, 9, 10)]
    assert per_epoch[0]["ref"]["mean"] == pytest.approx(1.1 - 0.025)            # seeds 1.0 and 1.2, steps 1-4
    assert per_epoch[2]["hyper_gap"]["mean"] == pytest.approx(-0.15)             # -0.1 on seed 0, -0.2 on seed 1
    assert "ref_gap" not in per_epoch[0]
    text = "\n".join(epoch_section(per_epoch, ["ref", "hyper"], "ref"))
    assert "| 3 | 9-10 |" in text and "hyper - ref, same batches" in text
    one = loss_per_epoch({0: {"ref": run(1.0, n=3), "hyper": run(0.9, n=3)}}, ["ref", "hyper"], "ref")
    assert len(one) == 1 and "first pass" in epoch_section(one, ["ref", "hyper"], "ref")[0]
    no_epoch = {0: {"ref": {"rows": [{"step": 1, "task_loss": 1.0}]}, "hyper": {"rows": []}}}
    assert loss_per_epoch(no_epoch, ["ref", "hyper"], "ref") == []
    assert epoch_section([], ["ref"], "ref") == []


def test_convergence_statistics_over_seeds():
    def run(slope, seed_shift):
        rows = [{"step": i + 1, "task_loss": 1.0 - slope * i + seed_shift, "train_time": i + 1.0} for i in range(50)]
        return {"rows": rows, "summary": {"median_step_s": 1.0, "train_time_s": 50.0,
                                          "final_eval": {"accuracy": 0.5 + seed_shift}, "total_rank": 4}}

    runs = {s: {"ref": run(0.01, 0.01 * s), "fast": run(0.02, 0.01 * s)} for s in range(3)}
    conv = convergence(runs, window=1, reference="ref")
    assert conv["target_loss"]["n"] == 3
    ratio = conv["methods"]["fast"]["steps_ratio"]
    assert ratio["mean"] == pytest.approx(26 / 50) and ratio["min"] <= ratio["max"]
    assert conv["methods"]["fast"]["dev_accuracy"]["std"] > 0
    text = fmt_stat(conv["methods"]["fast"]["steps_to_target"], "{:.1f}")
    assert "±" in text and "[" in text
    assert fmt_stat(stats([None, None], "not reached")) == "n/a (not reached)"
    assert fmt_stat(stats([None, None])) == "n/a"                    # e.g. a loss gap: no reason
    assert "(1/2 seeds)" in fmt_stat(stats([3.0, None]))
    assert window_for(300) == 25 and window_for(60) == 6 and window_for(4) == 5


def test_steps_to_90_percent_of_the_reference_drop():
    # the reference falls from 1.0 to 0.5 by step 51 and then sits on a plateau at 0.5; "touch" falls twice as fast
    # and plateaus just above 0.5: it never reaches the final-loss target, but it is 2x faster to 90% of the drop
    def rows(slope, floor):
        return [{"step": i + 1, "task_loss": max(1.0 - slope * i, floor), "train_time": i + 1.0} for i in range(100)]

    summary = {"median_step_s": 1.0, "train_time_s": 100.0, "final_eval": {}, "total_rank": 4}
    runs = {0: {"ref": {"rows": rows(0.01, 0.5), "summary": summary},
                "touch": {"rows": rows(0.02, 0.501), "summary": summary}}}
    conv = convergence(runs, window=2, reference="ref")
    seed = conv["per_seed"][0]
    assert seed["target_90"] == pytest.approx(0.995 - 0.9 * (0.995 - 0.5))  # start: the mean of the first 2 losses
    touch = seed["methods"]["touch"]
    assert touch["steps_to_target"] is None                           # the final-loss target: never reached
    assert seed["methods"]["ref"]["steps_to_90"] == 47 and touch["steps_to_90"] == 25  # (2-step trailing means)
    assert touch["steps_ratio_90"] == pytest.approx(25 / 47)
    assert "ratio (90%)" in convergence_table(conv)
    rng = np.random.default_rng(0)
    flat = [{"step": i + 1, "task_loss": 0.69 + 0.03 * rng.standard_normal(), "train_time": 1.0} for i in range(200)]
    final = final_smoothed(flat, 20)
    assert drop_target(flat, final, window=20) is None          # a drop within the noise: no 90% level


def test_command_line_round_trips_through_the_parser():
    opts = ExperimentOptions(steps=50, seeds=3, lr=1e-4, tasks=["rte", "sst2"], data_path=["a b.json", "c.json"],
                             batch_sizes=[1, 2], reuse=True, output_dir="out dir")
    cmd = command_line("nlg", opts)
    parser = argparse.ArgumentParser(prog="hyperadalora")
    add_experiment_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(shlex.split(cmd)[1:])
    back = as_options({k: v for k, v in vars(ns).items()})
    for name in ("steps", "seeds", "lr", "tasks", "data_path", "batch_sizes", "reuse", "output_dir"):
        assert getattr(back, name) == getattr(opts, name), name
    assert ns.name == "nlg" and ns.func is cmd_experiment
    with pytest.raises(ValueError, match="steps"):
        as_options({"steps": 0})
    for seeds in ([2, 3], [5]):  # a list of seeds (to add seeds to an earlier run) round-trips too
        cmd = command_line("nlu-convergence", ExperimentOptions(seeds=seeds))
        back = as_options(vars(parser.parse_args(shlex.split(cmd)[1:])))
        assert back.seeds == seeds and seed_list(back, 1) == seeds, cmd
    specs = ["w20:hypernet_warmup_steps=20,lr_scale=2", "mlp:hypernet=mlp"]  # repeated, each with its commas
    cmd = command_line("formulation", ExperimentOptions(variant=specs))
    assert "--variant w20:hypernet_warmup_steps=20,lr_scale=2 --variant mlp:hypernet=mlp" in cmd
    assert as_options(vars(parser.parse_args(shlex.split(cmd)[1:]))).variant == specs
    assert seed_list(as_options({"seeds": "3"}), 1) == [0, 1, 2]
    assert seed_list(as_options({}), 2) == [0, 1]
    for bad in ("0", "-1", "a", "2,2", "1,x", [], True):
        with pytest.raises(ValueError, match="seeds"):
            as_options({"seeds": bad})
    with pytest.raises(ValueError, match="Unknown experiment"):
        run_experiment("nope")
    assert set(EXPERIMENTS) == {"nlu-convergence", "nlg", "ablation-hypernet", "gamma", "efficiency",
                                "rank-allocation", "extension", "formulation", "lr-sweep", "lr-sweep-why"}
    cmd = command_line("lr-sweep", ExperimentOptions(lrs=[1e-4, 3e-3, 0.03], report_only=True))
    back = as_options(vars(parser.parse_args(shlex.split(cmd)[1:])))
    assert back.lrs == [1e-4, 3e-3, 0.03] and back.report_only, cmd


def test_split_name():
    assert split_name("bert.encoder.layer.3.attention.self.query") == (3, "query")
    assert split_name("bert.encoder.layer.0.output.dense") == (0, "ffn.out")
    assert split_name("model.layers.2.self_attn.q_proj") == (2, "q_proj")


def test_layer_ranks_of_peft_adalora_follows_its_rank_pattern(bert):
    from hyperadalora.training import TrainArgs, build_adapter_model

    args = TrainArgs(method="adalora", max_steps=20, init_r=3, target_r=2)
    wrapped, _ = build_adapter_model(args, bert, "SEQ_CLS")
    ranks = layer_ranks(wrapped)
    assert len(ranks) == 12 and set(ranks.values()) == {3}
    name = next(iter(ranks))
    wrapped.peft_config["default"].rank_pattern = {f"{n}.lora_E.default": [True, n != name, False] for n in ranks}
    ranks = layer_ranks(wrapped)
    assert ranks[name] == 1 and sum(ranks.values()) == 1 + 2 * 11


# ---------------------------------------------------------------------------------------------- experiments
def test_nlu_convergence_tiny(tmp_path, tiny_bert_dir, glue_dir):
    res = run_experiment("nlu-convergence", tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, seeds=2,
                                                 tasks=["rte", "sst2", "mnli"]))
    report, data = check_outputs(res, n_png=6)  # loss, loss gap to AdaLoRA and dev accuracy per task
    assert data["tasks"]["rte"]["plots"] == ["loss_rte.png", "gap_rte.png", "dev_rte.png"]
    assert set(data["tasks"]) == {"rte", "sst2"} and "mnli" in data["skipped"]
    assert "mnli skipped" in report
    conv = data["tasks"]["sst2"]["convergence"]
    assert set(conv["methods"]) == {"adalora", "hyperadalora"}
    assert conv["methods"]["adalora"]["steps_to_target"]["n"] == 2     # adalora always reaches its own final loss
    assert len(conv["per_seed"]) == 2
    dev = data["tasks"]["rte"]["dev_at_checkpoints"]["hyperadalora"]
    assert sorted(int(s) for s in dev) == [1, 2, 3, 4, 5, 6]           # eval_every = steps // 4 = 1, and the end
    assert len(data["tasks"]["rte"]["curves"]["adalora"]["task_loss"]) == 2  # seeds
    # same data order: step 1 is the identity for both methods, so their first losses match
    c = data["tasks"]["sst2"]["curves"]
    assert c["adalora"]["task_loss"][0][0] == pytest.approx(c["hyperadalora"]["task_loss"][0][0], abs=1e-4)
    assert data["tasks"]["rte"]["loss_per_epoch"][0]["first_step"] == 1           # 48 examples, batch 8: one pass
    assert "within the first pass over the training set" in report
    assert "## Goal check" in report and data["tasks"]["sst2"]["goal_check"]["verdict"] in (
        "met", "not met", "not measurable")


def _conv(per_seed: dict) -> dict:
    """A `convergence` result with only what `goal_check` reads: {seed: (target_90, steps, time, dev, ref dev)}."""
    return {"reference": "adalora", "per_seed": {
        s: {"target_90": t90, "target_loss": None if t90 is None else t90 - 0.09, "methods": {"adalora": {"steps_ratio": 1.0, "time_ratio": 1.0, "dev_accuracy": ref},
                                           "hyper": {"steps_ratio": st, "time_ratio": ti, "dev_accuracy": dev,
                                                     "loss_gap": -0.01}}}
        for s, (t90, st, ti, dev, ref) in per_seed.items()}}


def test_goal_check_verdicts():
    def check(per_seed):
        return goal_check(_conv(per_seed), "hyper", {"accuracy": CLASSIFICATION_BOUND})

    met = check({0: (0.5, 0.6, 0.5, 0.80, 0.80), 1: (0.5, 0.95, 0.9, 0.80, 0.805)})
    assert met["verdict"] == "met" and met["steps_ratio"] == pytest.approx(0.775) and met["seeds_within_goal"] == 1
    assert met["quality"]["accuracy"]["points"] == pytest.approx(-0.25)
    assert met["reference_drop"] == pytest.approx(0.9) and met["loss_gap"] == pytest.approx(-0.01)   # start - target: the 90% level is 0.09 above the target
    slow = check({0: (0.5, 0.6, 0.5, 0.8, 0.8), 1: (0.5, 1.1, 0.9, 0.8, 0.8)})
    assert slow["verdict"] == "not met" and slow["steps_ratio"] == pytest.approx(0.85)
    # a seed that never reaches the target fails the goal, whatever the others do
    never = check({0: (0.5, 0.5, 0.5, 0.8, 0.8), 1: (0.5, None, None, 0.8, 0.8)})
    assert never["verdict"] == "not met" and never["not_reached"] == 1 and never["steps_ratio"] is None
    # dev more than 1 point below fails it
    worse = check({0: (0.5, 0.5, 0.5, 0.78, 0.80)})
    assert worse["verdict"] == "not met" and worse["quality"]["accuracy"]["ok"] is False
    # seeds on which the reference's loss did not come down are left out; none left: not measurable
    flat = check({0: (None, 0.5, 0.5, 0.8, 0.8), 1: (0.5, 1.0, 1.0, 0.8, 0.8)})
    assert flat["measurable_seeds"] == 1 and flat["steps_ratio"] == 1.0
    none = check({0: (None, 0.5, 0.5, 0.8, 0.8)})
    assert none["verdict"] == "not measurable"
    # instruction tuning: a goal on the quality alone; the speed is measured all the same, for information
    quality_only = goal_check(_conv({0: (None, 0.5, 0.5, 0.8, 0.8)}), "hyper", {"accuracy": CLASSIFICATION_BOUND},
                              speed=False)
    assert quality_only["verdict"] == "met" and quality_only["speed_in_goal"] is False
    slow_but_good = goal_check(_conv({0: (0.5, 1.2, 1.1, 0.8, 0.8)}), "hyper", {"accuracy": CLASSIFICATION_BOUND},
                               speed=False)
    assert slow_but_good["verdict"] == "met" and slow_but_good["steps_ratio"] == pytest.approx(1.2)
    assert goal_check(_conv({0: (0.5, 0.5, 0.5, 0.78, 0.8)}), "hyper", {"accuracy": CLASSIFICATION_BOUND},
                      speed=False)["verdict"] == "not met"
    assert goal_check(_conv({0: (0.5, 0.5, 0.5, None, 0.8)}), "hyper", {"accuracy": CLASSIFICATION_BOUND},
                      speed=False)["verdict"] == "not measurable"        # no quality to judge
    assert "(not part of this goal)" in goal_table({"q": slow_but_good})
    assert "(goal <= 0.8)" in goal_table({"a": met}) and "(not part of this goal)" not in goal_table({"a": met})
    table = goal_table({"a": met, "b": never, "c": none})
    assert "**met**" in table and "never reached on 1 seed(s)" in table and "did not come down" in table
    assert "accuracy -2.00 (>= -1: no)" in goal_table({"w": worse})


def test_nlu_convergence_reuse(tmp_path, tiny_bert_dir, glue_dir, capsys):
    opts = tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, tasks=["wnli"], steps=4)
    first = json.load(open(run_experiment("nlu-convergence", opts)["results_json"]))
    opts.reuse = True
    second = json.load(open(run_experiment("nlu-convergence", opts)["results_json"]))
    assert "reusing" in capsys.readouterr().out
    assert first["tasks"]["wnli"]["curves"] == second["tasks"]["wnli"]["curves"]


def test_reuse_refuses_a_run_made_with_other_library_defaults(tmp_path, tiny_bert_dir, glue_dir, capsys,
                                                              monkeypatch):
    """A finished run is reused only if every hypernetwork option it used (defaults included) is the same."""
    from hyperadalora import config as config_mod
    opts = tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, tasks=["wnli"], steps=4)
    run_experiment("nlu-convergence", opts)
    summary = json.load(open(next((tmp_path).rglob("hyperadalora/summary.json"))))
    assert summary["hypernetwork_options"]["hypernet"] == ha.HyperAdaLoraConfig.hypernet
    field = next(f for f in dataclasses.fields(config_mod.HyperAdaLoraConfig) if f.name == "hypernet")
    monkeypatch.setattr(field, "default", "mlp")   # as if a later version changed the default
    capsys.readouterr()
    opts.reuse = True
    run_experiment("nlu-convergence", opts)
    out = capsys.readouterr().out
    assert "reusing" in out and out.count("reusing") == 1   # adalora is reused, hyperadalora is trained again


def test_reuse_accepts_a_run_recorded_before_an_option_was_added_only_if_the_run_now_sets_it_to_none(
        tmp_path, tiny_bert_dir, glue_dir, capsys):
    """An option absent from an older run's record matches only a current value of None ("as before") or the value
    every earlier run used (train.OPTIONS_ADDED_LATER): identity (default None) and hypernet_warmup_steps at 0 are
    reused; feature_dim (default 4 since the feature-dim study; the runs before it had no such
    option and 8-wide row embeddings) or any other difference makes the run train again."""
    opts = tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, tasks=["wnli"], steps=4)
    run_experiment("nlu-convergence", opts)
    path = next(tmp_path.rglob("hyperadalora/summary.json"))
    summary = json.load(open(path))
    assert summary["hypernetwork_options"].pop("identity") is None
    summary["args"]["hyper"] = {"identity": None}              # options given differently, resolved the same
    json.dump(summary, open(path, "w"))
    capsys.readouterr()
    opts.reuse = True
    run_experiment("nlu-convergence", opts)
    assert capsys.readouterr().out.count("reusing") == 2        # both runs reused
    summary = json.load(open(path))
    assert summary["hypernetwork_options"].pop("hypernet_warmup_steps") == 0   # added later, at 0 ("as before")
    json.dump(summary, open(path, "w"))
    run_experiment("nlu-convergence", opts)
    assert capsys.readouterr().out.count("reusing") == 2        # train.OPTIONS_ADDED_LATER: still reused
    summary = json.load(open(path))
    assert summary["hypernetwork_options"].pop("feature_dim") == ha.HyperAdaLoraConfig.feature_dim == 4
    json.dump(summary, open(path, "w"))
    run_experiment("nlu-convergence", opts)
    assert capsys.readouterr().out.count("reusing") == 1        # the default is not None: trained again
    summary = json.load(open(path))
    summary["hypernetwork_options"]["hypernet_dim"] += 1         # a recorded option that differs: trained again
    json.dump(summary, open(path, "w"))
    run_experiment("nlu-convergence", opts)
    assert capsys.readouterr().out.count("reusing") == 1


def test_nlu_convergence_without_data_is_a_clear_error(tmp_path, tiny_bert_dir):
    empty = tmp_path / "glue"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No GLUE task"):
        run_experiment("nlu-convergence", tiny(tmp_path, model=tiny_bert_dir, data_dir=str(empty)))


def test_a_refused_experiment_leaves_no_directory_and_a_file_is_no_output_dir(tmp_path, tiny_bert_dir, glue_dir):
    with pytest.raises(ValueError, match="unknown task 'foo'"):
        run_experiment("nlu-convergence", tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, tasks=["rte", "foo"]))
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        run_experiment("gamma", tiny(tmp_path, output_dir=str(tmp_path / "afile")))


def test_ablation_hypernet_tiny(tmp_path, tiny_bert_dir, glue_dir):
    res = run_experiment("ablation-hypernet", tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, steps=5))
    report, data = check_outputs(res)
    counts = data["parameter_counts"]
    for h in ("attention", "cnn", "mlp"):
        assert counts[h]["hypernetworks"] == counts[h]["P"] + counts[h]["lambda"] + counts[h]["Q"] > 0
        assert counts[h]["heads"] == counts["adalora"]["heads"] > 0
    assert counts["adalora"]["hypernetworks"] is None and counts["adalora"]["adapter"] > 0
    assert counts["attention"]["hypernetworks"] != counts["mlp"]["hypernetworks"]
    assert data["convergence_vs_attention"]["methods"]["attention"]["steps_ratio"]["mean"] == 1.0
    assert data["convergence_vs_adalora"]["methods"]["adalora"]["steps_ratio"]["mean"] == 1.0
    assert "Parameter counts" in report


def test_gamma_tiny(tmp_path, tiny_bert_dir, glue_dir):
    res = run_experiment("gamma", tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, steps=5))
    report, data = check_outputs(res)
    methods = data["convergence"]["methods"]
    assert set(methods) == {"gamma=0.1", "gamma=0.15", "gamma=0.2"}
    assert all(m["steps_to_target"]["n"] == 1 for m in methods.values())   # the common target is reached by all
    for label in methods:
        args = json.load(open(f"{tmp_path}/out/seed0/{label}/summary.json"))["args"]
        assert args["orth_reg_weight"] == float(label.split("=")[1]) and args["method"] == "hyperadalora"
    assert data["final_orth_penalty"]["gamma=0.1"]["mean"] is not None


def test_formulation_tiny(tmp_path, tiny_bert_dir, glue_dir):
    opts = tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, steps=8)  # 3 steps after the 5-step window
    opts.variants = ["paper", "offset+feature", "adalora-lr3x", "default-no-pruning"]
    res = run_experiment("formulation", opts)
    report, data = check_outputs(res, n_png=2)
    assert data["gap_plot"] == "loss_gap.png" and "](loss_gap.png)" in report
    methods = data["convergence"]["methods"]
    # the reference runs first
    assert list(methods) == ["adalora", "paper", "offset+feature", "adalora-lr3x", "default-no-pruning"]
    summary = json.load(open(f"{tmp_path}/out/seed0/default-no-pruning/summary.json"))
    assert (summary["args"]["tinit"], summary["args"]["tfinal"]) == (7, 0)   # NO_PRUNING: the run's steps - 1
    rows, _ = read_metrics(summary["metrics"])
    assert len({r["total_rank"] for r in rows[:-1]}) == 1                    # no rank pruned before the last step
    lrs = {label: json.load(open(f"{tmp_path}/out/seed0/{label}/summary.json"))["args"]["lr"]
           for label in ("adalora", "adalora-lr3x")}
    assert lrs["adalora-lr3x"] == pytest.approx(3 * lrs["adalora"])         # lr_scale is relative to --lr
    assert methods["adalora"]["steps_ratio"]["mean"] == 1.0
    for label in ("paper", "offset+feature"):
        args = json.load(open(f"{tmp_path}/out/seed0/{label}/summary.json"))["args"]
        expected = {k: v for k, v in VARIANTS[label][0]["hyper"].items()}
        assert {k: args["hyper"][k] for k in expected} == expected and args["method"] == "hyperadalora"
        assert data["health"][label]["max_orth_penalty"] is not None
    assert "what it changes" in report and "loss gap, same batches" in report and "## Goal check" in report
    assert set(data["goal_check"]) == {"paper", "offset+feature", "adalora-lr3x", "default-no-pruning"}
    assert methods["adalora"]["loss_gap"]["mean"] == 0.0 and methods["adalora"]["steps_below"]["mean"] == 0.0
    assert methods["paper"]["loss_gap"]["n"] == 1 and 0.0 <= methods["paper"]["steps_below"]["mean"] <= 1.0
    opts.variants = ["nope"]
    with pytest.raises(ValueError, match="unknown variant"):
        run_experiment("formulation", opts)


def test_a_variant_option_is_read_as_its_train_flag_reads_it():
    """--variant NAME:KEY=VALUE reads VALUE as `hyperadalora train --KEY VALUE` does (by the option's type in
    HyperAdaLoraConfig), without the experiments importing the command line."""
    texts = ["1", "0", "-3", "2.5", "none", "NULL", "true", "off", "maybe", "mlp"]
    keys = [k for k in HYPER_FIELDS if k in cli.TRAIN_FLAGS]
    assert {"feature_dim", "feature_lr_ratio_final", "identity", "lambda_codes", "hypernet_dim", "momentum"} <= set(keys)
    for key in keys:
        for text in ((t + "!")[:-1] for t in texts):  # not the interned literal: cli.NONE is compared by identity
            try:
                expected = cli.TRAIN_FLAGS[key][0](text)
                expected = None if expected is cli.NONE else expected
            except (ValueError, argparse.ArgumentTypeError):
                expected = ValueError
            try:
                got = parse_option(key, text)
            except ValueError:
                got = ValueError
            assert got == expected and type(got) is type(expected), (key, text, got, expected)
    assert parse_option("hypernet_checkpointing", "off") is False          # an option without a train flag
    code = ("import sys, hyperadalora.experiments; "
            "sys.exit('hyperadalora.cli' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
                          ).returncode == 0, "the experiments import hyperadalora.cli"


def test_formulation_runs_a_variant_of_ones_own_from_the_command_line(tmp_path, tiny_bert_dir, glue_dir, capsys):
    """--variant NAME:KEY=VALUE,... : the library default with those options, run beside adalora and default."""
    out = tmp_path / "out"
    code = cli.main(["experiment", "formulation", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--steps", "6",
                     "--seeds", "1", "--max-length", "16", "--batch-size", "4", "--max-eval-examples", "4",
                     "--output-dir", str(out), "--threads", "1",
                     "--variant", "mine:feature_lr_ratio=10,hypernet=mlp,lambda-codes=false,lr_scale=2"])
    assert code == 0, capsys.readouterr().err
    data = json.load(open(out / "results.json"))
    assert list(data["convergence"]["methods"]) == ["adalora", "default", "mine"]
    args = {label: json.load(open(out / "seed0" / label / "summary.json"))["args"] for label in ("default", "mine")}
    assert args["mine"]["hyper"] == {**args["default"]["hyper"], "feature_lr_ratio": 10.0, "hypernet": "mlp",
                                     "lambda_codes": False}
    assert args["mine"]["lr"] == pytest.approx(2 * args["default"]["lr"])
    assert "your variant: the library default with feature_lr_ratio=10.0, hypernet=mlp" in data["variants"]["mine"]["what"]
    # bad input fails before anything runs, with what to change
    for spec, message in [("default:hypernet=mlp", "built-in variant; choose another name"),
                          ("x:hypernet_dim", "is not KEY=VALUE"), ("x:nope=1", "unknown option 'nope'"),
                          ("x:hypernet=transformer", "--variant x: hypernet='transformer' is not supported"),
                          ("x:lambda_codes=maybe", "takes true or false")]:
        code = cli.main(["experiment", "formulation", "--model", tiny_bert_dir, "--data-dir", glue_dir,
                         "--output-dir", str(tmp_path / "bad"), "--variant", spec])
        assert code == 2 and message in capsys.readouterr().err, spec
    code = cli.main(["experiment", "formulation", "--output-dir", str(tmp_path / "bad"), "--variant", "a:hypernet=mlp",
                     "--variant", "a:hypernet=cnn"])
    assert code == 2 and "--variant a is given twice" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    code = cli.main(["experiment", "gamma", "--output-dir", str(tmp_path / "bad"), "--variant", "mine:hypernet=mlp"])
    assert code == 2 and "choose formulations of the 'formulation' experiment" in capsys.readouterr().err


def test_rank_allocation_tiny(tmp_path, tiny_bert_dir, glue_dir):
    res = run_experiment("rank-allocation", tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, steps=8))
    report, data = check_outputs(res, n_png=4)
    assert data["steps"] == list(range(9))                  # step 0 (initial) and every optimizer step
    for m in ("adalora", "hyperadalora"):
        mat = np.asarray(data["rank_matrix"][m])
        assert mat.shape == (12, 9)
        assert (mat[:, 0] == 3).all()
        assert data["total_rank"][m][-1] == 2 * 12         # target_r * n_layers at the end
    assert "By depth" in report and "By module type" in report


def test_extension_tiny(tmp_path, tiny_bert_dir, glue_dir):
    res = run_experiment("extension", tiny(tmp_path, model=tiny_bert_dir, data_dir=glue_dir, steps=5,
                                           tasks=["rte", "sst2", "mnli"]))
    report, data = check_outputs(res, n_png=7)     # 3 pairs x 2 tasks loss curves + the dev accuracy bars
    assert set(data["tasks"]) == {"rte", "sst2"} and "mnli" in data["skipped"]
    for task in ("rte", "sst2"):
        pairs = data["tasks"][task]["pairs"]
        assert set(pairs) == {"lora/hyperlora", "dora/hyperdora", "hydralora/hyperhydralora"}
        for name, pair in pairs.items():
            base, hyper = name.split("/")
            conv = pair["convergence"]
            assert conv["reference"] == base and conv["methods"][base]["steps_ratio"]["mean"] == 1.0
            assert conv["methods"][hyper]["dev_accuracy"]["n"] == 1
            # same data order: step 1 is the identity for both, so their first losses match
            c = pair["curves"]
            assert c[base]["task_loss"][0][0] == pytest.approx(c[hyper]["task_loss"][0][0], abs=1e-4)
    counts = data["parameters"]
    assert counts["lora"]["hypernetworks"] == 0 and counts["hyperlora"]["hypernetworks"] > 0
    assert counts["hydralora"]["other"] > counts["lora"]["other"]             # N heads and a router
    assert "steps ratio (variant/base)" in report and "hyperhydralora" in report
    assert "loss gap to the base, same batches" in report
    # 5 steps on the toy data: the base's loss does not come down beyond its noise, so no ratio is given as a speed
    assert "not measurable (the base's loss did not come down)" in report


def test_efficiency_tiny(tmp_path, tiny_bert_dir):
    res = run_experiment("efficiency", ExperimentOptions(model=tiny_bert_dir, batch_sizes=[1], max_length=8, steps=2,
                                                         output_dir=str(tmp_path / "eff"), device="cpu"))
    report, data = check_outputs(res, n_png=2)
    r = data["results"]["1"]
    assert set(r) == {"hyperadalora", "adalora", "lora"}
    for m in r.values():
        assert m["median_ms"] > 0 and m["peak_mib"] > m["base_weights_mib"] > 0 and len(m["times_ms"]) == 2
    assert data["kind"] == "classification"


def test_dev_speed_reads_the_steps_to_the_references_final_dev_loss():
    def run(losses, every=10):  # dev loss at steps every, 2 * every, ...; train time 0.5 s per step
        evals = [{"type": "eval", "step": every * (i + 1), "eval_loss": v} for i, v in enumerate(losses)]
        rows = [{"step": k, "train_time": 0.5 * k} for k in range(1, every * len(losses) + 1)]
        return {"rows": rows, "evals": evals, "summary": {"final_eval": {"eval_loss": losses[-1]}}}

    runs = {0: {"ref": run([2.0, 1.8, 1.7, 1.6]), "new": run([1.9, 1.6, 1.5, 1.4])},    # 20 vs 40 steps
            1: {"ref": run([2.0, 1.5, 1.6, 1.55]), "new": run([2.0, 1.9, 1.8, 1.7])}}  # ref at 20; new never
    speed = dev_speed(runs, "ref", "new")
    assert speed["per_seed"][0] == {"target": 1.6, "reference_steps": 40, "steps": 20, "steps_ratio": 0.5,
                                    "time_ratio": pytest.approx(9.5 / 19.5)}  # times from the end of step 1
    assert speed["per_seed"][1]["reference_steps"] == 20 and speed["per_seed"][1]["steps"] is None
    assert speed["steps_ratio"]["mean"] == 0.5 and speed["steps_ratio"]["n"] == 1 and speed["not_reached"] == 1
    with pytest.raises(ValueError, match="no final 'eval_loss'"):
        dev_speed({0: {"ref": {**run([1.0]), "summary": {}}, "new": run([1.0])}}, "ref", "new")


def test_nlg_tiny(tmp_path, tokenizer, monkeypatch):
    model_dir = tmp_path / "llama"
    make_llama(vocab=tokenizer.vocab_size).save_pretrained(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path, model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(model_dir)  # a causal LM's tokenizer: no token_type_ids
    records = [{"instruction": f"Say {w} {k} times.", "input": "", "output": " ".join([w] * k)}
               for w in POS + NEG for k in range(1, 8)]   # 70 distinct records, about 7 held out
    data_file = tmp_path / "tiny_alpaca.json"
    data_file.write_text(json.dumps(records))
    monkeypatch.setattr(nlg, "DEFAULT_ALPACA_FILE", "no/such/file.json")   # hermetic: only the tiny file
    res = run_experiment("nlg", tiny(tmp_path, model=str(model_dir), data_path=[str(data_file)], steps=5,
                                     batch_size=4, max_length=32, max_eval_examples=2))
    report, data = check_outputs(res, n_png=3)
    ds = data["datasets"]["tiny_alpaca"]
    assert ds["gap_plot"] == "gap_tiny_alpaca.png" and "(gap_tiny_alpaca.png)" in report
    assert ds["dev_plot"] == "dev_tiny_alpaca.png" and "(dev_tiny_alpaca.png)" in report
    assert ds["args"]["eval_every"] == 1 and sorted(map(int, ds["dev_loss_at_checkpoints"]["adalora"])) == [1, 2, 3, 4, 5]
    speed = ds["dev_speed"]["per_seed"]["0"]
    final = ds["runs"]["0"]["adalora"]["final_eval"]["eval_loss"]
    assert speed["target"] == final and 1 <= speed["reference_steps"] <= 5   # AdaLoRA reaches its own final loss
    assert "## Speed on the dev loss" in report
    # --eval-every 0: only the final evaluation, so no speed is read from the dev loss
    res = run_experiment("nlg", tiny(tmp_path, model=str(model_dir), data_path=[str(data_file)], steps=5,
                                     batch_size=4, max_length=32, max_eval_examples=2, eval_every=0))
    report, data = check_outputs(res, n_png=3)
    assert data["datasets"]["tiny_alpaca"]["dev_speed"] is None
    assert "n/a: --eval-every 0 evaluates only at the end" in report
    for m in ("adalora", "hyperadalora"):
        ev = ds["runs"]["0"][m]["final_eval"]
        assert "bleu4" in ev and "rouge1" in ev and ev["n_generated"] == 2
    assert ds["train_time_ratio"]["mean"] > 0
    assert "BLEU-4" in report and "## Goal check" in report and "is set for the classification tasks" in report
    assert ds["goal_check"]["speed_in_goal"] is False and ds["goal_check"]["verdict"] in ("met", "not met")
    assert set(ds["goal_check"]["quality"]) == {"bleu4", "rouge1"}
    assert ds["goal_check"]["quality"]["bleu4"]["bound"] == 0.5


def test_cli_subcommand(tmp_path, tiny_bert_dir, glue_dir, capsys):
    parser = argparse.ArgumentParser(prog="hyperadalora")
    add_experiment_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["experiment", "nlu-convergence", "--model", tiny_bert_dir, "--data-dir", glue_dir,
                            "--tasks", "sst2", "--steps", "4", "--batch-size", "8", "--max-length", "16",
                            "--max-eval-examples", "8", "--output-dir", str(tmp_path / "cli")])
    assert ns.func(ns) == 0
    out = capsys.readouterr().out
    assert "report.md" in out and "steps ratio" in out
    report = (tmp_path / "cli" / "report.md").read_text()
    assert "--steps 4" in report


def test_single_task_experiments_accept_the_embedded_sentiment_task(tmp_path):
    """The embedded sentiment task needs no GLUE folder; a GLUE task without its files is a clear error."""
    assert glue_task_available("sentiment", None) == (True, "")
    ok, why = glue_task_available("rte", str(tmp_path))
    assert not ok and "RTE" in why
