# The README's two commands: `make bench` (the main job) and `make test`.
# Both install first; installing is idempotent and fast when already done
# (a stamp for the Python dependencies, ninja for an incremental extension build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MAX_JOBS ?= 2
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install deps build test bench bench-pytest report kernel-report clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Python dependencies (torch first: the extension builds against it, without isolation).
$(VENV)/.stamp-deps: pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH_SPEC) "setuptools>=64" wheel ninja
	$(PIP) install --quiet pytest pytest-benchmark open-clip-torch expecttest numpy hypothesis
	touch $@

# The package itself, editable, built against the installed torch.
$(VENV)/.stamp-install: $(VENV)/.stamp-deps setup.py
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

deps: $(VENV)/.stamp-deps

# Incremental rebuild of mmkernels._C after source edits (ninja: a no-op when current).
build: $(VENV)/.stamp-install
	$(PY) setup.py --quiet build_ext --inplace

install: build

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m mmkernels.bench

bench-pytest: install
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,rounds

kernel-report: install
	$(PY) -m mmkernels.tools.kernel_report

report: kernel-report

clean:
	rm -rf build mmkernels/_C*.so *.egg-info $(VENV)/.stamp-install
