# comfy-service: `make run` starts the service locally, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=
CHAOS_ARGS ?=

.PHONY: install run sim test bench chaos clean setup images

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) -m deploy.devstack

sim: $(STAMP)
	$(PY) -m comfyui_sim --port $${COMFYUI_SIM_PORT:-8188}

# What the tests need beyond Python (Redis, nginx, Prometheus, Alertmanager; podman for the
# built-fleet test): installed by deploy/setup-host.sh as root with apt, else it names the command.
setup:
	bash deploy/setup-host.sh

test: setup $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Every image the project owns (API, worker: also the simulator, Flower, webhooks and alert
# receiver): docker, else podman. OFFLINE=1: base images from Debian's archive (docs/deploy.md).
# COMFYUI=1 also builds deploy/comfyui (needs the CUDA base image and GitHub).
images:
	bash deploy/images/build.sh $(if $(OFFLINE),--offline) $(if $(COMFYUI),--comfyui)

# The benchmark suite (bench/README.md): a few minutes; writes bench/results.json and docs/performance.md.
# `make bench COMFYUI_URL=http://host:port` also runs overhead and idle against that real ComfyUI. Only a
# COMFYUI_URL given on make's command line counts: one exported for `make run`'s workers does not.
bench: $(STAMP)
	$(PY) -m bench $(if $(filter command line,$(origin COMFYUI_URL)),--comfyui-url $(COMFYUI_URL)) $(BENCH_ARGS)

# The long chaos run (issue 14; bench/chaos.py): 1,000 jobs, 8 GPUs, every fault; writes bench/chaos.json and
# its section of docs/performance.md. CHAOS_ARGS=--quick: 300 jobs on 4 GPUs.
chaos: $(STAMP)
	$(PY) -m bench.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
