"""The README number checker (benchmarks/check_readme_numbers.py): extraction, skip rules, report resolution and
matching, on small synthetic READMEs; and one run on the real README."""

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import check_readme_numbers as crn

SECTION = "## Results: what we measured (honestly)"


def make_root(tmp_path, body, reports, top=""):
    """A repository with a README whose results section is ``body`` and reports {name: (results, report.md)}."""
    readme = f"# x\n\n{top}\n\n## Quick start\n\ntext 0.123\n\n{SECTION}\n\n{body}\n\n## Where things are\n\n0.999\n"
    (tmp_path / "README.md").write_text(readme)
    for name, (results, md) in reports.items():
        folder = tmp_path / "docs" / "results" / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results))
        (folder / "report.md").write_text(md)
    return tmp_path


def statuses(root):
    return {row["number"]: row["status"] for row in crn.check(root / "README.md", root)}


def numbers(text):
    """The numbers of ``text`` as written; an interval as a tuple of its two ends."""
    return [w[0] if len(w) == 1 else w for w, _ in crn.extract_numbers(text)]


def test_a_number_matches_a_value_that_rounds_to_it(tmp_path):
    root = make_root(tmp_path, "- dev accuracy 0.835 ([`foo`](docs/results/foo/report.md))",
                     {"foo": ({"acc": {"mean": 0.83468}}, "")})
    assert statuses(root) == {"0.835": "results.json"}
    assert crn.main(["--root", str(root)]) == 0


def test_points_may_be_100x_the_stored_fraction_but_a_plain_number_may_not(tmp_path):
    body = ("- difference -0.08 accuracy points (`foo`)\n\n"
            "- ratio 0.5 (`foo`)")
    root = make_root(tmp_path, body, {"foo": ({"diff": -0.00081, "ratio": 0.005}, "")})
    assert statuses(root) == {"-0.08": "results.json", "0.5": "NOT FOUND"}
    assert crn.matches(("13%",), (0.131,), True)
    assert not crn.matches(("2.0",), (0.5,), False)  # 1/x never matches


def test_a_number_not_found_fails_and_one_only_in_report_md_is_listed_apart(tmp_path, capsys):
    root = make_root(tmp_path, "- loss 0.401 and gap 0.052 (`foo`)",
                     {"foo": ({"loss": 0.4012}, "the gap is 0.052")})
    out = tmp_path / "rows.json"
    assert crn.main(["--root", str(root), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["number"], r["status"]) for r in rows] == [("0.401", "results.json"), ("0.052", "report.md only")]
    assert crn.main(["--root", str(root), "--strict"]) == 1
    (root / "docs/results/foo/report.md").write_text("")
    assert crn.main(["--root", str(root)]) == 1
    assert "NOT FOUND" in capsys.readouterr().out


def test_a_match_only_inside_a_curve_is_weaker(tmp_path):
    curve = [0.5 + i / 1000 for i in range(100)]
    root = make_root(tmp_path, "- final loss 0.537 (`foo`)", {"foo": ({"curves": {"loss": curve}}, "")})
    assert statuses(root) == {"0.537": "results.json (curve)"}
    assert crn.main(["--root", str(root)]) == 0
    assert crn.main(["--root", str(root), "--strict"]) == 1


def test_settings_names_and_paper_references_are_skipped():
    text = ("MiniLM, SST-2, lr 3e-3, 3 seeds, batch 16, 300 sentences, SmolLM2-135M on a 2-core CPU "
            "(the paper: 7-8B, Table 3, Fig. 2), gamma 0.1 / 0.15, commit 601a98d, "
            "`--steps 200`, [x](docs/results/a1/report.md), 95% CI, steps to 90% of the drop: ratio 0.76x")
    assert numbers(text) == ["0.76x"]
    assert numbers("AdaLoRA at 9e-3; window 1.4e-3 to 3e-2") == ["1.4e-3"]  # a measured edge is checked


def test_intervals_ranges_and_signs():
    assert numbers("0.76x (sd 0.22, CI [0.61, 0.90]; 1 never does)") == ["0.76x", "0.22", ("0.61", "0.90"), "1"]
    text = "ratio 0.82 (95% interval 0.07 to 1.57), gap -0.042 (CI [-0.049, -0.036]), 0.1 to 0.2"
    assert numbers(text) == ["0.82", ("0.07", "1.57"), "-0.042", ("-0.049", "-0.036"), "0.1", "0.2"]
    assert numbers("peak memory 0.6-1.5% below, step 1.2-1.9x, +0.79") == ["0.6%", "1.5%", "1.2x", "1.9x", "+0.79"]


def test_an_interval_must_match_as_a_pair(tmp_path):
    body = "- ratio CI [0.61, 0.90] (`foo`)\n\n- gap CI [0.11, 0.20] (`foo`)"
    root = make_root(tmp_path, body, {"foo": ({"ci95": [0.6122, 0.9017], "lo": 0.11, "hi": 0.2}, "")})
    assert statuses(root) == {"[0.61, 0.90]": "results.json", "[0.11, 0.20]": "NOT FOUND"}


def test_claims_without_a_report_take_the_subsection_default_or_the_previous_claim(tmp_path):
    body = ("### The central claim, tuned\n\nSweep: see `foo`.\n\n- Peak 0.835.\n\n"
            "### Deviations from the paper\n\nUnless said otherwise, [`bar`](docs/results/bar/report.md).\n\n"
            "- Static: 0.636.\n\n"
            "| the paper's claim | what we measured | report |\n|---|---|---|\n"
            "| 13-27% lower (Table 3) | 0.89x | [`foo`](docs/results/foo/report.md) |")
    reports = {"lr-sweep": ({"peak": 0.8351}, ""), "bar": ({"loss": 0.6364}, ""), "foo": ({"r": 0.891}, "")}
    root = make_root(tmp_path, body, reports, top="**Where the central claim stands.** Window 1.89x.")
    claims = crn.section_claims((root / "README.md").read_text())
    crn.assign_reports(claims, root)
    got = {c.text[:12]: [r.split("/")[-1] for r in c.reports] for c in claims}
    assert got["**Where the "] == ["lr-sweep"]
    assert got["- Peak 0.835"] == ["lr-sweep"]
    assert got["- Static: 0."] == ["bar"]
    assert got["0.89x | [`fo"] == ["foo"]  # the paper's column is left out of the text that numbers come from
    assert "1.89x" in statuses(root) and "13" not in statuses(root)


def test_every_number_in_the_real_readme_is_in_a_results_json():
    """The project's rule: every number the README and the docs' results page state as a result is in a committed
    results.json (derived statistics in docs/results/<report>/derived/, made by benchmarks/derived_stats.py)."""
    root = Path(__file__).resolve().parents[1]
    rows = crn.check_pages(root)
    assert rows, "no numbers found: the results section was not read"
    pages = {r["page"] for r in rows}
    assert pages == {"README.md", "results-summary.md"}, pages  # the README's verdict and the moved section
    assert len([r for r in rows if r["page"] == "results-summary.md"]) > 200
    missing = [(r["page"], r["claim"][:60], r["number"]) for r in rows if r["status"] == "NOT FOUND"]
    assert missing == []


def test_a_page_in_docs_reads_its_links_from_its_own_folder(tmp_path):
    (tmp_path / "README.md").write_text("# x\n\n**Verdict.** Level; at lr 3e-2 it scores 0.83 ([r](docs/results/foo/report.md)).\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results-summary.md").write_text(
        f"# R\n\n{SECTION}\n\n- dev accuracy 0.835 ([`foo`](results/foo/report.md))\n")
    folder = tmp_path / "docs" / "results" / "foo"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"acc": 0.8347, "seed": [0.8312, 0.5]}))
    (folder / "report.md").write_text("")
    rows = crn.check_pages(tmp_path)
    assert [(r["page"], r["number"], r["status"]) for r in rows] == [
        ("README.md", "0.83", "results.json"), ("results-summary.md", "0.835", "results.json")]
    assert crn.main(["--root", str(tmp_path)]) == 0


def test_derived_stats_rebuild_the_committed_derived_results(tmp_path):
    """docs/results/<report>/derived/ is reproducible from its command: the same JSON, rebuilt from the committed
    results.json files (here the report that pools two folders and reads curves from a third)."""
    import derived_stats

    root = Path(__file__).resolve().parents[1]
    assert derived_stats.main(["--root", str(root), "--out-root", str(tmp_path), "--report", "lambda-codes-rte"]) == 0
    committed = root / "docs/results/lambda-codes-rte/derived"
    assert json.loads((tmp_path / "lambda-codes-rte/derived/results.json").read_text()) == json.loads(
        (committed / "results.json").read_text())
    assert (tmp_path / "lambda-codes-rte/derived/report.md").read_text() == (committed / "report.md").read_text()
    assert (committed / "report.md").read_text().startswith(
        f"# Derived statistics: lambda-codes-rte\n\nProduced by:\n\n```\n{derived_stats.COMMAND}\n```\n")


def test_missing_inputs_are_refused_with_a_message(tmp_path, capsys):
    import derived_stats

    for run in (lambda: crn.main(["--readme", str(tmp_path / "nope.md")]),
                lambda: derived_stats.main(["--root", str(tmp_path), "--report", "sst2-12seeds"])):
        try:
            run()
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError("a missing input was not refused")
    err = capsys.readouterr().err
    assert "no README at" in err and "sst2-12seeds/results.json does not exist" in err
