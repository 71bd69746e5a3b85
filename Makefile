# Two entry points (see README): `make demo` runs the main job on the generated demo data,
# `make test` runs the whole test suite. Both install what they need first.
PYTHON ?= python3
LABEL_VENV ?= .venv-label
export PYTHONHASHSEED ?= 0

.PHONY: install install-label demo test

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

# MONAI Label lives in its own venv (numpy<2 pins); it reuses the core environment's packages.
install-label: install
	PYTHON=$(PYTHON) LABEL_VENV=$(LABEL_VENV) bash scripts/install_label.sh

demo: install
	$(PYTHON) -m qgssl_monai.cli demo-job --out runs/demo

# core suite in the main environment, then the real MONAI Label server tests in the label venv
test: install install-label
	$(PYTHON) -m pytest -q tests
	$(LABEL_VENV)/bin/python -m pytest -q tests/test_label_server.py
