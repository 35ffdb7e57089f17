# The newcomer's path: `make demo` (set up + the whole pipeline on generated data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# detectron2, the detection engine, is built from upstream at a pinned commit after the toolkit
# (any pip requirement works: a clone, a `git archive` of that commit). Where it cannot be
# installed the set-up says so and goes on with the torchvision backend, unless
# REQUIRE_DETECTRON2=1 — then the set-up fails, and so does every test that needs detectron2.
DETECTRON2 ?= git+https://github.com/facebookresearch/detectron2@02b5c4e295e990042a714712c21dc79b731e8833
REQUIRE_DETECTRON2 ?=
export REQUIRE_DETECTRON2

.PHONY: setup detectron2 demo test test-fast bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	# grad-cam pulls opencv-python-headless; the contrib build (same cv2 module, plus
	# cv2.saliency, the reference of the saliency tests) must be the one that is imported.
	$(PY) -m pip install --force-reinstall --no-deps "opencv-contrib-python-headless>=4.8"
	$(PY) -c "import cv2; assert hasattr(cv2, 'saliency'), 'cv2.saliency missing'"
	touch $@

# --no-build-isolation: detectron2 compiles against the torch already in the venv (and builds its
# CUDA ops where nvcc is present); that needs setuptools and wheel in the venv itself.
$(VENV)/.detectron2: $(VENV)/.installed
	@echo "installing detectron2 from $(DETECTRON2) (builds its C++ ops: minutes; log: $(VENV)/detectron2-install.log)"
	@if $(PY) -m pip install "setuptools>=64" wheel > $(VENV)/detectron2-install.log 2>&1 && \
	    $(PY) -m pip install --no-build-isolation "$(DETECTRON2)" >> $(VENV)/detectron2-install.log 2>&1 && \
	    $(PY) -c "import detectron2" >> $(VENV)/detectron2-install.log 2>&1; then \
	    echo "detectron2 installed: transfer and the demo use it"; \
	elif [ "$(REQUIRE_DETECTRON2)" = 1 ]; then \
	    tail -n 20 $(VENV)/detectron2-install.log; \
	    echo "error: detectron2 could not be installed from $(DETECTRON2) and REQUIRE_DETECTRON2=1" >&2; \
	    exit 1; \
	else \
	    echo "detectron2 could not be installed from $(DETECTRON2) (see $(VENV)/detectron2-install.log); going on with the torchvision backend ('make detectron2' retries)"; \
	fi
	@touch $@

setup: $(VENV)/.detectron2

# retry the detectron2 step (e.g. once the network is back, or with DETECTRON2=path/to/clone)
detectron2: $(VENV)/.installed
	rm -f $(VENV)/.detectron2
	$(MAKE) --no-print-directory $(VENV)/.detectron2

demo: setup
	$(VENV)/bin/smix demo --out demo_out

# pytest exits 5 when it collects nothing; that is not a failure of the set-up.
test: setup
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not dist"

bench: setup
	for b in benchmarks/*.py; do echo "# $$b"; PYTHONPATH=. $(PY) $$b || exit 1; done  # benchmarks import each other
