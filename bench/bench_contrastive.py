"""pytest-benchmark suite for the contrastive losses: every case x provider x mode of
mmkernels.bench.contrastive, on the default device. Compare providers with
``pytest bench/bench_contrastive.py --benchmark-only --benchmark-group-by=param:case,param:mode``.
The ratio table with the issue's targets is printed by ``python -m mmkernels.bench``."""

import pytest
import torch

from mmkernels.bench import harness, suites

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE = suites.get("contrastive", DEVICE)
PARAMS = [pytest.param(c.name, p, m, id=f"{c.name}-{p}-{m}")
          for c in SUITE.cases for p in c.providers for m in c.modes]


@pytest.mark.parametrize("case,provider,mode", PARAMS)
def test_contrastive(benchmark, case, provider, mode):
    c = SUITE.case(case)
    fn = harness.mode_fn(c.make_inputs, c.providers[provider], mode)
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2)
