"""Fault injection on real training processes: does a fault ever lose data, and does `--resume` continue bit for bit?

Every trial runs `hyperadalora train` (the CLI's `main`) in a real child process on a tiny BERT and a tiny SST-2
written here, injects one fault, then checks the run directory from outside and continues the run with
`hyperadalora train --resume RUN_DIR` (nothing else) in a new process:

- ``sigkill-random``: SIGKILL at a random moment (uniform over the run after its first checkpoint; a checkpoint is
  written every step, so many land inside a checkpoint write);
- ``sigkill-in-checkpoint``: SIGKILL at each point of a checkpoint write (half-way through each file, before and after
  the rename into place, during the removal of an old checkpoint);
- ``sigkill-in-metrics``: SIGKILL half-way through a metrics.jsonl row (a torn last line);
- ``sigint`` / ``sigterm``: the signal at a random step, for every method: a checkpoint must be written (exit 130 /
  143);
- ``corrupt-checkpoint`` / ``corrupt-adapter``: a file of the newest checkpoint or of the saved adapter truncated or
  with one byte flipped: refused with a message naming the file, never loaded (a run directory resumes from the
  previous checkpoint);
- ``disk-full``: writes fail with ENOSPC once a random number of bytes is written (simulated in the child: every
  write of the run's files goes through a byte budget), and, where a tmpfs can be mounted (root), a real small
  tmpfs as the output directory: the run must stop with a clear message, its last complete checkpoint intact.

A trial *survives* when the newest complete checkpoint before the fault still verifies and loads, the continued run's
every training row (loss, task loss, lr, rank), its final evaluation and its final checkpoint's weights equal the
uninterrupted run's bit for bit, and (corruption) the damaged file was refused naming it. *Data lost* counts the
trials where a checkpoint that had been completed before the fault was gone or damaged, a damaged file was loaded,
or the continued run differs from the uninterrupted one. It must be 0.

The children are forked from this process once it has imported the library (on a loaded 2-core machine a fresh
interpreter spends ~15 s importing torch and transformers); each is a separate process, killed by the kernel, and
runs the CLI's own entry point. ``--spawn`` runs every child in a fresh interpreter instead (this script's
``--child`` mode: the same hooks, then the CLI's ``main``).

    python benchmarks/fault_injection.py                       # >= 20 SIGKILL trials, every method, the table
    python benchmarks/fault_injection.py --quick               # a few trials of each fault (what the tests run)
    python benchmarks/fault_injection.py --out docs/results/fault-injection   # also report.md + results.json
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

METHODS = ("hyperadalora", "adalora", "lora", "dora", "hyperlora", "hyperdora", "hydralora", "hyperhydralora")
SCHEDULED = ("hyperadalora", "adalora")
STEPS = 10
CHECKPOINT_POINTS = ("model.safetensors", "rng.safetensors", "optimizer.pt", "state.json", "manifest.json",
                     "rename-before", "rename-after", "cleanup")
POS = ["good", "great", "fine", "happy", "nice"]
NEG = ["bad", "awful", "poor", "sad", "ugly"]


# ---------------------------------------------------------------------------------------------- the tiny run
def make_fixture(root: str) -> dict:
    """A tiny BERT (MiniLM's tokenizer, 2 layers of width 32) and a tiny SST-2 (24 train / 8 dev) under ``root``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from hyperadalora.base_models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model_dir = os.path.join(root, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = os.path.join(root, "glue", "SST-2")
    os.makedirs(data)
    rng = random.Random(0)
    for name, n in (("train.tsv", 24), ("dev.tsv", 8)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = POS if i % 2 else NEG
            lines.append(" ".join(rng.choice(words) for _ in range(4)) + f" movie\t{i % 2}")
        with open(os.path.join(data, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return {"model": model_dir, "data_dir": os.path.join(root, "glue")}


def train_argv(fixture: dict, method: str, out: str, save_every: int = 1) -> list[str]:
    argv = ["train", "--method", method, "--task", "sst2", "--model", fixture["model"], "--data-dir",
            fixture["data_dir"], "--max-steps", str(STEPS), "--batch-size", "8", "--max-length", "16",
            "--lr", "0.005", "--lora-dropout", "0.1", "--save-every", str(save_every), "--keep-checkpoints", "2",
            "--max-eval-examples", "8", "--no-progress", "--output-dir", out]
    if method in SCHEDULED:
        argv += ["--tinit", "2", "--tfinal", "3", "--deltaT", "2"]
    return argv


# ---------------------------------------------------------------------------------------------- the child's faults
class Faults:
    """Hooks installed in a child before it runs the CLI: a side log of its progress ("step N", "saved N"), SIGKILL
    at a named point of a write, and a byte budget after which every write of the run's files fails with ENOSPC."""

    def __init__(self, fault: dict, side: str, out: str):
        self.fault, self.side, self.out = fault, side, os.path.abspath(out)
        self.saving = None        # the step whose checkpoint is being written
        self.written = 0          # bytes written to the run's files (the disk-full budget counts them)
        self.budget = fault.get("budget")

    def log(self, text: str) -> None:
        fd = os.open(self.side, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{text} {time.time():.6f} {self.written}\n".encode())
        os.close(fd)

    def die(self) -> None:
        self.log("killing")
        os.kill(os.getpid(), signal.SIGKILL)

    def at(self, point: str, text: str = "") -> bool:
        """Whether the fault is a kill at ``point`` now."""
        f = self.fault
        if f.get("kind") != "kill" or f["point"] != point:
            return False
        if point == "metrics.jsonl":
            return f'"step": {f["step"]},' in text and '"type": "eval"' not in text
        return self.saving == f["step"]

    def write(self, real, path: str, data, point: str):
        """Write ``data`` to the open file ``real`` with the faults: half of it then SIGKILL, or up to the budget
        then ENOSPC."""
        if self.at(point, data if isinstance(data, str) else ""):
            real.write(data[:len(data) // 2])
            real.flush()
            self.die()
        size = len(data.encode() if isinstance(data, str) else data)
        if os.path.abspath(path).startswith(self.out):
            room = size if self.budget is None else self.budget - self.written
            if size > room:
                real.write(data[:max(0, room)])
                real.flush()
                self.written = self.budget
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            self.written += size
        return real.write(data)

    def install(self) -> None:
        import safetensors.torch
        import torch

        import hyperadalora.checkpoint as ckpt
        import hyperadalora.config as config
        import hyperadalora.methods.base as method_base
        import hyperadalora.training as train_mod
        import hyperadalora.training.loop as loop_mod
        import hyperadalora.training.run_files as run_files_mod
        import hyperadalora.tuner_utils as tuner_utils

        faults, real_open = self, open

        class File:
            def __init__(self, path, mode, *a, **k):
                self.path, self.real = path, real_open(path, mode, *a, **k)

            def write(self, data):
                return faults.write(self.real, self.path, data, os.path.basename(self.path))

            def writelines(self, lines):
                for line in lines:
                    self.write(line)

            def __getattr__(self, name):
                return getattr(self.real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.real.close()
                return False

            def __iter__(self):
                return iter(self.real)

        def fault_open(path, mode="r", *a, **k):
            if any(c in mode for c in "wax") and "b" not in mode:
                return File(path, mode, *a, **k)
            return real_open(path, mode, *a, **k)

        for module in (ckpt, loop_mod, run_files_mod, config, method_base):
            module.open = fault_open  # module globals shadow the builtin

        def write_bytes(path, data: bytes):
            with real_open(path, "wb") as f:
                faults.write(f, path, data, os.path.basename(path))

        def save_file(tensors, path, metadata=None):
            write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))

        ckpt.save_file = save_file
        tuner_utils.save_file = save_file
        real_torch_save = torch.save

        def torch_save(obj, f, *a, **k):
            if not isinstance(f, (str, os.PathLike)):
                return real_torch_save(obj, f, *a, **k)
            buffer = io.BytesIO()
            real_torch_save(obj, buffer, *a, **k)
            write_bytes(str(f), buffer.getvalue())

        torch.save = torch_save
        real_replace, real_rmtree = os.replace, shutil.rmtree

        def replace(src, dst, *a, **k):
            if faults.saving is not None and ".tmp-step-" in str(src):
                if faults.at("rename-before"):
                    faults.die()
                real_replace(src, dst, *a, **k)
                if faults.at("rename-after"):
                    faults.die()
                return None
            return real_replace(src, dst, *a, **k)

        def rmtree(path, *a, **k):
            if faults.saving is not None and faults.at("cleanup") and os.path.isdir(path):
                names = sorted(os.listdir(path))
                if names:  # half-removed, then killed
                    os.remove(os.path.join(path, names[0]))
                faults.die()
            return real_rmtree(path, *a, **k)

        os.replace, shutil.rmtree = replace, rmtree
        real_save = ckpt.save_checkpoint

        def save_checkpoint(run_dir, step, *a, **k):
            faults.saving = step
            try:
                path = real_save(run_dir, step, *a, **k)
            finally:
                faults.saving = None
            faults.log(f"saved {step}")
            return path

        ckpt.save_checkpoint = save_checkpoint
        real_train = train_mod.train
        train_mod.train = functools.partial(real_train, on_step=lambda step, row: faults.log(f"step {step}"))


def child_main(argv: list, fault: dict, side: str) -> int:
    """A training process: the CLI with the fault's hooks installed."""
    import torch

    torch.set_num_threads(1)
    out = argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else argv[argv.index("--resume") + 1]
    faults = Faults(fault, side, out)
    faults.install()
    from hyperadalora import cli

    code = cli.main(argv)
    faults.log(f"exit {code}")
    return code


# ---------------------------------------------------------------------------------------------- the parent
class Runner:
    """Starts children (forked from this process, or fresh interpreters with ``spawn``) and waits for them."""

    def __init__(self, spawn: bool, workdir: str):
        self.spawn, self.workdir, self.count = spawn, workdir, 0

    def start(self, argv: list, fault: dict | None = None, out: str | None = None):
        self.count += 1
        side = os.path.join(self.workdir, f"side-{self.count}.log")
        err = os.path.join(self.workdir, f"stderr-{self.count}.log")
        fault = fault or {}
        if self.spawn:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(fault), side, "--", *argv]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(err, "w"))
            return Child(proc.pid, side, err, proc=proc)
        pid = os.fork()
        if pid == 0:  # the child: its own stderr, the CLI, then exit without the parent's cleanup
            code = 1
            try:
                fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                sys.stdout = os.fdopen(1, "w")
                for s in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
                code = child_main(argv, fault, side)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        return Child(pid, side, err)


class Child:
    def __init__(self, pid, side, err, proc=None):
        self.pid, self.side, self.err, self.proc = pid, side, err, proc

    def events(self, kind: str) -> list[tuple[int, float, int]]:
        """[(number, time, bytes written so far)] of the side log's events of ``kind`` (step, saved, exit)."""
        try:
            with open(self.side) as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return []
        return [(int(p[1]), float(p[2]), int(p[3])) for line in lines if len(p := line.split()) == 4 and p[0] == kind]

    def saved(self) -> list[int]:
        return [e[0] for e in self.events("saved")]

    def steps(self) -> list[int]:
        return [e[0] for e in self.events("step")]

    def poll(self):
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout: float = 600.0) -> int:
        end = time.time() + timeout
        while True:
            code = getattr(self, "code", None) if self.proc is None else self.proc.poll()
            if code is None:
                code = self.poll()
            if code is not None:
                return code
            if time.time() > end:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.01)

    def stderr(self) -> str:
        with open(self.err) as f:
            return f.read()


def file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def outcome(run_dir: str) -> dict:
    """What a finished run left: its training rows, its final evaluation and its final checkpoint's weights."""
    from hyperadalora import checkpoint as ckpt

    rows, evals = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            (evals if row.get("type") == "eval" else rows).append(row)
    keys = ("step", "loss", "task_loss", "lr", "total_rank", "epoch")
    final = [e for e in evals if e.get("final")]
    last = ckpt.list_checkpoints(run_dir)[-1][1]
    return {"rows": [[r.get(k) for k in keys] for r in rows],
            "final_eval": {k: v for k, v in final[-1].items() if k not in ("time", "type")} if final else None,
            "weights": file_sha(os.path.join(last, "model.safetensors")), "last": os.path.basename(last)}


def check_checkpoints(run_dir: str, completed: list[int]) -> tuple[bool, str]:
    """The newest complete checkpoint verifies and loads, and no checkpoint completed before the fault is lost
    (the newest valid one is at least the last completed)."""
    import warnings

    from hyperadalora import checkpoint as ckpt

    if not completed:
        return True, "no checkpoint completed before the fault"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = ckpt.find_checkpoint(run_dir)
        loaded = ckpt.load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 (any failure here is the finding)
        return False, f"no valid checkpoint: {e}"
    if loaded["step"] < max(completed):
        return False, f"newest valid checkpoint is step {loaded['step']}, but step {max(completed)} had completed"
    return True, f"newest valid checkpoint: step {loaded['step']}"


class Suite:
    def __init__(self, args):
        self.args = args
        self.root = tempfile.mkdtemp(prefix="fault-injection-")
        self.fixture = make_fixture(self.root)
        self.runner = Runner(args.spawn, self.root)
        self.rng = random.Random(args.seed)
        self.references, self.durations = {}, {}
        self.trials = []
        self.n = 0

    def new_dir(self, name: str) -> str:
        self.n += 1
        return os.path.join(self.root, f"{name}-{self.n}")

    def reference(self, method: str, save_every: int = 1) -> dict:
        key = (method, save_every)
        if key not in self.references:
            out = self.new_dir(f"ref-{method}")
            t0 = time.time()
            child = self.runner.start(train_argv(self.fixture, method, out, save_every))
            code = child.wait()
            if code != 0:
                raise RuntimeError(f"reference run of {method} failed ({code}): {child.stderr()[-2000:]}")
            saved, end = child.events("saved"), child.events("exit")
            self.durations[key] = {"first_save": saved[0][1] - t0, "saving": saved[-1][1] - saved[0][1],
                                   "bytes_first": saved[0][2], "bytes": end[-1][2]}
            self.references[key] = outcome(out)
            self.references[("finished", method, save_every)] = out  # never changed: trials work on copies
        return self.references[key]

    def resume_and_compare(self, out: str, method: str, save_every: int, extra=()) -> tuple[bool, str]:
        child = self.runner.start(["train", "--resume", out, *extra])
        code = child.wait()
        if code != 0:
            return False, f"resume exited {code}: {child.stderr()[-600:]}"
        got, want = outcome(out), self.reference(method, save_every)
        for key in ("rows", "final_eval", "weights"):
            if got[key] != want[key]:
                return False, f"the continued run's {key} differ from the uninterrupted run's"
        return True, "continued bit for bit"

    def record(self, fault: str, detail: str, survived: bool, lost: bool, note: str) -> None:
        self.trials.append({"fault": fault, "detail": detail, "survived": survived, "data_lost": lost, "note": note})
        mark = "ok  " if survived else "FAIL"
        print(f"  {mark} {fault:22s} {detail:42s} {note[:110]}", flush=True)

    # ---------------------------------------------------------------------------- the faults
    def kill_trial(self, fault: str, detail: str, fault_spec: dict | None, delay: float | None = None,
                   method: str = "hyperadalora") -> None:
        ref = self.reference(method)
        out = self.new_dir(fault)
        child = self.runner.start(train_argv(self.fixture, method, out), fault_spec)
        if delay is not None:  # a random moment after the first checkpoint
            while not child.saved() and child.poll() is None:
                time.sleep(0.002)
            time.sleep(delay)
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = child.wait()
        steps = child.steps()
        detail = f"{detail}, at step {max(steps) if steps else 0}" if delay is not None else detail
        if code == 0:
            self.record(fault, detail + " (finished before the kill)", outcome(out) == ref, outcome(out) != ref,
                        "not interrupted")
            return
        if not child.saved():  # killed before its first checkpoint: nothing to resume, said so; it starts again
            again = self.runner.start(["train", "--resume", out])
            refused = again.wait() == 2 and "No checkpoint in" in again.stderr()
            rerun = self.runner.start(train_argv(self.fixture, method, out) + ["--overwrite"])
            same = rerun.wait() == 0 and all(outcome(out)[k] == ref[k] for k in ("rows", "final_eval", "weights"))
            self.record(fault, detail, refused and same, not same, "killed before its first checkpoint: --resume "
                        f"says there is none ({refused}); started again with --overwrite: "
                        + ("bit for bit" if same else "differs"))
            return
        ok, note = check_checkpoints(out, child.saved())
        if not ok:
            self.record(fault, detail, False, True, note)
            return
        same, why = self.resume_and_compare(out, method, 1)
        self.record(fault, detail, same, not same, f"{note}; {why}")

    def signal_trial(self, method: str, signum: int) -> None:
        self.reference(method, save_every=4)
        out = self.new_dir(f"{signal.Signals(signum).name.lower()}-{method}")
        child = self.runner.start(train_argv(self.fixture, method, out, save_every=4))
        at = self.rng.randint(2, STEPS - 2)
        while (not child.steps() or max(child.steps()) < at) and child.poll() is None:
            time.sleep(0.002)
        os.kill(child.pid, signum)
        code = child.wait()
        name = signal.Signals(signum).name
        steps = child.steps()
        detail = f"{method}, after step {max(steps) if steps else 0}"
        want = 128 + signum
        if code != want:
            self.record(name.lower(), detail, False, code != 0, f"exit {code}, expected {want}: "
                                                                   f"{child.stderr()[-300:]}")
            return
        ok, note = check_checkpoints(out, child.saved())
        wrote = bool(child.saved()) and max(child.saved()) == max(steps)
        if not (ok and wrote):
            self.record(name.lower(), detail, False, True, f"no checkpoint of the stopped step: {note}")
            return
        same, why = self.resume_and_compare(out, method, 4)
        self.record(name.lower(), detail, same, not same, f"checkpoint of step {max(child.saved())}; {why}")

    def corrupt_checkpoint_trial(self, name: str, how: str) -> None:
        from hyperadalora import checkpoint as ckpt

        self.reference("hyperadalora", save_every=4)
        out = self.new_dir("corrupt-ckpt")
        shutil.copytree(self._finished("hyperadalora", 4), out)
        newest = ckpt.list_checkpoints(out)[-1][1]
        path = os.path.join(newest, name)
        damage(path, how, self.rng)
        refused = self.runner.start(["train", "--resume", newest])  # that checkpoint itself: refused
        code = refused.wait()
        err = refused.stderr()
        named = path in err
        if code == 0 or not named:
            self.record("corrupt-checkpoint", f"{name} {how}", False, code == 0,
                        f"exit {code}; message names the file: {named}: {err[-300:]}")
            return
        # the run directory: the damaged checkpoint is skipped (named), the previous one continues bit for bit
        child = self.runner.start(["train", "--resume", out])
        code = child.wait()
        skipped = "Skipping damaged checkpoint" in child.stderr() and path in child.stderr()
        if code != 0 or not skipped:
            self.record("corrupt-checkpoint", f"{name} {how}", False, False,
                        f"run dir resume exit {code}, skipped named: {skipped}")
            return
        got, want = outcome(out), self.reference("hyperadalora", 4)
        same = all(got[k] == want[k] for k in ("rows", "final_eval", "weights"))
        self.record("corrupt-checkpoint", f"{name} {how}", same, not same,
                    "refused naming the file; the run dir resumed from the previous checkpoint "
                    + ("bit for bit" if same else "with other results"))

    def corrupt_adapter_trial(self, method: str, name: str, how: str) -> None:
        import hyperadalora as ha
        from transformers import AutoModelForSequenceClassification

        src = os.path.join(self._finished(method, 4), "adapter")
        adapter = self.new_dir("corrupt-adapter")
        shutil.copytree(src, adapter)
        path = os.path.join(adapter, name)
        damage(path, how, self.rng)
        base = AutoModelForSequenceClassification.from_pretrained(self.fixture["model"])
        try:
            ha.load_adapter(base, adapter)
        except Exception as e:  # noqa: BLE001
            named = path in str(e) or name in str(e)
            self.record("corrupt-adapter", f"{method} {name} {how}", named, False,
                        f"refused: {type(e).__name__}: {str(e)[:90]}" + ("" if named else " (file not named)"))
            return
        self.record("corrupt-adapter", f"{method} {name} {how}", False, True, "the damaged adapter was loaded")

    def _finished(self, method: str, save_every: int) -> str:
        key = ("finished", method, save_every)
        if key not in self.references:
            out = self.new_dir(f"finished-{method}")
            child = self.runner.start(train_argv(self.fixture, method, out, save_every))
            if child.wait() != 0:
                raise RuntimeError(child.stderr()[-2000:])
            self.references[key] = out
        return self.references[key]

    def disk_full_trial(self, budget: int) -> None:
        ref = self.reference("hyperadalora")
        out = self.new_dir("disk-full")
        child = self.runner.start(train_argv(self.fixture, "hyperadalora", out), {"budget": budget})
        code = child.wait()
        self._after_disk_full(out, child, code, f"after {budget:,} bytes", ref)

    def _after_disk_full(self, out, child, code, detail, ref, before_resume=None) -> None:
        err = child.stderr()
        if code == 0:
            got = outcome(out)
            self.record("disk-full", detail + " (finished)", got == ref, got != ref, "the budget was not reached")
            return
        clear = "No space left on the device" in err and ("last complete checkpoint" in err
                                                           or "no checkpoint had been completed" in err)
        ok, note = check_checkpoints(out, child.saved())
        if not (clear and ok and code == 2):
            self.record("disk-full", detail, False, not ok, f"exit {code}; clear message: {clear}; {note}; "
                                                            f"{err[-300:]}")
            return
        if before_resume is not None:
            before_resume()
        if not child.saved():  # nothing to resume: the run starts again
            self.record("disk-full", detail, True, False, "stopped before its first checkpoint, with the message")
            return
        same, why = self.resume_and_compare(out, "hyperadalora", 1)
        self.record("disk-full", detail, same, not same, f"clear message; {note}; {why}")

    def tmpfs_trial(self, size_kib: int) -> bool:
        """A real full disk: the run's output directory on a tmpfs of ``size_kib``; after the stop, the tmpfs is
        grown (space freed) and the run resumed. False when no tmpfs can be mounted here."""
        out = self.new_dir("tmpfs")
        os.makedirs(out)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", out],
                          capture_output=True).returncode != 0:
            os.rmdir(out)
            return False
        try:
            ref = self.reference("hyperadalora")
            child = self.runner.start(train_argv(self.fixture, "hyperadalora", out))
            code = child.wait()

            def grow():
                subprocess.run(["mount", "-o", "remount,size=64m", out], check=True)

            self._after_disk_full(out, child, code, f"real tmpfs of {size_kib} KiB", ref, before_resume=grow)
        finally:
            subprocess.run(["umount", "-l", out], capture_output=True)
        return True


def damage(path: str, how: str, rng: random.Random) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "truncated":
        data = data[:rng.randint(0, len(data) - 1)]
    else:  # one byte flipped at a random place
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
        f.write(bytes(data))


def table(trials: list[dict]) -> list[dict]:
    out = {}
    for t in trials:
        row = out.setdefault(t["fault"], {"fault": t["fault"], "trials": 0, "survived": 0, "data_lost": 0})
        row["trials"] += 1
        row["survived"] += int(t["survived"])
        row["data_lost"] += int(t["data_lost"])
    return list(out.values())


def format_table(rows: list[dict]) -> str:
    lines = ["| fault | trials | survived | data lost |", "|---|---:|---:|---:|"]
    lines += [f"| {r['fault']} | {r['trials']} | {r['survived']} | {r['data_lost']} |" for r in rows]
    total = {k: sum(r[k] for r in rows) for k in ("trials", "survived", "data_lost")}
    lines.append(f"| **all** | {total['trials']} | {total['survived']} | {total['data_lost']} |")
    return "\n".join(lines)


def run(args) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    suite = Suite(args)
    rng = suite.rng
    t0 = time.time()
    print(f"work dir {suite.root}", flush=True)
    suite.reference("hyperadalora")
    timing = suite.durations[("hyperadalora", 1)]
    quick = args.quick
    print("SIGKILL at random moments", flush=True)
    for _ in range(args.kill_trials):
        suite.kill_trial("sigkill-random", "random moment", None, delay=rng.uniform(0.0, timing["saving"]))
    print("SIGKILL inside a checkpoint write / a metrics row", flush=True)
    points = CHECKPOINT_POINTS if not quick else ("model.safetensors", "rename-before", "cleanup")
    for point in points:
        step = rng.randint(3 if point == "cleanup" else 2, STEPS - 1)  # cleanup: from the third checkpoint on
        suite.kill_trial("sigkill-in-checkpoint", f"{point}, step {step}",
                         {"kind": "kill", "point": point, "step": step})
    for step in ([rng.randint(2, STEPS - 1) for _ in range(1 if quick else 4)]):
        suite.kill_trial("sigkill-in-metrics", f"row of step {step}", {"kind": "kill", "point": "metrics.jsonl",
                                                                        "step": step})
    print("SIGINT / SIGTERM, every method", flush=True)
    for i, method in enumerate(METHODS):  # quick: every method, SIGINT or SIGTERM in turn
        for signum in ((signal.SIGINT, signal.SIGTERM)[i % 2],) if quick else (signal.SIGINT, signal.SIGTERM):
            suite.signal_trial(method, signum)
    print("corrupted checkpoint and adapter files", flush=True)
    files = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "manifest.json")
    for name, how in ([(n, h) for n in files for h in ("truncated", "flipped")] if not quick
                      else [("model.safetensors", "flipped"), ("state.json", "truncated")]):
        suite.corrupt_checkpoint_trial(name, how)
    adapter_cases = [("hyperadalora", "adapter_model.safetensors"), ("hyperadalora", "hyperadalora_config.json"),
                     ("hyperlora", "adapter_model.safetensors"), ("hyperlora", "method_config.json")]
    for method, name in (adapter_cases if not quick else adapter_cases[:2]):
        for how in ("truncated", "flipped"):
            suite.corrupt_adapter_trial(method, name, how)
    print("full disk", flush=True)
    for _ in range(args.disk_trials):  # the disk fills at a random byte of the run's writes
        suite.disk_full_trial(rng.randint(timing["bytes_first"] // 2, timing["bytes"]))
    tmpfs = []
    if not quick:  # a real tmpfs that holds about 1.5 / 2.5 checkpoints: full at the second / third save
        newest = suite.references[("hyperadalora", 1)]["last"]
        ckpt_dir = os.path.join(suite._finished("hyperadalora", 1), "checkpoints", newest)
        kib = sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)) // 1024
        for size in (int(1.5 * kib) + 16, int(2.5 * kib) + 16):
            tmpfs.append(suite.tmpfs_trial(size))
    rows = table(suite.trials)
    print("\n" + format_table(rows), flush=True)
    result = {"rows": rows, "trials": suite.trials, "seconds": round(time.time() - t0, 1),
              "tmpfs": bool(tmpfs and all(tmpfs)), "children": "fresh interpreters" if args.spawn else "forked",
              "steps": STEPS, "seed": args.seed}
    if not args.keep:
        shutil.rmtree(suite.root, ignore_errors=True)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill-trials", type=int, default=24, help="SIGKILL at random moments (default 24)")
    p.add_argument("--disk-trials", type=int, default=6, help="simulated full disks at random byte counts")
    p.add_argument("--quick", action="store_true", help="a few trials of each fault")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spawn", action="store_true", help="fresh interpreters instead of forked children")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", help="write report.md and results.json here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":  # a fresh interpreter's child (--spawn)
        fault, side = json.loads(argv[1]), argv[2]
        sys.exit(child_main(argv[4:], fault, side))
    args = parse_args(argv)
    result = run(args)
    result["command"] = "python benchmarks/fault_injection.py " + " ".join(argv)
    if args.out:
        write_report(result, args.out)
    return result


def write_report(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# Fault injection: faults tried, survived, data lost\n\nCommand: `{result['command']}` "
                f"({result['seconds']:.0f} s; children {result['children']}; a real tmpfs for the full disk: "
                f"{'yes' if result['tmpfs'] else 'no'}).\n\n{format_table(result['rows'])}\n\n")
        f.write(__doc__.split("\n\n", 1)[1].split("    python benchmarks")[0].strip() + "\n\n")
        f.write("## Every trial\n\n| fault | detail | survived | data lost | note |\n|---|---|---|---|---|\n")
        for t in result["trials"]:
            note = t["note"].replace("|", "/").replace("\n", " ")[:160]
            f.write(f"| {t['fault']} | {t['detail']} | {t['survived']} | {t['data_lost']} | {note} |\n")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))
    res = main()
    sys.exit(0 if all(r["data_lost"] == 0 and r["survived"] == r["trials"] for r in res["rows"]) else 1)
