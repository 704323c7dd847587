# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse $(VENV), install the
# pinned stack (tools/setup_env.sh) and build mmdcnv4 in place.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-seg test test-all gpu-check clean

setup:
	@bash tools/setup_env.sh $(VENV)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -m "not cuda" $(PYTEST_ARGS) tests

# Everything, the cuda-marked tests included (needs a GPU).
test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf build mmdcnv4/_C*.so
