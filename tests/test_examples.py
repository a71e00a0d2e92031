"""Examples that cannot go stale: every example under examples/ runs at a tiny size (a 2-layer model, 2 steps), and
every code block of the README and of the docs site is an example's marked section (or, for a shell block, a
command line the CLI's parser accepts)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_bert, make_llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("guides/*.md"))]
SECTION = re.compile(r"# --8<-- \[start:(\w+)\]\n(.*?)# --8<-- \[end:\1\]\n", re.S)
SNIPPET = re.compile(r'^--8<-- "examples/([\w.]+)(?::(\w+))?"$')


def sections() -> dict:
    """{(file, section name): text} of every example."""
    found = {}
    for path in sorted(EXAMPLES.iterdir()):
        for m in SECTION.finditer(path.read_text()):
            found[(path.name, m.group(1))] = m.group(2)
    return found


def code_blocks(text: str):
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def test_every_python_block_is_an_example():
    known = sections()
    bodies = {body for body in known.values()}
    for page in PAGES:
        for lang, body in code_blocks(page.read_text()):
            if lang != "python":
                continue
            include = SNIPPET.match(body.strip())
            if include:  # the docs site includes the example's section itself (pymdownx.snippets)
                name, part = include.groups()
                assert (name, part) in known or (EXAMPLES / name).is_file(), (page.name, body)
            else:
                assert body in bodies, f"{page.relative_to(ROOT)}: a python block that is no example's section:\n{body}"


def test_the_readme_is_a_two_minute_read():
    words = len((ROOT / "README.md").read_text().split())
    assert words <= 2000, f"README.md has {words} words: move the detail to docs/"


def shell_commands(body: str):
    """The command lines of a shell block (continuations joined, comments dropped)."""
    body = re.sub(r"\\\n\s*", " ", body)
    for line in body.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield line


def test_every_shell_block_is_a_command_that_exists():
    """hyperadalora ... lines parse with the CLI's parser; python examples/X.py and bash examples/X.sh name an
    example; make targets exist."""
    from hyperadalora import cli

    parser = cli.build_parser()
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    known = sections()
    for page in PAGES:
        for lang, body in code_blocks(page.read_text()):
            if lang not in ("bash", "sh", "shell"):
                continue
            include = SNIPPET.match(body.strip())
            if include:
                assert (include.group(1), include.group(2)) in known, (page.name, body)
                continue
            for line in shell_commands(body):
                words = [w for w in shlex.split(line.replace("$", "X")) if w != "..."]  # "...": more options
                if words[0] == "torchrun" and "-m" in words:  # torchrun ... -m hyperadalora ARGS
                    words = words[words.index("-m") + 1:]
                if words[0] == "hyperadalora":
                    ns = parser.parse_args(words[1:])  # SystemExit on an unknown flag
                    if hasattr(ns, "_conflicts"):
                        raise AssertionError(f"{page.name}: {line}")
                elif words[0] in ("python", ".venv/bin/python") and words[1].startswith("examples/"):
                    assert (ROOT / words[1]).is_file(), line
                elif words[0] == "bash" and words[1].startswith("examples/"):
                    assert (ROOT / words[1]).is_file(), line
                elif words[0] == "make":
                    assert set(words[1:]) <= targets, line


# ------------------------------------------------------------------------------------------ running them, tiny
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    make_bert(vocab=tokenizer.vocab_size, hidden=64).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    make_llama(vocab=tokenizer.vocab_size).save_pretrained(root / "llama")
    tokenizer.eos_token = "[SEP]"  # a causal LM's tokenizer has one (TRL appends it)
    tokenizer.save_pretrained(root / "llama")
    records = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}."} for w in
               ("yes", "no", "maybe", "hello", "thanks", "goodbye", "red", "blue") * 3]
    (root / "alpaca.json").write_text(json.dumps(records))
    return root


def run(argv, cwd, **env):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env}
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("script, args", [
    ("python_api.py", ["--model", "{bert}"]),
    ("trainer.py", ["--model", "{bert}"]),
    ("quantized.py", ["--model", "{bert}"]),
    ("trl_sft.py", ["--model", "{llama}", "--data", "{alpaca}"]),
])
def test_the_example_runs_at_a_tiny_size(script, args, tiny, tmp_path):
    if script == "trl_sft.py":
        pytest.importorskip("trl")
    if script == "quantized.py":
        pytest.importorskip("bitsandbytes")
    paths = {"bert": tiny / "bert", "llama": tiny / "llama", "alpaca": tiny / "alpaca.json"}
    args = [a.format(**paths) for a in args]
    run([sys.executable, str(EXAMPLES / script), "--steps", "2", *args], cwd=tmp_path)


def test_the_cli_example_runs_at_a_tiny_size(tiny, tmp_path):
    run(["bash", str(EXAMPLES / "cli.sh"), "4", str(tiny / "bert")], cwd=tmp_path, OUT=str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["process_time_s"] >= summary["stages_s"]["train"] > 0
    assert {"load_model", "adapter", "train", "eval"} <= set(summary["stages_s"])
    config = json.loads((tmp_path / "run" / "lora-uniform" / "adapter_config.json").read_text())
    assert config["r"] in (1, 8, 16)


@pytest.mark.slow
def test_the_gguf_check_runs_on_smollm2(tmp_path):
    """examples/gguf_check.py on a fixed random adapter of SmolLM2 (as tests/test_export_llamacpp.py builds it)."""
    pytest.importorskip("llama_cpp")
    from test_export_llamacpp import _known_adapter

    from hyperadalora.base_models import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer("smollm2", "instruction")
    wrapped, _ = _known_adapter(model)
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    out = run([sys.executable, str(EXAMPLES / "gguf_check.py"), "--adapter", str(tmp_path / "adapter")], cwd=tmp_path)
    assert "correlation 0.99" in out.stdout


def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs build --strict: every nav page exists, every link resolves, every snippet is an example's section,
    the API reference's objects import (make test runs it too, as make docs)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
              NO_MKDOCS_2_WARNING="1")
    page = (tmp_path / "site" / "cli-reference" / "index.html").read_text()
    assert "--per-device-train-batch-size" in page and "--logging-steps" in page, out.stderr
