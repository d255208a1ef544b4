# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.drpo-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo demo-hue test install sysdeps clean protos

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

# The shapes world: align the committed pretrained toy base with the GenEval reward, then score base and final
# policy on held-out prompts × held-out seeds (GenEval per task) and print the paired, prompt-clustered gains.
# One process (--local): on the shared 2-core machine it ran several times faster than the Ray actors
# (`make demo-hue` and the test suite exercise the Ray runtime).
DEMO_SEEDS ?= 0-7
demo: install
	$(VENV)/bin/drpo train --local --config deploy/configs/toy.yaml --output-dir $(RUN_DIR)
	$(VENV)/bin/drpo eval --config deploy/configs/toy.yaml --base --seeds $(DEMO_SEEDS) --output-dir $(RUN_DIR)/eval-base
	$(VENV)/bin/drpo eval --config deploy/configs/toy.yaml --checkpoint $(RUN_DIR) --seeds $(DEMO_SEEDS) --output-dir $(RUN_DIR)/eval-final
	$(VENV)/bin/drpo eval compare $(RUN_DIR)/eval-base/eval.json $(RUN_DIR)/eval-final/eval.json --json $(RUN_DIR)/compare.json

# The previous default: a random-initialised tiny model and the hue-fraction reward.
demo-hue: install
	$(VENV)/bin/drpo train --config deploy/configs/tiny.yaml --output-dir $(RUN_DIR)

test: install
	$(PY) -m pytest -q tests

# Regenerate the committed gRPC stubs of the reward service (same command as in the .proto header).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. services/grpc_reward/reward.proto

clean:
	rm -rf runs .cache .pytest_cache
