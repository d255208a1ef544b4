# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.drpo-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
# Pin it once: `?=` alone re-runs `date` at every use, and a recipe expanded across a second boundary would
# split the run over two folders.
RUN_DIR := $(RUN_DIR)

.PHONY: demo demo-local demo-toy demo-hue test install sysdeps clean protos smoke-real gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision first and pinned, so that no later package pulls another torch.
$(STAMP): requirements.txt constraints.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

install: $(STAMP) sysdeps

# Debian packages the test-suite needs (a real Prometheus for the dashboard/metrics checks).
sysdeps:
	@command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

# The embedded default: the shapes world (docs/toyworld.md). The committed pretrained toy base (a one-step
# SD-Turbo-architecture generator of coloured shapes) aligned with DrPO on the GenEval reward over the classical
# detector, through the Ray actor-learner runtime on an embedded local cluster (generator, reward and learner
# actors; sampling of step t+1 overlaps the update of step t), then base and final policy scored on held-out
# prompts x held-out seeds (GenEval per task, in GenEval's sample layout) and the paired, prompt-clustered gains
# printed at a glance by `drpo eval summary` (base -> final per task, gain +- s.e. and z, the wall time from
# RUN_DIR/.started, where the outputs are; docs/demo.md). `make demo-local` runs the same job in one process.
# One thread per process unless OMP_NUM_THREADS says otherwise: on a busy 2-core box two OpenMP threads ran these
# small models ~20x slower. Live metrics: the driver's /metrics on a free port, the actors' on Ray's export.
DEMO_SEEDS ?= 0-63
DEMO_RUNTIME ?=
DEMO_METRICS_PORT ?= $(shell $(PYTHON) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
demo: install
	mkdir -p $(RUN_DIR) && date +%s > $(RUN_DIR)/.started
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/drpo train $(DEMO_RUNTIME) --config deploy/configs/toy.yaml --output-dir $(RUN_DIR) $(if $(DEMO_RUNTIME),,--set runtime.metrics_port=$(DEMO_METRICS_PORT))
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/drpo eval --config deploy/configs/toy.yaml --base --seeds $(DEMO_SEEDS) --output-dir $(RUN_DIR)/eval-base
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/drpo eval --config deploy/configs/toy.yaml --checkpoint $(RUN_DIR) --seeds $(DEMO_SEEDS) --output-dir $(RUN_DIR)/eval-final
	$(VENV)/bin/drpo eval compare $(RUN_DIR)/eval-base/eval.json $(RUN_DIR)/eval-final/eval.json --json $(RUN_DIR)/compare.json >/dev/null
	@echo
	@$(VENV)/bin/drpo eval summary $(RUN_DIR)

# The same job in one process (no Ray): for debugging.
demo-local:
	$(MAKE) demo DEMO_RUNTIME=--local

demo-toy: demo

# The previous default: a random-initialised tiny SD-Turbo-architecture model aligned to the offline hue-fraction
# reward through the Ray runtime (an embedded local cluster); docs/hue-task.md.
demo-hue: install
	$(VENV)/bin/drpo train --config deploy/configs/tiny.yaml --output-dir $(RUN_DIR)

test: install
	$(PY) -m pytest -q tests

# One full DrPO update of the SD-Turbo recipe on the real SD-Turbo architecture (random weights, built
# offline once into ~/.cache/drpo/smoke-real), on CPU; prints time and peak RSS per stage (docs/models.md).
smoke-real: install
	OMP_NUM_THREADS=2 $(PY) benchmarks/smoke_real.py

# Every figure that needs a GPU, in one run on one 80 GB GPU (under 8 minutes): the SD-Turbo preset's update per
# micro-batch, candidates/s, DrPO vs DRaFT at matched batch, weight publish; one JSON report in $OUT (default
# runs/gpu-check). On the lent GPU machine (no venv, no network) run the command of docs/models.md "GPU check".
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out $${OUT:-runs/gpu-check}

# Regenerate the committed gRPC stubs of the reward service (same command as in the .proto header).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. services/rewards/grpc_reward/reward.proto

clean:
	rm -rf runs .cache .pytest_cache
