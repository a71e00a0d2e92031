"""The lr-sweep experiment (issue 23): its statistics on synthetic cells, and tiny end-to-end runs."""

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperadalora.experiments import ExperimentOptions, add_experiment_parser, run_experiment
from hyperadalora.experiments.lr_sweep import analysis, design
from hyperadalora.experiments.lr_sweep import cells as lr_cells
from hyperadalora.experiments.options import as_options
from hyperadalora.experiments.stats import stats, t_interval
from hyperadalora.experiments.task_setup import default_glue_dir, glue_task_available

from test_experiments import POS, NEG, glue_dir, tiny_bert_dir, tokenizer  # noqa: F401 (fixtures)

SPEC = design.SweepTask("toy", "sst2", steps=100, batch_size=4, max_length=8, eval_every=25, seeds=3,
                          score="accuracy", tolerance=0.01)
LOSS_SPEC = design.SweepTask("toyloss", "alpaca", steps=100, batch_size=4, max_length=8, eval_every=25, seeds=3,
                               score="dev_loss", tolerance=0.02)
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def peak(lr, centre, height=0.9, width=0.8):
    """An accuracy curve over log10 lr: a parabola around ``centre``."""
    return height - 0.1 * ((math.log10(lr) - math.log10(centre)) / width) ** 2


def cell(method, lr, seed, final, speed=1.0, noise=0.0):
    """A synthetic cell: accuracy rising linearly to ``final`` at step 100 (``speed`` > 1 reaches it earlier)."""
    evals = []
    for step in (25, 50, 75, 100):
        v = 0.5 + (final - 0.5) * min(1.0, speed * step / 100) + noise
        evals.append({"step": step, "score": v, "score_a": v, "score_b": v})
    return {"method": method, "lr": lr, "seed": seed, "evals": evals}


def grid(centres, heights=None, speeds=None, seeds=(0, 1, 2)):
    heights, speeds = heights or {}, speeds or {}
    return [cell(m, lr, s, peak(lr, c, heights.get(m, 0.9)), speeds.get(m, 1.0), noise=0.002 * (s - 1))
            for m, c in centres.items() for lr in LRS for s in seeds]


def test_t_interval_and_sample_std():
    vals = [1.0, 2.0, 3.0]
    lo, hi = t_interval(vals)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sample std 1 / sqrt(3)
    assert lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    s = stats(vals)
    assert s["std"] == pytest.approx(1.0) and s["ci95"] == [pytest.approx(lo), pytest.approx(hi)]
    assert stats([5.0])["ci95"] is None and t_interval([5.0]) == (None, None)


def test_dev_halves_are_a_fixed_partition():
    a, b = lr_cells.dev_halves(11)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(11)) and len(a) == 5
    a2, _ = lr_cells.dev_halves(11)
    assert a.tolist() == a2.tolist()
    scores = lr_cells.eval_scores(SPEC, {"correct": "1111100000"})
    assert scores["score"] == 0.5 and scores["n"] == 10
    a, b = lr_cells.dev_halves(10)
    assert scores["score_a"] == pytest.approx(np.mean([1 if i < 5 else 0 for i in a]))
    lossy = lr_cells.eval_scores(LOSS_SPEC, {"example_losses": [1.0, 2.0, float("nan"), 3.0]})
    assert lossy["score"] == pytest.approx(2.0)  # an example without labelled tokens is left out


def test_good_window_interpolates_and_flags_the_grid_end():
    curve = {1e-3: 0.80, 1e-2: 0.90, 1e-1: 0.80}
    w = analysis.good_window(SPEC, curve)
    assert w["decades"] == pytest.approx(0.2) and not w["censored"]  # 0.1 of a decade on each side
    w = analysis.good_window(SPEC, {1e-3: 0.895, 1e-2: 0.90, 1e-1: 0.80})
    assert w["censored"] and w["decades"] == pytest.approx(1.1)
    # a loss: lower is better
    w = analysis.good_window(LOSS_SPEC, {1e-3: 1.10, 1e-2: 1.00, 1e-1: 1.10})
    assert w["decades"] == pytest.approx(0.4) and not w["censored"]


def test_steps_to_interpolates_and_counts_a_miss():
    c = {"evals": [{"step": 25, "score_b": 0.6}, {"step": 50, "score_b": 0.8}, {"step": 75, "score_b": 0.85}]}
    assert analysis.steps_to(SPEC, c, 0.7) == pytest.approx(37.5)
    assert analysis.steps_to(SPEC, c, 0.5) == 25.0
    assert analysis.steps_to(SPEC, c, 0.9) is None
    assert analysis.auc(SPEC, c) == pytest.approx(((0.6 + 0.8) / 2 * 25 + (0.8 + 0.85) / 2 * 25) / 50)


def test_fit_shift_recovers_a_known_lr_multiplier():
    ada = {lr: peak(lr, 1e-2) for lr in LRS}
    hyper = {lr: peak(lr, 1e-2 / 3) for lr in LRS}  # Hyper at lr behaves like AdaLoRA at 3 lr
    d = analysis.fit_shift(SPEC, hyper, ada)
    assert 10 ** d == pytest.approx(3.0, rel=0.02)


def test_verdict_no_advantage_when_hyper_is_adalora_at_another_lr():
    cells = grid({"adalora": 3e-3, "hyperadalora": 1e-3, "lora": 1e-3})
    a = analysis.analyse(SPEC, cells, LRS, [0, 1, 2])
    assert a["verdict"] == "no advantage when tuned", a["why"]
    assert not any(a["rule"].values())
    assert a["shift"]["s"] == pytest.approx(3.0, rel=0.05)
    assert a["best_vs_best"]["100"]["chosen_lr"]["adalora"] == 3e-3
    assert abs(a["best_vs_best"]["100"]["diff_hyper_minus_ada"]["mean"]) < 1e-9
    assert a["window_ratio"] == pytest.approx(1.0)
    assert a["speed"]["all_reached"] and a["speed"]["ratio"]["mean"] == pytest.approx(1.0)


def test_verdict_advantage_by_a_higher_peak_or_by_speed():
    cells = grid({"adalora": 3e-3, "hyperadalora": 1e-3, "lora": 1e-3}, heights={"hyperadalora": 0.95})
    a = analysis.analyse(SPEC, cells, LRS, [0, 1, 2])
    assert a["verdict"] == "advantage" and a["rule"]["a"]
    cells = grid({"adalora": 3e-3, "hyperadalora": 1e-3, "lora": 1e-3}, speeds={"hyperadalora": 2.0})
    a = analysis.analyse(SPEC, cells, LRS, [0, 1, 2])
    assert a["rule"]["c"] and not a["rule"]["a"] and a["verdict"] == "advantage"
    assert a["speed"]["ratio"]["mean"] == pytest.approx(0.5, rel=0.01)
    assert a["speed"]["auc_diff"]["mean"] > 0


def test_verdict_not_decided_with_missing_cells_or_an_unbracketed_optimum():
    cells = grid({"adalora": 3e-3, "hyperadalora": 1e-3, "lora": 1e-3})
    a = analysis.analyse(SPEC, cells[1:], LRS, [0, 1, 2])
    assert a["verdict"] == "not decided" and "1 cell(s) still to run" in a["why"] and len(a["missing"]) == 1
    cells = grid({"adalora": 1, "hyperadalora": 1e-3, "lora": 1e-3})  # AdaLoRA's best: the largest lr
    a = analysis.analyse(SPEC, cells, LRS, [0, 1, 2])
    assert a["verdict"] == "not decided" and "largest tried: extend the grid" in a["why"]


def test_claim_is_exclusive_and_takes_over_a_stale_lock(tmp_path):
    path = str(tmp_path / "cell.json")
    assert lr_cells.claim(path)
    assert not lr_cells.claim(path)  # held by this (live) process
    os.remove(path + ".lock")
    with open(path + ".lock", "w") as f:
        f.write("999999999")  # no such process
    assert lr_cells.claim(path)


def test_cell_order_runs_whole_seeds_from_the_middle_of_the_grid():
    order = lr_cells.cell_order([1e-4, 1e-3, 1e-2, 1e-1], [0, 1])
    assert [s for s, _ in order] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert set(lr for _, lr in order[:2]) == {1e-3, 1e-2}


def test_lrs_option_is_checked():
    with pytest.raises(ValueError, match="distinct positive"):
        run_experiment("lr-sweep", ExperimentOptions(lrs="1e-3,-1"))
    with pytest.raises(ValueError, match="--lrs sets the grid"):
        run_experiment("gamma", ExperimentOptions(lrs=[1e-3, 3e-3, 1e-2]))
    with pytest.raises(ValueError, match="at least 3"):
        run_experiment("lr-sweep", ExperimentOptions(lrs=[1e-3, 3e-3], tasks=["sst2"]))


def test_lr_sweep_tiny_end_to_end_and_reuse(tmp_path, tiny_bert_dir, glue_dir, capsys):
    opts = ExperimentOptions(tasks=["sst2"], model=tiny_bert_dir, data_dir=glue_dir, steps=4, batch_size=8,
                             max_length=16, seeds=2, lrs=[1e-3, 1e-2, 1e-1], output_dir=str(tmp_path / "out"),
                             reuse=True)
    res = run_experiment("lr-sweep", opts)
    data = json.load(open(res["results_json"]))
    report = open(res["report"]).read()
    assert data["command"].startswith("hyperadalora experiment lr-sweep")
    assert len(data["runs"]) == 3 * 3 * 2 and {r["method"] for r in data["runs"]} == {"adalora", "hyperadalora", "lora"}
    run = data["runs"][0]
    assert [e["step"] for e in run["evals"]] == [1, 2, 3, 4]  # eval every steps // 4, the final one included
    assert all(0 <= e["score_a"] <= 1 and 0 <= e["score_b"] <= 1 for e in run["evals"])
    assert "Decision rule (fixed before the runs" in report and "## Verdict" in report
    a = data["tasks"]["sst2"]["analysis"]
    assert a["verdict"] in ("advantage", "no advantage when tuned", "not decided") and not a["missing"]
    assert os.path.isfile(tmp_path / "out" / "score_vs_lr_sst2.png")
    cells = sorted(os.listdir(tmp_path / "out" / "cells" / "sst2"))
    assert len(cells) == 18 and not any(c.endswith(".lock") for c in cells)
    capsys.readouterr()
    res2 = run_experiment("lr-sweep", opts)  # every cell reused: no training
    assert "steps ->" not in capsys.readouterr().out
    assert json.load(open(res2["results_json"]))["tasks"]["sst2"]["analysis"]["verdict"] == a["verdict"]


def test_lr_sweep_instruction_task_scores_the_dev_loss(tmp_path, tokenizer):  # noqa: F811
    from conftest import make_llama
    from transformers import AutoTokenizer

    model_dir = tmp_path / "llama"
    make_llama(vocab=tokenizer.vocab_size).save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path, model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(model_dir)
    records = [{"instruction": f"Say {w} {k} times.", "input": "", "output": " ".join([w] * k)}
               for w in POS + NEG for k in range(1, 8)]
    data_file = tmp_path / "tiny_alpaca.json"
    data_file.write_text(json.dumps(records))
    opts = ExperimentOptions(tasks=["alpaca"], model=str(model_dir), data_path=[str(data_file)], steps=4,
                             batch_size=4, max_length=32, seeds=[0], lrs=[1e-3, 1e-2, 1e-1],
                             output_dir=str(tmp_path / "out"))
    res = run_experiment("lr-sweep", opts)
    data = json.load(open(res["results_json"]))
    run = data["runs"][0]
    held_out = run["evals"][-1]["n"]
    assert held_out >= 2 and all(e["score"] > 0 for e in run["evals"])  # a mean per-example loss
    assert data["tasks"]["alpaca"]["settings"]["score"] == "dev_loss"


COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "lr-sweep"


@pytest.mark.skipif(not (COMMITTED / "cells").is_dir(), reason="no committed lr-sweep cells")
def test_the_committed_lr_sweep_report_is_rebuilt_from_its_cells(tmp_path, monkeypatch):
    """report.md of docs/results/lr-sweep, rebuilt by the report's own command (--report-only) from the committed
    cells, is the committed one, but for the machine line and the seconds the report took."""
    if not glue_task_available("sst2", default_glue_dir(ExperimentOptions()))[0]:
        pytest.skip("no SST-2 data (the sweep checks that its task's files exist)")
    committed = (COMMITTED / "report.md").read_text()
    result = rebuild_committed_report("lr-sweep", COMMITTED, committed, tmp_path, monkeypatch)
    assert stable_lines(open(result["report"]).read()) == stable_lines(committed)


def stable_lines(text: str) -> list[str]:
    """A report's lines but for those that change from one rebuild to the next (the machine, the seconds taken)."""
    return [line for line in text.splitlines()
            if not line.startswith(("- machine: ", "This report was written in "))]


def rebuild_committed_report(name: str, committed_dir: Path, committed: str, tmp_path, monkeypatch) -> dict:
    """Run the command written at the top of a committed cell report (--report-only) on a copy of its cells."""
    argv = shlex.split(committed.split("```\n", 2)[1].strip())
    assert argv[:3] == ["hyperadalora", "experiment", name] and "--report-only" in argv, argv
    out = tmp_path / argv[argv.index("--output-dir") + 1]
    shutil.copytree(committed_dir / "cells", out / "cells", ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="hyperadalora")
    add_experiment_parser(parser.add_subparsers(dest="command"))
    threads = torch.get_num_threads()
    try:
        return run_experiment(name, as_options(vars(parser.parse_args(argv[1:]))))
    finally:
        torch.set_num_threads(threads)


def test_a_run_recorded_from_a_checkout_elsewhere_is_reused_for_the_same_shared_data(monkeypatch, tmp_path):
    """Runs record absolute data paths; a run made with ``../shared/data/...`` of a checkout at /work is the same
    run for a clone at /check/work (CI) reading its own ``../shared/data/...``; any other path is not."""
    from hyperadalora.experiments import runs

    shared = tmp_path / "check" / "work" / "shared"
    (shared / "data" / "glue").mkdir(parents=True)
    monkeypatch.setattr(runs, "SHARED_ROOT", shared.resolve())
    here = str(shared / "data" / "glue")
    assert runs.same_data_location("/work/shared/data/glue", here)
    assert runs.same_data_location(here, here) and runs.same_data_location(None, None)
    assert not runs.same_data_location("/work/shared/data/other", here)
    assert not runs.same_data_location("/work/elsewhere/data/glue", here)
    assert not runs.same_data_location(None, here) and not runs.same_data_location(here, None)
    elsewhere = tmp_path / "mine" / "glue"
    elsewhere.mkdir(parents=True)
    assert not runs.same_data_location("/work/mine/glue", str(elsewhere))  # outside the shared folder: equal only

    args = runs.TrainArgs(method="lora", task="sst2", data_dir=here, output_dir=str(tmp_path / "run"))
    record = {"args": json.loads(json.dumps(dataclasses.asdict(args), default=str)), "hypernetwork_options": {}}
    assert runs.same_args(record, args)
    record["args"]["data_dir"] = "/work/shared/data/glue"
    assert runs.same_args(record, args)
    record["args"]["data_dir"] = "/work/shared/data/glue2"
    assert not runs.same_args(record, args)


# ---------------------------------------------------------------- issue 32: robustness of rule (b), the "why" runs

def test_robustness_scans_tolerance_seeds_budgets_and_sides():
    """A HyperAdaLoRA curve wider than AdaLoRA's only on the large-lr side: the ratio falls with a tighter
    tolerance, every seed subset sees it, and the widening is reported on the large-lr end."""
    cells = []
    for s in (0, 1, 2):
        for lr in LRS:
            x = math.log10(lr)
            ada = 0.9 - 0.1 * (x + 2.5) ** 2                    # peak at 10**-2.5, symmetric
            hyp = 0.9 - 0.1 * (x + 2.5) ** 2 if x < -2.5 else 0.9 - 0.02 * (x + 2.5) ** 2   # flat on the right
            cells += [cell("adalora", lr, s, ada), cell("hyperadalora", lr, s, hyp), cell("lora", lr, s, ada)]
    a = analysis.analyse(SPEC, cells, LRS, [0, 1, 2])
    rb = a["robustness"]
    assert [r["tolerance"] for r in rb["by_tolerance"]] == pytest.approx([0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02])
    pre = [r for r in rb["by_tolerance"] if r["tolerance"] == pytest.approx(0.01)][0]
    assert pre["ratio"] == pytest.approx(a["window_ratio"]) and pre["holds"] == a["rule"]["b"]
    assert rb["holds_for_tolerance"] and all(lo <= hi for lo, hi in rb["holds_for_tolerance"])
    assert set(rb["leave_one_seed_out"]) == {"0", "1", "2"} and set(rb["single_seed"]) == {"0", "1", "2"}
    assert set(rb["by_budget"]) == {"25", "50", "75", "100"}
    assert rb["sides"]["high_end_decades"] > 0.3 and rb["sides"]["low_end_decades"] == pytest.approx(0, abs=1e-6)
    report = "\n".join(__import__("hyperadalora.experiments.lr_sweep.report", fromlist=["x"]).task_section(
        SPEC, a, LRS, [0, 1, 2], []))
    assert "How firmly rule (b) holds" in report and "without seed 1" in report and "large-lr end" in report


def test_pq_lr_ratio_puts_adalora_p_and_q_in_a_group_of_their_own(tiny_bert_dir):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from hyperadalora.training import TrainArgs, adapter_config, param_groups
    from peft import get_peft_model

    with pytest.raises(ValueError, match="applies to method 'adalora'"):
        TrainArgs(method="hyperadalora", pq_lr_ratio=30.0)
    with pytest.raises(ValueError, match="positive number"):
        TrainArgs(method="adalora", pq_lr_ratio=0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    args = TrainArgs(method="adalora", lr=1e-3, pq_lr_ratio=30.0, max_steps=20)
    wrapped = get_peft_model(model, adapter_config(args, ["query", "value"], "SEQ_CLS"))
    groups = param_groups(wrapped, args)
    names = {id(p): n for n, p in wrapped.named_parameters()}
    pq, rest = groups
    assert pq["lr"] == pytest.approx(3e-2) and rest["lr"] == pytest.approx(1e-3)
    assert pq["params"] and all(".lora_A." in names[id(p)] or ".lora_B." in names[id(p)] for p in pq["params"])
    assert any(".lora_E." in names[id(p)] for p in rest["params"]) and any("classifier" in names[id(p)]
                                                                            for p in rest["params"])
    one = param_groups(wrapped, dataclasses.replace(args, pq_lr_ratio=1.0))
    assert len(one) == 1 and one[0]["lr"] == 1e-3  # the default: one group, as every recorded run had


def test_a_cell_records_the_code_that_ran_it():
    version = lr_cells.code_version()
    assert version["library_version"] and (version["git_commit"] is None
                                           or len(version["git_commit"].split("+")[0]) == 40)


def why_grid(widths):
    """Synthetic cells of the "why" grid: each name's accuracy a plateau of ``widths[name]`` decades around 1e-3."""
    from hyperadalora.experiments.lr_sweep import why

    out = []
    for name in why.ALL:
        for lr in why.WHY_LRS:
            for s in (0, 1, 2):
                x = abs(math.log10(lr) + 3)
                half = widths.get(name, 1.0) / 2
                drop = 0.001 * min(x, half) ** 2 + 0.1 * max(0.0, x - half)  # a peak at 1e-3, flat to +-half
                out.append({**cell(name, lr, s, 0.9 - drop + 0.001 * s),
                            "variant": name})
    return out


@pytest.mark.parametrize("flr1,pq30,verdict", [(2.0, 1.0, "the hypernetworks"), (1.0, 2.0, "the lr mixture"),
                                               (2.0, 2.0, "either suffices"), (1.0, 1.0, "the combination")])
def test_why_rule_attributes_the_widening(flr1, pq30, verdict):
    from hyperadalora.experiments.lr_sweep import why

    cells = why_grid({"hyperadalora": 2.0, "hyperadalora-flr1": flr1, "adalora-pq30": pq30,
                      "hyperadalora-norows": 1.0})
    a = why.analyse_why(SPEC, cells, list(why.WHY_LRS), [0, 1, 2])
    assert a["verdict"] == verdict, a["why"]
    assert "row codes are needed" in a["why"]
    v = a["variants"]["hyperadalora"]
    assert v["ratio"] >= 1.5 and v["seed_ratios"]["n"] == 3 and v["peak_diff_vs_adalora"]["mean"] == pytest.approx(0)
    assert set(v["too_large"]) == {"0.03", "0.1"}
    text = "\n".join(why.why_section(SPEC, a, list(why.WHY_LRS)))
    assert "Windows, peaks and shifts" in text and "too-large" in text


def test_why_rule_nothing_to_explain_and_not_decided():
    from hyperadalora.experiments.lr_sweep import why

    cells = why_grid({})
    a = why.analyse_why(SPEC, cells, list(why.WHY_LRS), [0, 1, 2])
    assert a["verdict"] == "nothing to explain"
    a = why.analyse_why(SPEC, cells[1:], list(why.WHY_LRS), [0, 1, 2])
    assert a["verdict"] == "not decided" and "1 cell(s) still to run" in a["why"]


def test_why_tiny_end_to_end_reuses_sweep_cells(tmp_path, tiny_bert_dir, glue_dir, monkeypatch, capsys):  # noqa: F811
    """The "why" experiment runs its variants and reads the sweep's methods from the sweep's cells: a sweep run
    first, its cells are reused (no training for them), and each new cell records its variant and the code."""
    from hyperadalora.experiments.lr_sweep import why

    common = dict(model=tiny_bert_dir, data_dir=glue_dir, steps=4, batch_size=8, max_length=16, seeds=[0],
                  lrs=[1e-3, 1e-2, 1e-1], reuse=True, threads=1)
    run_experiment("lr-sweep", ExperimentOptions(tasks=["sst2"], output_dir=str(tmp_path / "sweep"), **common))
    monkeypatch.setattr(why, "SWEEP_CELLS", str(tmp_path / "sweep"))
    capsys.readouterr()
    res = run_experiment("lr-sweep-why", ExperimentOptions(output_dir=str(tmp_path / "why"), **common))
    printed = capsys.readouterr().out
    assert printed.count("steps ->") == 3 * 3  # the three variants at three lrs; the sweep's 9 cells reused
    data = json.load(open(res["results_json"]))
    assert len(data["runs"]) == 3 * 3 and data["reused_sweep_cells"] == 9 and not data["analysis"]["missing"]
    new = [r for r in data["runs"] if r["variant"] in why.VARIANTS]
    assert {r["method"] for r in new} == {"hyperadalora", "adalora"} and all(r["library_version"] for r in new)
    assert "Rule (fixed before the runs, issue 32)" in open(res["report"]).read()
    capsys.readouterr()
    run_experiment("lr-sweep-why", ExperimentOptions(output_dir=str(tmp_path / "why"), report_only=True, **common))
    assert "steps ->" not in capsys.readouterr().out


WHY_COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "lr-sweep-why"


@pytest.mark.skipif(not (WHY_COMMITTED / "cells").is_dir(), reason="no committed lr-sweep-why cells")
def test_the_committed_lr_sweep_why_report_is_rebuilt_from_its_cells(tmp_path, monkeypatch):
    """report.md of docs/results/lr-sweep-why, rebuilt by its own command (--report-only) from the committed cells
    (its own and the sweep's), is the committed one, but for the machine line and the report's seconds."""
    if not glue_task_available("sst2", default_glue_dir(ExperimentOptions()))[0]:
        pytest.skip("no SST-2 data (the experiment checks that its task's files exist)")
    committed = (WHY_COMMITTED / "report.md").read_text()
    result = rebuild_committed_report("lr-sweep-why", WHY_COMMITTED, committed, tmp_path, monkeypatch)
    assert stable_lines(open(result["report"]).read()) == stable_lines(committed)
    cells = json.load(open(result["results_json"]))["runs"]
    assert cells and all(c["git_commit"] and c["library_version"] for c in cells)  # issue 32: the code recorded
