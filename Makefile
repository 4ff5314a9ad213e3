# Everything a fresh machine needs is installed from here: `make train` and `make test` work on a new
# CPU machine with Python 3.11. torch goes in first (its CPU build), the pinned rest after it, with a
# constraint that keeps pip from swapping torch for a CUDA build.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
SYNTH   ?= artifacts/synthetic
CONFIG  ?= configs/tiny.yaml
PYTEST_ARGS ?=

export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_BUILD_OPS := 0

.PHONY: install train eval h200 lint test test-slow test-all data clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -c constraints.txt -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the synthetic edit set: 10,000 training samples, 200 for validation (tuning) and 400 for the sealed test split
data: $(STAMP)
	$(PYTHON) -m data.synthetic --out $(SYNTH) --workers 2 --if-absent

train: data
	$(PYTHON) -m launch.train --config $(CONFIG) $(ARGS)

# held-out edits of the `make train` run on the sealed test split (SPLIT=val: the validation split, for
# tuning): success per task beside every row that needs no model (do-nothing, paint bucket, copy-the-
# reference, noise) and the oracle, and the criteria the edits failed
SPLIT ?= test
eval: $(STAMP)
	$(PYTHON) -m launch.eval --checkpoint runs/tiny/checkpoints --data '$(SYNTH)/$(SPLIT)-{000000..000000}.tar' \
	    --out runs/tiny/eval-$(SPLIT) --limit 400 --steps 20

# The one-H200 recipe in one command: render the GPU's edit set (120,000 training samples, in parallel), pretrain a
# base on the GPU at 128 px (configs/base_mid.yaml), fine-tune configs/mid.yaml's editor on it, and score the sealed
# test split beside every row that needs no model
h200: $(STAMP)
	$(PYTHON) bench/miniature.py --base-config configs/base_mid.yaml --base runs/h200/base \
	    --edit-config configs/mid.yaml --device cuda --out runs/h200 --data artifacts/synthetic-120k \
	    --train-samples 120000 --eval-limit 400 --eval-batch-size 200 $(ARGS)

# ruff: lint (pycodestyle, pyflakes, import order, bugbear) and the formatter's check, line length 120
lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The tests marked slow (4-rank resume, ep_size 4 export, real-model resume, learnability, the ZeRO matrices
# at ep_size 2 and 4 x dp 2, the miniature pipeline base -> CARE-Edit -> eval): ~15 min on 2 cores.
test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs artifacts .pytest_cache
