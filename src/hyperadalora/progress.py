"""The stages of a run, shown and timed: importing, loading data and model, adapter set-up, training, evaluation,
generation, saving.

Each stage prints one line when it starts and one when it ends, with its duration (stderr, process 0, unless the
progress display is off: ``--disable-tqdm``); the loops inside (training steps, evaluation batches, generated
tokens) have progress bars. `STAGES` keeps the durations for summary.json (``stages_s``), beside the time since the
process started (``process_time_s``: `process_start`).

Light on purpose (the standard library only): the CLI uses it before torch is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Optional

_IMPORTED = time.time()


def process_start() -> float:
    """When this process started (seconds since the epoch): from /proc on Linux, else when this module was
    imported (just after the interpreter started, for the CLI)."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        ticks = int(after_name[19])  # field 22 of stat(5): starttime, in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


class Stages:
    """Named stages with their durations (seconds, summed over repeats: evaluations during training)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.enabled = True

    def reset(self, enabled: bool = True) -> None:
        self.times = {k: v for k, v in self.times.items() if k == "import"}  # the CLI's imports precede the run
        self.enabled = enabled

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"hyperadalora: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, what: str, quiet_below: float = 0.0):
        """Time the block as stage ``name``; ``what`` is said when it starts, and its duration when it ends (the
        end line only when it took ``quiet_below`` seconds or more)."""
        self.say(f"{what} ...")
        t0 = time.perf_counter()
        ended = "done"
        try:
            yield
        except BaseException as e:  # an error or an interruption: the stage did not finish
            ended = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            raise
        finally:
            took = time.perf_counter() - t0
            self.times[name] = self.times.get(name, 0.0) + took
            if took >= quiet_below or ended != "done":
                self.say(f"{what}: {ended} after {took:.1f} s" if ended != "done" else f"{what}: done in {took:.1f} s")

    def summary(self) -> dict:
        """``{"stages_s": {...}, "process_time_s": ...}`` for summary.json."""
        return {"stages_s": {k: round(v, 3) for k, v in self.times.items()},
                "process_time_s": round(time.time() - process_start(), 3)}


STAGES = Stages()


def enabled() -> bool:
    return STAGES.enabled


def stage(name: str, what: str, quiet_below: float = 0.0):
    return STAGES.stage(name, what, quiet_below)


# bitsandbytes (imported by peft whenever it is installed) warns at import, on a CPU with AVX512-BF16, that its fast
# 4-bit CPU kernel ("kernels-community") is missing, even when nothing is quantized. The warning is held back here and
# said as one line of what it means only when a quantized base is requested (`quantized_base_note`).
class _KernelWarning(logging.Filter):
    held: Optional[str] = None

    def filter(self, record: logging.LogRecord) -> bool:
        if "gemm_4bit_forward" in record.getMessage():
            _KernelWarning.held = record.getMessage()
            return False
        return True


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelWarning())


def quantized_base_note() -> Optional[str]:
    """The one line about bitsandbytes' missing fast CPU kernel, when it warned (None otherwise)."""
    if _KernelWarning.held is None:
        return None
    return ("note: bitsandbytes' fast 4-bit CPU kernel (the 'kernels' package, kernels-community) is not installed: "
            "4-bit layers run its generic kernel, slower on this CPU, with the same results (pip install 'kernels>=0.11.1' "
            "to use it).")
