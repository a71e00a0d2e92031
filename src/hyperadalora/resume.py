"""Resuming a run: what a resumed run takes from its checkpoint's record, and what it may change.

A checkpoint (`hyperadalora.checkpoint`) records the run's arguments (every `training.TrainArgs` field, in
``state.json["args"]``) and every hypernetwork option the run used, library defaults included
(``state.json["hypernetwork_options"]``). ``resume`` continues *that* run:

- every option comes from the record (task, data, model, method, batch size, seed, learning rate and schedule,
  the adapter's and the hypernetworks' options, ...);
- an option given explicitly (a CLI flag or a ``--config`` YAML key; from Python, see `TrainArgs.resumed` and
  the rule below) may change only what does not make it another run: `OVERRIDABLE` (``max_steps`` to extend
  the run, checkpointing, evaluation, the device, the output directory...). Each such override is reported
  in a one-line `ResumeNote`;
- the paths of `PATH_ARGS` (model, data) may be given anew only when the recorded path no longer exists (the
  files moved): a note says so, and they must hold the same files;
- any other option given with a value other than the recorded one is refused (`ResumeConflict`, naming each
  option with its recorded and given values): that would be another run, to be started without ``resume``.

From Python: ``TrainArgs.resumed(path, **overrides)`` (the overrides are the explicit options), or
``TrainArgs(..., resume=path)``, where a field left at its dataclass default is taken from the record and a
field set to any other value counts as given (so repeating every option of the run with ``resume`` is the same
run, as before).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from . import checkpoint as ckpt_lib
from .checkpoint import CheckpointError

# Options a resumed run may change, with what changing them does (the note printed for each override).
OVERRIDABLE = {
    "max_steps": "the run continues to the new last step; the linear lr schedule, the rank budget schedule "
                 "(total_step) and the hypernetworks' lr schedules are set by max_steps, so the steps after the "
                 "checkpoint differ from the recorded run's",
    "save_every": "checkpointing only", "keep_checkpoints": "checkpointing only",
    "max_nonfinite": "when to stop on NaN/Inf steps", "device": "where it runs",
    "progress": "the progress bar only", "save_adapter": "what is saved at the end",
    "eval_every": "evaluation only", "max_eval_examples": "evaluation only (the dev subset)",
    "gen_eval_examples": "evaluation only", "max_new_tokens": "evaluation only",
    "report_to": "experiment tracking only",
    "logging_steps": "console logging only",
    "gradient_checkpointing": "activations recomputed in backward; the losses are the same bit for bit",
    "fsdp": "how the base model is laid out over the processes (FSDP shards, DDP copies); the same losses to "
            "float rounding",
}
# Paths that may point elsewhere only when the recorded one is gone (the files moved); they must hold the same files.
PATH_ARGS = ("model", "data_dir", "data_path")
# Options of this invocation, never taken from the record.
INVOCATION_ARGS = ("resume", "output_dir", "overwrite")

# Options under ``hyper`` added after runs began recording theirs (`training.hypernetwork_options`), with the value
# that every run made before them used: a record without one of them is read as that value (a run is reusable, a
# checkpoint resumable as before). init_std, max_element_tokens, beta1 and beta2 had no flag before: every run used
# their default, which has not changed since.
OPTIONS_ADDED_LATER = {"hypernet_warmup_steps": 0, "init_std": 0.02, "max_element_tokens": 1 << 22, "beta1": 0.85,
                       "beta2": 0.85}


def recorded_options(record: Optional[dict]) -> Optional[dict]:
    """A run's or checkpoint's recorded hypernetwork options, completed with `OPTIONS_ADDED_LATER`; None or {}
    (nothing recorded) as given."""
    return {**OPTIONS_ADDED_LATER, **record} if record else record


class ResumeConflict(CheckpointError):
    """An option given with ``resume`` that would make the resumed run another run."""


class ResumeNote(UserWarning):
    """An option a resumed run changes (one line each; the CLI prints them as notes)."""


def _norm(value):
    """A value as the record holds it (the record is JSON)."""
    return json.loads(json.dumps(value, default=str))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_record(resume: str) -> tuple[str, dict]:
    """(the checkpoint `resume` continues: itself or the run's newest valid one, its state.json)."""
    path = ckpt_lib.find_checkpoint(resume)  # verified
    try:
        with open(os.path.join(path, "state.json")) as f:
            return path, json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read {os.path.join(path, 'state.json')}: {e}") from e


def _moved(recorded) -> bool:
    """Whether a recorded path is a path (not a hub name or alias) that no longer exists."""
    return isinstance(recorded, str) and (os.sep in recorded or recorded.startswith(".")) and \
        not os.path.exists(recorded)


def _same_path(given, recorded) -> bool:
    try:
        return os.path.samefile(given, recorded)
    except (OSError, TypeError):
        return False


def apply_record(args, explicit: Optional[set] = None, defaults: Optional[dict] = None) -> list[str]:
    """Fill ``args`` (a `training.TrainArgs` before its derived fields are set, ``args.resume`` set) from the record of
    the checkpoint it resumes. ``explicit``: the names of the options given (``hyper``: the hypernetwork options
    given in ``args.hyper``); None: the fields that differ from ``defaults`` (the dataclass defaults). Raises
    `ResumeConflict` for every given option that would change the run; returns the notes of the overrides (also
    warned as `ResumeNote`)."""
    path, state = read_record(args.resume)
    record = state.get("args") or {}
    if explicit is None:
        explicit = {name for name, default in defaults.items() if _norm(getattr(args, name)) != _norm(default)}
    conflicts, notes = [], []
    step = int(state.get("step", 0))
    for name in defaults:
        if name in INVOCATION_ARGS or name == "hyper":
            continue
        given = getattr(args, name)
        if name not in record:  # an option added after the checkpoint was written: its default is what the run used
            if name in explicit and _norm(given) != _norm(defaults[name]) and name not in OVERRIDABLE:
                conflicts.append(f"{name} (not recorded: the run used {defaults[name]!r}; given {given!r})")
            continue
        recorded = record[name]
        if name not in explicit or _norm(given) == recorded:
            setattr(args, name, recorded)
        elif name in OVERRIDABLE:
            if name == "max_steps" and isinstance(given, int) and given < step:
                conflicts.append(f"max_steps (given {given}: below the checkpoint's step {step})")
                continue
            notes.append(f"{name}: {recorded!r} -> {given!r} ({OVERRIDABLE[name]}).")
        elif name in PATH_ARGS and _same_path(given, recorded):
            pass  # the same file under another name
        elif name in PATH_ARGS and _moved(recorded):
            notes.append(f"{name}: the recorded {recorded!r} does not exist here; using {given!r}, which must hold "
                         f"the same files.")
        else:
            conflicts.append(f"{name} (recorded {recorded!r}, given {given!r}: {_flag(name)})")
    # hypernetwork options: the record's resolved set (library defaults included), else the options the run gave
    raw = state.get("hypernetwork_options") or None
    options = recorded_options(raw)  # completed with the options added later (their value before: compared only)
    recorded_hyper = dict(options) if options else dict(record.get("hyper") or {})
    given_hyper = dict(args.hyper or {})
    for name, value in given_hyper.items():
        if name in recorded_hyper:
            if _norm(value) != recorded_hyper[name]:
                conflicts.append(f"{name} (recorded {recorded_hyper[name]!r}, given {value!r}: {_flag(name)})")
        elif options:  # a complete record: the run's method has no such option
            conflicts.append(f"{name} (not an option of the recorded run's method; given {value!r})")
        else:  # a record from before runs recorded every option: what is given fills in what it does not say
            notes.append(f"hypernetwork option {name}={value!r} is not in the record (written before runs recorded "
                         f"every option): it must be the value the run used.")
    if conflicts:
        raise ResumeConflict(
            f"Resuming {path} continues the run it records; these options would make it another run: "
            f"{'; '.join(conflicts)}. Leave them out to continue the run as recorded. To train with them, start a "
            f"new run: without --resume (resume=None), with another --output-dir or --overwrite. A resumed run may "
            f"change only {', '.join(OVERRIDABLE)} and the output directory (and {', '.join(PATH_ARGS)} where the "
            f"recorded path no longer exists).")
    args.hyper = {**(raw or record.get("hyper") or {}), **given_hyper}
    for note in notes:
        warnings.warn(f"Resuming {path}: {note}", ResumeNote, stacklevel=4)
    return notes


def changed_args(current: dict, saved: dict) -> list[str]:
    """The options of ``current`` (a `TrainArgs` as JSON) that differ from the record ``saved`` and may not
    (`train` refuses to resume with them: a `TrainArgs` changed after it was built)."""
    return [f"{k} (recorded {saved[k]!r}, now {v!r})" for k, v in current.items()
            if k in saved and k not in OVERRIDABLE and k not in INVOCATION_ARGS and k not in PATH_ARGS
            and k != "hyper" and saved[k] != v]
