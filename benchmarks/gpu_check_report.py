"""The two Python halves of `benchmarks/gpu_check.sh`.

    python benchmarks/gpu_check_report.py train OUT.json -- --method hyperadalora --load-in-4bit ...
        runs ``hyperadalora train ARGS`` in this process and writes OUT.json: its exit status, the error if it failed
        (an unknown flag included), the median step time, the peak CUDA memory (``torch.cuda.max_memory_allocated``
        over the whole run, model loading included), the final loss and the total rank. Always exits 0: a failed run
        is a result, reported in the table, not a reason to stop the checks after it.
    python benchmarks/gpu_check_report.py table DIR
        prints one Markdown table of everything gpu_check.sh wrote under DIR: the device-agnostic tests on cuda
        (tests.xml, JUnit), the bf16 step time and peak memory per batch size of hyperadalora, adalora and lora
        (step_time_<model>.json of benchmarks/step_time.py) and the training runs (train_<name>.json).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
import xml.etree.ElementTree as ET

MiB = 2 ** 20
METHODS = ("hyperadalora", "adalora", "lora")


def run_train(out_path: str, argv: list) -> dict:
    import torch

    from hyperadalora import cli

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    record = {"argv": argv}
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            record["rc"] = cli.main(["train", *argv])
    except SystemExit as e:  # argparse: an unknown flag (e.g. --load-in-4bit in a checkout without it) or bad value
        record["rc"] = e.code if isinstance(e.code, int) else 2
    except Exception as e:  # noqa: BLE001 - recorded, and shown in the table
        record["rc"] = 1
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    sys.stderr.write(stderr.getvalue())
    if record["rc"] and "error" not in record:
        lines = [ln for ln in stderr.getvalue().strip().splitlines() if ln.strip()]
        record["error"] = lines[-1] if lines else f"exit status {record['rc']}"
    if torch.cuda.is_available():
        record["peak_mib"] = torch.cuda.max_memory_allocated() / MiB
    out_dir = argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else None
    summary_path = os.path.join(out_dir, "summary.json") if out_dir else None
    if record["rc"] == 0 and summary_path and os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        record.update(median_step_ms=1000 * summary["median_step_s"], final_loss=summary["final_loss"],
                      total_rank=summary["total_rank"], final_eval=summary["final_eval"])
    with open(out_path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return record


def test_cells(directory: str) -> list:
    path = os.path.join(directory, "tests.xml")
    if not os.path.isfile(path):
        return ["tests (-m device)", "-", "HYPERADALORA_TEST_DEVICE=cuda", "", "", "", "not run (no tests.xml)"]
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    result = f"{passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped"
    return ["tests (-m device)", "-", "HYPERADALORA_TEST_DEVICE=cuda", "", "", "", f"{result} (tests.log)"]


def step_time_rows(directory: str) -> list:
    rows = []
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("step_time_") and name.endswith(".json")):
            continue
        model = name[len("step_time_"):-len(".json")]
        with open(os.path.join(directory, name)) as f:
            out = json.load(f)
        for batch, res in sorted(out.get("results", {}).items(), key=lambda kv: int(kv[0])):
            h = res.get("hyperadalora", {})
            ratio = h.get("time_vs_adalora")
            rows.append(["step time ms (bf16)", model, f"batch {batch}",
                         *(f"{res[m]['median_ms']:.1f}" if m in res else "-" for m in METHODS),
                         f"time / adalora {ratio:.3f}" if ratio else ""])
            ratio = h.get("mem_vs_adalora")
            rows.append(["peak memory MiB (bf16)", model, f"batch {batch}",
                         *(f"{res[m]['peak_mib']:.0f}" if m in res else "-" for m in METHODS),
                         f"memory / adalora {ratio:.3f}" if ratio else ""])
    for name in sorted(os.listdir(directory)):
        if name.startswith("step_time_") and name.endswith(".rc"):
            with open(os.path.join(directory, name)) as f:
                rc = f.read().strip()
            if rc != "0":
                rows.append(["step time (bf16)", name[len("step_time_"):-3], "-", f"FAILED (exit {rc})", "", "",
                             name[:-3] + ".log"])
    return rows


def train_cell(record: dict) -> str:
    if record.get("rc") != 0:
        return f"FAILED: {record.get('error', 'exit status ' + str(record.get('rc')))}"
    return (f"{record['median_step_ms']:.1f} ms/step, peak {record.get('peak_mib', float('nan')):.0f} MiB, "
            f"final loss {record['final_loss']:.4f}, rank {record['total_rank']}")


def train_rows(directory: str) -> list:
    """train_<method>_<setting>.json -> one row per setting, the methods in their columns."""
    settings: dict = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("train_") and name.endswith(".json"):
            method, _, setting = name[len("train_"):-len(".json")].partition("_")
            with open(os.path.join(directory, name)) as f:
                settings.setdefault(setting, {})[method] = json.load(f)
    rows = []
    for setting, by_method in settings.items():
        argv = next(iter(by_method.values())).get("argv", [])
        task = argv[argv.index("--task") + 1] if "--task" in argv[:-1] else "sentiment"
        rows.append([f"train ({task})", "minilm", setting,
                     *(train_cell(by_method[m]) if m in by_method else "" for m in METHODS), ""])
    return rows


def table(directory: str) -> str:
    header = ["check", "model", "setting", *METHODS, "note"]
    rows = [test_cells(directory), *step_time_rows(directory), *train_rows(directory)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "train":
        rest = argv[2:]
        run_train(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    if len(argv) == 2 and argv[0] == "table":
        print(table(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
