"""Every method's per-step losses equal the recorded ones bit for bit (benchmarks/record_losses.py): the guard rail
of refactors and merges. Skipped on another CPU or torch build, where the bits say nothing about the code."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import record_losses  # noqa: E402

RECORDED = os.path.join(ROOT, "benchmarks", "recorded_losses.json")


@pytest.mark.slow
def test_every_method_gives_the_recorded_losses_bit_for_bit(capsys):
    saved = json.load(open(RECORDED))
    if saved["machine"] != record_losses.machine():
        pytest.skip(f"losses recorded on {saved['machine']}, this is {record_losses.machine()}")
    code = record_losses.main(["--check", RECORDED])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{len(record_losses.RUNS)} of {len(record_losses.RUNS)} runs equal bit for bit" in out
