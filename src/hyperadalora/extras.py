"""The optional dependencies (``pip install 'hyperadalora[extra]'``) and the error that names the extra to install.

A core install (``pip install hyperadalora``) trains, evaluates and exports every method; these need an extra:

- ``[trl]``: trl, for `hyperadalora.sft.HyperAdaLoraSFTTrainer`;
- ``[quant]``: bitsandbytes, for 4-bit / 8-bit bases (``--load-in-4bit`` / ``--load-in-8bit``);
- ``[tracking]``: tensorboard, for ``--report-to tensorboard`` (wandb and mlflow: ``pip install wandb`` / ``mlflow``);
- ``[serve]``: llama-cpp-python, to check a GGUF export in llama.cpp (``examples/gguf_check.py``);
- ``[docs]``: mkdocs, to build the documentation site.

Nothing here imports torch: the command line checks a missing extra before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util

# importable module -> the extra of this package that installs it
EXTRAS = {"trl": "trl", "bitsandbytes": "quant", "tensorboard": "tracking", "llama_cpp": "serve", "mkdocs": "docs"}


def install_hint(module: str) -> str:
    """The command that installs ``module``: this package's extra where one has it, else the package itself."""
    return f"pip install 'hyperadalora[{EXTRAS[module]}]'" if module in EXTRAS else f"pip install {module}"


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the command that installs it."""


def missing(module: str, what: str) -> MissingExtraError:
    """The error for ``what`` (e.g. "--load-in-4bit") needing ``module``, which is not installed."""
    return MissingExtraError(f"{what} needs {module}, which is not installed: {install_hint(module)}.")


def require(module: str, what: str) -> None:
    """Raise `missing` unless ``module`` can be imported (looked up, not imported)."""
    if importlib.util.find_spec(module) is None:
        raise missing(module, what)
