"""`models.convert_gguf`: the one-time GGUF -> fp32 checkpoint conversion, with fakes in place of transformers' loaders
(the real SmolLM2 file is exercised by the slow NLG tests)."""
import os

import pytest
import transformers

from hyperadalora import base_models as models


class _Fake:
    def __init__(self, race_into=None):
        self.config = None
        self.race_into = race_into  # a folder another process fills while this one writes its own

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{}")
        if self.race_into and not os.path.isdir(self.race_into):
            os.makedirs(self.race_into)
            for name in ("config.json", ".complete"):
                open(os.path.join(self.race_into, name), "w").close()


@pytest.fixture
def fake_loaders(monkeypatch):
    calls = {"n": 0, "race_into": None}

    def load(*args, **kw):
        calls["n"] += 1
        return _Fake(calls["race_into"])

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", lambda *a, **k: _Fake(calls["race_into"]))
    return calls


def test_convert_gguf_writes_once_and_leaves_no_temporary_folder(tmp_path, fake_loaders):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    out = models.convert_gguf(str(gguf), str(tmp_path / "cache" / "model-fp32"))
    assert os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, ".complete"))
    assert sorted(os.listdir(tmp_path / "cache")) == ["model-fp32"]
    n = fake_loaders["n"]
    assert models.convert_gguf(str(gguf), out) == out and fake_loaders["n"] == n     # cached: not converted again


def test_convert_gguf_replaces_an_interrupted_conversion(tmp_path, fake_loaders):
    out = tmp_path / "model-fp32"
    out.mkdir()
    (out / "config.json").write_text("{}")                  # no .complete marker: a conversion that was cut off
    models.convert_gguf(str(tmp_path / "model.gguf"), str(out))
    assert (out / ".complete").is_file() and sorted(os.listdir(tmp_path)) == ["model-fp32"]


def test_convert_gguf_yields_to_a_process_that_finished_first(tmp_path, fake_loaders):
    """Two experiments started together both convert: the second to finish keeps the first one's checkpoint,
    without an error and without leaving its own folder behind."""
    out = tmp_path / "model-fp32"
    fake_loaders["race_into"] = str(out)
    assert models.convert_gguf(str(tmp_path / "model.gguf"), str(out)) == str(out)
    assert (out / ".complete").is_file() and sorted(os.listdir(tmp_path)) == ["model-fp32"]
