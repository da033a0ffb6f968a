# fastinf — the README's commands. Each target creates its own virtualenv (.venv) and installs
# what it needs: torch first and pinned (a CPU wheel on CPU boxes), then the project with its extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fastinf-installed
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "setuptools>=68" wheel "pybind11>=2.11"
	$(PIP) install -q --no-build-isolation -e ".[test,demo,lora,gguf,report]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/fastinf demo

bench: $(STAMP)
	$(PY) bench/extract.py
	$(PY) bench/score.py
	$(PY) bench/aggregate.py
	$(PY) bench/retrieval.py
	$(PY) bench/million.py

clean:
	rm -rf $(VENV) build *.egg-info fastinf/_C*.so
