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
# test workers (pytest-xdist): one per core; each gets its share of torch's threads
TEST_WORKERS ?= auto

.PHONY: install deps build test bench bench-pytest report kernel-report audit clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Python dependencies (torch first: the extension builds against it, without isolation).
$(VENV)/.stamp-deps: pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH_SPEC) "setuptools>=64" wheel ninja
	$(PIP) install --quiet pytest pytest-xdist pytest-benchmark open-clip-torch expecttest numpy \
		hypothesis "transformers==5.24.0" matplotlib tqdm
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
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The main job (< 5 minutes on a 2-core CPU); BENCH_ARGS="--quick" (smoke), "--full"
# (deep sweeps), "--op contrastive", ...
BENCH_ARGS ?=
bench: install
	$(PY) -m mmkernels.bench $(BENCH_ARGS)

bench-pytest: install
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,rounds \
		--benchmark-json=bench/results/pytest-benchmark.json

kernel-report: install
	$(PY) -m mmkernels.tools.kernel_report

report: kernel-report

# FLOP/traffic audit: every Triton kernel in the interpreter with its production tiles;
# prints the table and marks the budgets exceeded (AUDIT_ARGS=--check exits 1 on them,
# AUDIT_ARGS="--json audit.json" also writes JSON).
AUDIT_ARGS ?=
audit: install
	TRITON_INTERPRET=1 $(PY) -m mmkernels.tools.kernel_audit $(AUDIT_ARGS)

clean:
	rm -rf build mmkernels/_C*.so *.egg-info $(VENV)/.stamp-install

# AddressSanitizer + UndefinedBehaviorSanitizer: a CPU-only build of the extension
# instrumented with both (in build/asan, never replacing the normal build), then the
# C++ op tests and the fuzz suite against it. Any report fails the run
# (halt_on_error; leak checking is off: CPython and torch keep their allocations).
ASAN_ROOT := build/asan/root
ASAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g
# Every op test file, and the fuzz suites of the ops with C++ kernels (the attention
# ops' only C++ is the CPU dropout-mask op, which their test files cover); the Triton
# (interpreter) cases run no C++ of ours, so they are left out.
ASAN_TESTS ?= tests/test_roi_align.py tests/test_token_gather.py tests/test_contrastive.py \
	tests/test_varlen_attention.py tests/test_co_attention.py \
	tests/fuzz/test_fuzz_roi_align.py tests/fuzz/test_fuzz_token_gather.py \
	tests/fuzz/test_fuzz_contrastive.py
ASAN_SELECT ?= not slow and not triton
.PHONY: asan asan-build fuzz-long

asan-build: $(VENV)/.stamp-deps
	MMKERNELS_SKIP_CUDA=1 MMKERNELS_EXTRA_CFLAGS="$(ASAN_FLAGS)" $(PY) setup.py --quiet build_ext \
		--build-temp build/asan/temp --build-lib build/asan/lib
	rm -rf $(ASAN_ROOT) && mkdir -p $(ASAN_ROOT)
	cp -r mmkernels $(ASAN_ROOT)/ && rm -f $(ASAN_ROOT)/mmkernels/_C*.so
	cp build/asan/lib/mmkernels/_C*.so $(ASAN_ROOT)/mmkernels/

asan: asan-build
	rm -f build/asan/report.*
	PYTHONPATH=$(ASAN_ROOT) \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:halt_on_error=1:abort_on_error=1:log_path=$(CURDIR)/build/asan/report \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(CURDIR)/build/asan/report \
	MMKERNELS_EXPECT_ASAN=1 \
	$(PY) -P -m pytest -q -p no:cacheprovider -k "$(ASAN_SELECT)" $(ASAN_TESTS) $(PYTEST_ARGS) \
	|| { cat build/asan/report.* 2>/dev/null | head -80; echo "make asan: FAILED"; exit 1; }
	@if ls build/asan/report.* >/dev/null 2>&1; then cat build/asan/report.*; echo "make asan: sanitizer reports"; exit 1; fi
	@echo "make asan: zero sanitizer reports"

# The fuzz suite with the deep hypothesis profile.
fuzz-long: install
	MMKERNELS_FUZZ_PROFILE=long $(PY) -m pytest -q tests/fuzz $(PYTEST_ARGS)
