"""pytest-benchmark over every case x provider x mode of the suites in
mmkernels.bench (one op family per suite), on the default device: the same case
definitions as ``python -m mmkernels.bench``, none written twice.

    pytest bench --benchmark-only --benchmark-group-by=param:case,param:mode
    pytest bench --benchmark-only -k roi_align          # one family
    MMKERNELS_BENCH_LEVEL=full pytest bench --benchmark-only   # quick | default | full

``make bench-pytest`` saves the JSON (--benchmark-json). The correctness gate, the
ratio tables with the issues' targets, the scaling fits and the charts come from
``python -m mmkernels.bench``.
"""

import os

import pytest
import torch

from mmkernels.bench import harness, suites

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LEVEL = os.environ.get("MMKERNELS_BENCH_LEVEL", "default")
SUITES = {name: suites.get(name, DEVICE, LEVEL) for name in suites.names()}
PARAMS = [pytest.param(name, c.name, p, m, id=f"{name}-{c.name}-{p}-{m}".replace(" ", "_"))
          for name, s in SUITES.items() for c in s.cases
          for m in c.modes for p in c.providers if c.runs(p, m)]


@pytest.mark.parametrize("suite,case,provider,mode", PARAMS)
def test_suite(benchmark, suite, case, provider, mode):
    c = SUITES[suite].case(case)
    fn = harness.mode_fn(c.make_inputs, c.providers[provider], mode)
    policy = harness.POLICIES[LEVEL]
    rounds = min(c.repeats or policy.max_repeats, policy.max_repeats)
    warmup = policy.warmup if c.warmup is None else c.warmup
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)
    else:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup)
