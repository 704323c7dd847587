# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse $(VENV), install the
# pinned stack (tools/setup_env.sh) and build mmdcnv4 in place.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-seg test test-all gpu-check clean

setup:
	@bash tools/setup_env.sh $(VENV)

# The main job on the embedded default: synthetic COCO-format data, Mask R-CNN with a small
# FlashInternImage trained from scratch by tools/train.py, COCO evaluation, one visualised image.
demo: setup
	$(PY) tools/demo.py

# The segmentation counterpart: synthetic ADE20K-format data, UperNet, mIoU, one coloured mask.
demo-seg: setup
	$(PY) tools/demo_seg.py

test: setup
	$(PY) -m pytest -m "not cuda" $(PYTEST_ARGS) tests

# Everything, the cuda-marked tests included (needs a GPU).
test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf build mmdcnv4/_C*.so
