# megavit — set-up and common tasks on a fresh CPU machine.
#
#   make quickstart   create .venv, install megavit, train a ViT on digits (CPU)
#   make quickstart-clip   the same set-up, then a small CLIP on captioned digits (CPU)
#   make quickstart-finetune   pretrain on MNIST-5k, fine-tune on digits (CPU, ~4 min)
#   make quickstart-attention   full / window+global / local-global / linear attention
#                     on mnist-canvas (CPU)
#   make quickstart-seg   semantic segmentation on mnist-seg (CPU, ~5 min): ends with mIoU
#   make quickstart-distill   a teacher on MNIST-5k, a student at 19 % of its parameters
#                     trained five ways (alone, + response, + feature, + relation, cache)
#   make venv-timm    only the timm venv (.venv-timm: torch 2.14.1 + torchvision + timm +
#                     segment-anything)
#   make test         create or reuse .venv (and .venv-timm for the timm checks), install
#                     the test extras, run the whole suite
#
# Inside the NGC PyTorch container use `pip install -e .` instead (keeps its torch).

PYTHON ?= python3
VENV   ?= .venv
TORCH_CPU ?= torch==2.13.0
TIMM_VENV ?= .venv-timm
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: quickstart quickstart-clip quickstart-finetune quickstart-attention quickstart-seg quickstart-distill test venv venv-timm clean bench-timm

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

quickstart-finetune: $(VENV)/.installed-base
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/finetune_digits.sh

quickstart-attention: $(VENV)/.installed-base
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/attention_canvas.sh

quickstart-seg: $(VENV)/.installed-base
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/quickstart_seg.sh

quickstart-distill: $(VENV)/.installed-base
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/distill_mnist.sh

# timm next to megavit, without touching .venv (installing timm there would replace its torch)
venv-timm: $(TIMM_VENV)/.installed-timm

# Two pytest workers (pytest-xdist), each taking whole test files (a file's process groups
# and cached serial references stay in one worker); the longest files go first.
HEAVY_TESTS = tests/test_tensor_parallel.py tests/test_launch.py tests/test_quickstart.py \
	tests/test_distillation.py tests/test_fault_tolerance.py
test: $(VENV)/.installed-test $(TIMM_VENV)/.installed-timm
	PATH="$(abspath $(VENV))/bin:$$PATH" MEGAVIT_TIMM_PYTHON="$(abspath $(TIMM_VENV))/bin/python" \
		$(PY) -m pytest -q -n 2 --dist loadfile $(HEAVY_TESTS) tests

# timm needs torchvision, which only loads beside torch 2.14.1 here (a 5.5 GB CUDA build
# that also runs on CPU; ~70 s to install): a separate venv, so the main one stays small.
# The timm export/import tests run their timm half in it (tests/timm_side.py), and
# `make bench-timm` compares step times with timm's ViT; benchmarks/attention_variants.py
# uses segment-anything's ViTDet blocks from it as a peer.
$(TIMM_VENV)/.installed-timm: setup.cfg
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(TIMM_VENV)/bin/python -m pip install --quiet timm==1.0.31 segment-anything==1.0 -e ".[hf]"
	touch $@

bench-timm: $(TIMM_VENV)/.installed-timm
	$(TIMM_VENV)/bin/python benchmarks/step_vs_timm.py

clean:
	rm -rf $(VENV) $(TIMM_VENV) runs
