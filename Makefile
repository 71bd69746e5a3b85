# Two entry points (see README): `make demo` runs the main job on the generated demo data,
# `make test` runs the test suite. Both install what they need first.
PYTHON ?= python3
export PYTHONHASHSEED ?= 0

.PHONY: install demo test benchmarks

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) -m qgssl_monai.cli demo-job --out runs/demo

test: install
	$(PYTHON) -m pytest -q tests
