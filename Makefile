# megavit — set-up and common tasks on a fresh CPU machine.
#
#   make quickstart   create .venv, install megavit, train a ViT on digits (CPU)
#   make quickstart-clip   the same set-up, then a small CLIP on captioned digits (CPU)
#   make test         create or reuse .venv, install test extras, run the whole suite
#
# Inside the NGC PyTorch container use `pip install -e .` instead (keeps its torch).

PYTHON ?= python3
VENV   ?= .venv
TORCH_CPU ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: quickstart quickstart-clip test venv clean bench-timm

$(VENV)/.installed-base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_CPU)"
	$(PIP) install --quiet -e ".[data]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PIP) install --quiet -e ".[data,test]"
	touch $@

venv: $(VENV)/.installed-base

quickstart: $(VENV)/.installed-base
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/quickstart_digits.sh

quickstart-clip: $(VENV)/.installed-base
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/quickstart_clip.sh

test: $(VENV)/.installed-test
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests

# The timm comparison needs torchvision, which only loads beside torch 2.14.1 here
# (a 5.5 GB CUDA build that also runs on CPU): a separate venv, so the main one stays small.
BENCH_VENV ?= .venv-timm
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BENCH_VENV)/bin/python -m pip install --quiet timm -e .
	touch $@

bench-timm: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/step_vs_timm.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs
