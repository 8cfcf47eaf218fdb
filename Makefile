# comfy-service: `make run` starts the service locally, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=
CHAOS_ARGS ?=

.PHONY: install run sim test bench chaos clean

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

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark suite (bench/README.md): a few minutes; writes bench/results.json and docs/performance.md.
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# The long chaos run (issue 14; bench/chaos.py): 1,000 jobs, 8 GPUs, every fault; writes bench/chaos.json and
# its section of docs/performance.md. CHAOS_ARGS=--quick: 300 jobs on 4 GPUs.
chaos: $(STAMP)
	$(PY) -m bench.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
