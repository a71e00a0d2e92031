"""Derived statistics of committed results: the README numbers computed from a results.json but stored in none.

The project's rule: every number in the README appears in a committed results.json. Some are derived from one: a
sample sd or 95% t-interval over seeds (older results.json store the population sd and no interval), a ratio or a
difference per seed, seeds pooled over a report and its sub-folder, a loss gap over a range of steps of the stored
curves, a percentage. This script computes them from the committed results.json files only (nothing is typed in),
with the experiments' own statistics (`hyperadalora.experiments.stats.stats`: mean, sample sd, 95% Student-t
interval of the mean), and writes ``docs/results/<report>/derived/results.json`` and ``derived/report.md``.

    python benchmarks/derived_stats.py                                         # every report below
    python benchmarks/derived_stats.py --report sst2-12seeds --out-root /tmp/d  # one report, written elsewhere

An entry: ``name``, ``what``, ``value`` (the mean), ``values`` with their ``labels`` ("seed 0", or "batch 1"),
``n`` (values that are numbers; ``n_total`` all), ``sd`` (sample, n - 1), ``ci95`` ([lo, hi]; null for n < 2),
``source`` (``file:key path``, files relative to docs/results/; ``*`` runs over seeds) and any extra fields it
names. Nothing is rounded; the output depends only on the inputs (the test suite rebuilds one and compares).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hyperadalora.experiments.stats import stats

COMMAND = "python benchmarks/derived_stats.py"
REF = "adalora"


class Inputs:
    """The committed results.json files of docs/results/, read once each; remembers which were read."""

    def __init__(self, results: Path):
        self.results, self.cache = results, {}

    def __call__(self, name: str) -> dict:
        if name not in self.cache:
            self.cache[name] = json.loads((self.results / name).read_text())
        return self.cache[name]


def get(obj, path: str):
    """The value at a dotted key path."""
    for key in path.split("."):
        obj = obj[key]
    return obj


def entry(name: str, what: str, values: list, labels: list, source: list[str], **extra) -> dict:
    """One statistic over ``values`` (None: no number for that seed)."""
    s = stats(values)
    return {"name": name, "what": what, "value": s["mean"], "values": s["values"], "labels": labels, "n": s["n"],
            "n_total": s["n_total"], "sd": s["std"], "ci95": s["ci95"], "source": source, **extra}


def column(load: Inputs, files: list[str], path: str) -> tuple[list, list, list[str]]:
    """Per-seed values at ``path`` (a list in seed order) of each file, pooled: (values, seeds, sources)."""
    values, seeds, source = [], [], []
    for f in files:
        values += get(load(f), path)
        seeds += [f"seed {s}" for s in load(f)["seeds"]]
        source.append(f"{f}:{path}")
    return values, seeds, source


def paired(load: Inputs, files: list[str], path: str, method: str, key: str, op) -> tuple[list, list, list[str]]:
    """``op(method's value, AdaLoRA's value)`` per seed of ``{path}.methods.<m>.{key}.values``."""
    x, seeds, src_x = column(load, files, f"{path}.methods.{method}.{key}.values")
    y, _, src_y = column(load, files, f"{path}.methods.{REF}.{key}.values")
    return [None if a is None or b is None else op(a, b) for a, b in zip(x, y)], seeds, src_x + src_y


def curve_gap(load: Inputs, files: list[str], method: str, first: int, last: int) -> tuple[list, list, list[str]]:
    """Per seed: the mean over steps first..last of ``method``'s training loss minus AdaLoRA's (same batches)."""
    values, seeds, source = [], [], []
    for f in files:
        curves = load(f)["curves"]
        steps = curves[method]["steps"]
        if steps != curves[REF]["steps"]:
            raise ValueError(f"{f}: {method} and {REF} logged different steps")
        keep = [i for i, s in enumerate(steps) if first <= s <= last]
        for a, b in zip(curves[method]["task_loss"], curves[REF]["task_loss"]):
            values.append(sum(a[i] - b[i] for i in keep) / len(keep))
        seeds += [f"seed {s}" for s in load(f)["seeds"]]
        source += [f"{f}:curves.{method}.task_loss", f"{f}:curves.{REF}.task_loss"]
    return values, seeds, source


def ratio(a, b):
    return a / b


def minus(a, b):
    return a - b


def points(a, b):
    return 100 * (a - b)


def sst2_12seeds(load: Inputs) -> list[dict]:
    files, conv, m = ["sst2-12seeds/results.json"], "convergence", "default"
    out = [entry(key, f"{what} (HyperAdaLoRA = variant `{m}`); over the seeds with a number", *column(
        load, files, f"{conv}.methods.{m}.{key}.values"))
        for key, what in [("loss_gap", "mean training-loss difference to AdaLoRA on the same batches"),
                          ("steps_ratio", "steps to AdaLoRA's final smoothed loss / AdaLoRA's"),
                          ("steps_ratio_90", "steps to 90% of AdaLoRA's drop / AdaLoRA's"),
                          ("time_ratio", "time to AdaLoRA's final smoothed loss / AdaLoRA's")]]
    out.append(entry("train_time_ratio", "training time of the whole run (200 steps) / AdaLoRA's, per seed",
                     *paired(load, files, conv, m, "train_time_s", ratio)))
    out.append(entry("dev_accuracy_diff_points", "dev accuracy minus AdaLoRA's, per seed, in points (x100)",
                     *paired(load, files, conv, m, "dev_accuracy", points)))
    return out


def lambda_codes_rte(load: Inputs) -> list[dict]:
    files = ["lambda-codes-rte/seeds-0-1/results.json", "lambda-codes-rte/results.json"]
    conv, m = "convergence", "default-lambda-codes"  # today's default
    out = [entry(f"pooled.{name}", f"{what}, seeds of both files", *column(
        load, files, f"{conv}.methods.{method}.{key}.values"))
        for name, method, key, what in [
            ("steps_ratio", m, "steps_ratio", f"`{m}`: steps to AdaLoRA's final smoothed loss / AdaLoRA's"),
            ("steps_ratio_90", m, "steps_ratio_90", f"`{m}`: steps to 90% of AdaLoRA's drop / AdaLoRA's"),
            ("loss_gap", m, "loss_gap", f"`{m}`: mean training-loss difference to AdaLoRA, same batches"),
            ("dev_accuracy", m, "dev_accuracy", f"`{m}`: dev accuracy"),
            ("adalora.dev_accuracy", REF, "dev_accuracy", "AdaLoRA's dev accuracy")]]
    out.append(entry("pooled.dev_accuracy_diff_points", f"`{m}`'s dev accuracy minus AdaLoRA's, per seed, in points",
                     *paired(load, files, conv, m, "dev_accuracy", points)))
    earlier = ["archive/formulation-rte-600/results.json", "lambda-codes-rte/results.json"]
    for name, method, src, what in [
            ("loss_gap_301_600.before_lambda_codes", "default", earlier,
             "the default before `lambda_codes` (variant `default`; seeds 0-1 from archive/formulation-rte-600)"),
            ("loss_gap_301_600.lambda_codes", m, files, f"with `lambda_codes` (variant `{m}`)")]:
        out.append(entry(name, f"mean over steps 301-600 of the training loss minus AdaLoRA's in the same file "
                               f"(same batches), per seed: {what}", *curve_gap(load, src, method, 301, 600)))
    return out


def generation(report: str):
    """Per-seed HyperAdaLoRA - AdaLoRA differences of dev BLEU-4, ROUGE-1 and dev loss, every dataset."""

    def derive(load: Inputs) -> list[dict]:
        files, out = [f"{report}/results.json"], []
        for ds in load(files[0])["datasets"]:
            for key in ("dev_bleu4", "dev_rouge1", "dev_eval_loss"):
                out.append(entry(f"{ds}.{key}_diff", f"{ds}: HyperAdaLoRA's final {key} minus AdaLoRA's, per seed",
                                 *paired(load, files, f"datasets.{ds}.convergence", "hyperadalora", key, minus)))
        return out

    return derive


def efficiency(load: Inputs) -> list[dict]:
    f = "efficiency/results.json"
    batches = load(f)["batch_sizes"]
    paths = [f"results.{b}.hyperadalora.mem_vs_adalora" for b in batches]
    pct = [100 * (1 - get(load(f), p)) for p in paths]
    late = [p for b, p in zip(batches, pct) if b >= 4]
    e = entry("peak_memory_below_adalora_pct", "100 x (1 - HyperAdaLoRA's peak memory / AdaLoRA's), per batch size "
              "(labels); a range over batch sizes, not a sample: value, sd and ci95 left empty",
              pct, [f"batch {b}" for b in batches], [f"{f}:{p}" for p in paths], range=[min(pct), max(pct)],
              range_from_batch_4=[min(late), max(late)])
    e.update(value=None, sd=None, ci95=None)
    return [e]


REPORTS = {"sst2-12seeds": sst2_12seeds, "lambda-codes-rte": lambda_codes_rte,
           "nlg-devspeed": generation("nlg-devspeed"), "nlg-two-sets": generation("nlg-two-sets"),
           "nlg-devspeed-lr1e-2": generation("nlg-devspeed-lr1e-2"), "efficiency": efficiency}


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(report: str, doc: dict) -> str:
    lines = [f"# Derived statistics: {report}", "", "Produced by:", "", "```", COMMAND, "```", "",
             "Computed by `benchmarks/derived_stats.py` from these committed files only (paths relative to "
             "`docs/results/`): " + ", ".join(f"`{f}`" for f in doc["inputs"]) + ". Mean over seeds, sample sd "
             "(n - 1), 95% Student-t interval of the mean (`hyperadalora.experiments.stats.stats`); shown here to "
             "4 significant digits, unrounded in `results.json`.", "",
             "| statistic | mean | values | n | sd | 95% CI | what | source |", "|---|---|---|---|---|---|---|---|"]
    for e in doc["stats"]:
        extra = "".join(f"; {k} {fmt(v)}" for k, v in e.items() if k.startswith("range"))
        values = "; ".join(f"{label}: {fmt(v)}" for label, v in zip(e["labels"], e["values"]))
        n = e["n"] if e["n"] == e["n_total"] else f"{e['n']} of {e['n_total']}"
        lines.append(f"| `{e['name']}` | {fmt(e['value'])} | {values} | {n} "
                     f"| {fmt(e['sd'])} | {fmt(e['ci95'])} | {e['what']}{extra} | "
                     + "<br>".join(f"`{s}`" for s in e["source"]) + " |")
    return "\n".join(lines) + "\n"


def derive(report: str, results: Path) -> dict:
    load = Inputs(results)
    found = REPORTS[report](load)
    return {"command": COMMAND, "report": report, "inputs": sorted(load.cache), "stats": found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the repository")
    parser.add_argument("--out-root", type=Path, help="write <report>/derived/ here (default: ROOT/docs/results)")
    parser.add_argument("--report", action="append", choices=sorted(REPORTS), help="default: all")
    args = parser.parse_args(argv)
    results = args.root / "docs" / "results"
    for report in args.report or REPORTS:
        try:
            doc = derive(report, results)
        except FileNotFoundError as e:
            parser.error(f"{report}: {e.filename} does not exist (--root must be the repository, with its "
                         f"committed docs/results/)")
        out = (args.out_root or results) / report / "derived"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "report.md").write_text(markdown(report, doc))
        print(f"{out}: {len(doc['stats'])} statistics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
