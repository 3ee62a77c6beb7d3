import os
import zlib

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter; it must be
# chosen before triton is imported (by mmkernels). With a GPU they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core) each worker gets an equal
# share of the cores: oversubscribed OpenMP threads make small ops 10-100x slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
from hypothesis import HealthCheck, settings  # noqa: E402

# Fuzzing profiles (tests/fuzz/). "ci" is the default and keeps the whole fuzz suite
# within a few minutes on a slow 2-core machine; "long" runs deeper
# (MMKERNELS_FUZZ_PROFILE=long, or `make fuzz-long`). No deadline: the Triton
# interpreter's first launch of a shape compiles, and a slow machine must not flake.
# Each fuzz test sets its own max_examples relative to these via fuzz_examples().
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "long", max_examples=500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("MMKERNELS_FUZZ_PROFILE", "ci"))


def pytest_sessionstart(session):
    """`make asan` must test the sanitized build, never silently the normal one."""
    if os.environ.get("MMKERNELS_EXPECT_ASAN") != "1":
        return
    import mmkernels._C as ext

    with open("/proc/self/maps") as f:
        maps = f.read()
    if "asan" not in os.path.dirname(ext.__file__) or "libasan" not in maps:
        raise pytest.UsageError(
            f"MMKERNELS_EXPECT_ASAN=1 but mmkernels._C is {ext.__file__} and libasan is "
            f"{'loaded' if 'libasan' in maps else 'not loaded'}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible: the seed derives from the test id
    (or MMKERNELS_TEST_SEED) and is printed on failure."""
    base = int(os.environ.get("MMKERNELS_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test, restored after."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section(call.when, "seed", f"torch.manual_seed({value})")
