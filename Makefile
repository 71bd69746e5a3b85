# Two entry points (see README): `make demo` runs the main job on the generated demo data,
# `make test` runs the whole test suite. Both install what they need first.
#
# Which Python: `make PYTHON=/path/to/python ...` when given; else the active virtualenv's python3 (CI:
# .ci/run creates and activates a fresh one); else a project venv `.venv`, created on first use, so that
# nothing is installed into the system Python.
VENV ?= .venv
LABEL_VENV ?= .venv-label
export PYTHONHASHSEED ?= 0

ifeq ($(origin PYTHON),undefined)
IN_VENV := $(shell python3 -c 'import sys; print(int(sys.prefix != sys.base_prefix))' 2>/dev/null)
ifeq ($(IN_VENV),1)
PYTHON := $(shell python3 -c 'import sys; print(sys.executable)')
else
PYTHON := $(abspath $(VENV))/bin/python
# only this interpreter is made by make (a PYTHON given by name, e.g. python3, is not a file here)
MAKE_VENV := $(PYTHON)
endif
endif

.PHONY: install install-label demo test

$(abspath $(VENV))/bin/python:
	python3 -m venv $(VENV)
	@echo "created $(VENV); activate it with: source $(VENV)/bin/activate"

install: $(MAKE_VENV)
	@echo "installing into $$($(PYTHON) -c 'import sys; print(sys.prefix)')"
	PYTHON=$(PYTHON) bash scripts/install.sh

# MONAI Label lives in its own venv (numpy<2 pins); it reuses the core environment's packages.
install-label: install
	PYTHON=$(PYTHON) LABEL_VENV=$(LABEL_VENV) bash scripts/install_label.sh

demo: install
	$(PYTHON) -m qgssl_monai.cli demo-job --out runs/demo

# core suite in the main environment, then the real MONAI Label server tests in the label venv
# (monailabel is imported first: there the server tests must run, not skip)
test: install install-label
	$(PYTHON) -m pytest -q tests
	$(LABEL_VENV)/bin/python -c "import monailabel"
	$(LABEL_VENV)/bin/python -m pytest -q tests/test_label_server.py tests/test_import_sweep.py::test_quality_checker_app_imports
