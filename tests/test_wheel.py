"""A wheel that installs alone (issue 31): ``python -m build`` makes a wheel; installed into a fresh venv with the core
dependencies only (no extra), ``import hyperadalora``, ``hyperadalora --help`` and a 2-step training run work, and
what needs an extra names it (``pip install 'hyperadalora[trl]'``).

Slow (a venv and the core dependencies installed: about 2-3 min with pip's cache, longer without). The install goes
through pip with this repository's constraints.txt (the same pinned versions, torch's CPU build); it needs PyPI or
pip's cache, as ``make test`` does.
"""

import glob
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def run(cmd, cwd, timeout=900, env=None):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**clean, **OFFLINE, **(env or {})})  # nothing of this checkout's environment
    return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory):
    """A fresh venv with the wheel and its core dependencies (no extras)."""
    tmp = tmp_path_factory.mktemp("wheel")
    code, out = run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"),
                     str(ROOT)], cwd=tmp)
    assert code == 0, out[-3000:]
    wheels = glob.glob(str(tmp / "dist" / "hyperadalora-*.whl"))
    assert len(wheels) == 1, wheels
    venv.create(tmp / "venv", with_pip=True)
    py = tmp / "venv" / "bin" / "python"
    torch_pin = next(line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
                     if line.startswith("torch=="))
    code, out = run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), torch_pin,
                     wheels[0]], cwd=tmp, timeout=1800)
    assert code == 0, out[-3000:]
    return tmp, py


@pytest.mark.slow
def test_the_wheel_installs_alone_and_trains(core_venv):
    tmp, py = core_venv
    code, out = run([str(py), "-m", "pip", "list", "--format=freeze"], cwd=tmp)
    installed = {line.split("==")[0].lower() for line in out.splitlines()}
    assert {"torch", "transformers", "peft"} <= installed, out
    for extra_package in ("trl", "bitsandbytes", "tensorboard", "pytest", "mkdocs", "llama-cpp-python"):
        assert extra_package not in installed, f"{extra_package} came with the core install"
    code, out = run([str(py), "-c", "import hyperadalora, sys; print(hyperadalora.__version__, "
                     "'torch' in sys.modules)"], cwd=tmp)
    assert code == 0 and out.split()[-1] == "False", out  # import hyperadalora is light
    exe = tmp / "venv" / "bin" / "hyperadalora"
    code, out = run([str(exe), "--help"], cwd=tmp)
    assert code == 0 and "train" in out, out
    code, out = run([str(exe), "train", "--max-steps", "2", "--per-device-train-batch-size", "4", "--max-length", "16",
                     "--max-train-samples", "16", "--max-eval-samples", "8", "--output-dir", str(tmp / "run"),
                     "--disable-tqdm"], cwd=tmp)
    assert code == 0, out[-3000:]
    assert (tmp / "run" / "summary.json").exists() and (tmp / "run" / "adapter").is_dir(), out[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("argv, extra", [
    (["train", "--load-in-4bit"], "pip install 'hyperadalora[quant]'"),
    (["train", "--report-to", "tensorboard"], "pip install 'hyperadalora[tracking]'"),
])
def test_a_missing_extra_is_named_by_the_cli(core_venv, argv, extra):
    tmp, py = core_venv
    code, out = run([str(tmp / "venv" / "bin" / "hyperadalora"), *argv], cwd=tmp)
    assert code == 2 and extra in out, out


@pytest.mark.slow
def test_a_missing_extra_is_named_by_the_python_api(core_venv):
    tmp, py = core_venv
    code, out = run([str(py), "-c", "import hyperadalora as ha; ha.HyperAdaLoraSFTTrainer"], cwd=tmp)
    assert code != 0 and "MissingExtraError" in out and "pip install 'hyperadalora[trl]'" in out, out
