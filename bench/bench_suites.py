"""pytest-benchmark over every case x provider x mode of the suites in
mmkernels.bench (one op family per suite), on the default device.

    pytest bench --benchmark-only --benchmark-group-by=param:case,param:mode
    pytest bench --benchmark-only -k roi_align          # one family

The ratio table with the issues' targets is printed by ``python -m mmkernels.bench``.
The contrastive suite's largest case takes minutes per call on a CPU; deselect it with
``-k "not huge"``.
"""

import pytest
import torch

from mmkernels.bench import harness, suites

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAMS = [pytest.param(name, c.name, p, m, id=f"{name}-{c.name}-{p}-{m}")
          for name in suites.names() for c in suites.get(name, DEVICE).cases
          for p in c.providers for m in c.modes]


@pytest.mark.parametrize("suite,case,provider,mode", PARAMS)
def test_suite(benchmark, suite, case, provider, mode):
    c = suites.get(suite, DEVICE).case(case)
    fn = harness.mode_fn(c.make_inputs, c.providers[provider], mode)
    rounds = c.repeats or (20 if DEVICE.type == "cuda" else 10)
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0 if c.warmup == 0 else 1)
