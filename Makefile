# The newcomer's path: `make demo` (set up + the whole pipeline on generated data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	# grad-cam pulls opencv-python-headless; the contrib build (same cv2 module, plus
	# cv2.saliency, the reference of the saliency tests) must be the one that is imported.
	$(PY) -m pip install --force-reinstall --no-deps "opencv-contrib-python-headless>=4.8"
	$(PY) -c "import cv2; assert hasattr(cv2, 'saliency'), 'cv2.saliency missing'"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/smix demo --out demo_out

# pytest exits 5 when it collects nothing; that is not a failure of the set-up.
test: setup
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not dist"

bench: setup
	for b in benchmarks/*.py; do echo "# $$b"; $(PY) $$b || exit 1; done
