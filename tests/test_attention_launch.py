"""Host side of the attention launches: the autotune space (every entry in the static
kernel report, both specialisations), the autotuner's construction and key, and the
single fixed config under the interpreter. The autotuned launches themselves run only
on a GPU (tests/test_varlen_attention_cuda.py)."""

import types

import pytest
import torch

from mmkernels.triton import attention_launch as al
from mmkernels.triton import co_attention as tco
from mmkernels.triton import interpreting, production_tiles
from mmkernels.triton import varlen_attention as tva


def _tags(specs, name):
    return [s.config for s in specs if s.name == name]


@pytest.mark.parametrize("module, kernels", [
    (tva, {"fwd": "_varlen_attn_fwd_kernel", "bwd": "_varlen_attn_bwd_dkdv_kernel",
           "dkdv": "_varlen_attn_bwd_dkdv_kernel", "dq": "_varlen_attn_bwd_dq_kernel"}),
    (tco, {"fwd": "_co_attn_fwd_kernel", "bwd": "_co_attn_bwd_dkdv_kernel",
           "dkdv": "_co_attn_bwd_dkdv_kernel", "dq": "_co_attn_bwd_dq_kernel"}),
], ids=["varlen", "co-attention"])
def test_kernel_report_covers_the_autotune_space(module, kernels):
    """Every config a launch may choose (CONFIGS per kind and padded D) is compiled by
    the kernel report in its lightest and heaviest specialisations (and, for the
    varlen dK/dV kernel, with the float32 partials of a head split)."""
    specs = module.kernel_specs()
    for kind, table in module.CONFIGS.items():
        for d in (d for d in table if module is tva or d <= 128):
            tags = _tags(specs, kernels[kind])
            for cfg in table[d]:
                one_pass = " one-pass" if kind == "bwd" else ""
                mine = [t for t in tags if f" D{d} {cfg}" in t
                        and ((" one-pass" in t) == (kind == "bwd"))]
                heavy = "+dropout" + one_pass
                assert any(t.startswith("full" + one_pass) for t in mine), (kind, d, cfg)
                assert any(heavy in t for t in mine), (kind, d, cfg)
                if module is tva:
                    assert any(t.startswith("causal+blocks+window+softcap") for t in mine)
                    if kind in ("bwd", "dkdv"):
                        assert any(" split" in t and "causal+blocks" in t for t in mine)
                        assert any(" split" in t and t.startswith("full" + one_pass + " split")
                                   for t in mine)


def test_one_fixed_config_under_the_interpreter(monkeypatch):
    if not interpreting():
        pytest.skip("interpreter only")
    assert not al.autotuning()
    assert tva.launch_configs("fwd", 64, al.autotuning()) == [tva.INTERPRET_CONFIG]
    with production_tiles():
        assert tva.launch_configs("fwd", 128, al.autotuning()) == [tva.CONFIGS["fwd"][128][0]]


def test_autotuning_switches(monkeypatch):
    monkeypatch.setattr(al, "interpreting", lambda: False)
    monkeypatch.delenv("MMKERNELS_AUTOTUNE", raising=False)
    assert al.autotuning()
    monkeypatch.setenv("MMKERNELS_AUTOTUNE", "0")
    assert not al.autotuning()
    monkeypatch.delenv("MMKERNELS_AUTOTUNE")
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not al.autotuning()  # a timing-dependent choice would change the bits
    finally:
        torch.use_deterministic_algorithms(old)


def test_seqlen_bucket():
    assert [al.seqlen_bucket(n) for n in (0, 1, 256, 257, 4096, 5000, 10 ** 6)] == [
        256, 256, 256, 512, 4096, 8192, 16384]


def test_autotuner_key_configs_and_reset(monkeypatch):
    """launch_attention with several configs builds one triton Autotuner per (kernel,
    kind, compute capability, padded D, max_seqlen bucket), over the configs in order,
    keyed by CAUSAL/HAS_BLOCKS, zeroing the atomically accumulated buffers; the grid
    follows the chosen tiles."""
    import triton

    built, launched = [], []

    class FakeTuner:
        def __init__(self, configs, key, reset_to_zero):
            self.configs, self.key, self.reset = configs, key, reset_to_zero
            built.append(self)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                c = self.configs[-1]
                launched.append((grid({"BLOCK_M": c.kwargs["BLOCK_M"],
                                       "BLOCK_N": c.kwargs["BLOCK_N"]}), args, kwargs))
            return run

    def fake_autotune(configs, key, reset_to_zero=None):
        return lambda kernel: FakeTuner(configs, key, reset_to_zero)

    monkeypatch.setattr(triton, "autotune", fake_autotune)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    al.reset_autotune()
    kernel = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="k"))
    configs = [al.AttnConfig(128, 64, 8, 3), al.AttnConfig(64, 32, 4, 2)]
    for max_seqlen in (1000, 900, 5000):
        al.launch_attention(kernel, "bwd", 128, configs, lambda m, n: (100 // n, 2, 3), (1, 2),
                            dict(CAUSAL=True, BLOCK_D=128), torch.device("cuda", 0),
                            max_seqlen, reset_to_zero=("dq_acc_ptr",))
    assert len(built) == 2  # buckets 1024 (twice) and 8192
    t = built[0]
    assert t.key == ["CAUSAL", "HAS_BLOCKS"] and t.reset == ["dq_acc_ptr"]
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in t.configs] == [
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3), ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2)]
    assert launched[0] == ((3, 2, 3), (1, 2), dict(CAUSAL=True, BLOCK_D=128))
    assert sorted(al._TUNERS) == [("k", "bwd", (9, 0), 128, 1024), ("k", "bwd", (9, 0), 128, 8192)]
    al.reset_autotune()


def test_head_chunks_per_kernel():
    """Head dims in (64, 96]: the forward in 64 + 16 (D <= 80) or 64 + 32 lanes, the
    one-pass backward always in 64 + 32 (a 16-lane chunk spills there), the
    deterministic backward padded to 128; other head dims pad to a power of two. Each
    launcher's bucket has configs in its table."""
    hc = al.head_chunks
    assert [hc(d) for d in (48, 64, 72, 80, 88, 96, 128, 200)] == [
        (64, 0), (64, 0), (64, 16), (64, 16), (64, 32), (64, 32), (128, 0), (256, 0)]
    assert [hc(d, backward=True) for d in (64, 72, 80, 96, 128)] == [
        (64, 0), (64, 32), (64, 32), (64, 32), (128, 0)]
    assert [hc(d, backward=True, deterministic=True) for d in (64, 72, 80, 96, 256)] == [
        (64, 0), (128, 0), (128, 0), (128, 0), (256, 0)]
    for d in range(1, 257):
        assert sum(hc(d)) in tva.CONFIGS["fwd"] or d < 64
        assert max(sum(hc(d, backward=True)), 64) in tva.CONFIGS["bwd"]
        for kind in ("dkdv", "dq"):
            assert max(sum(hc(d, True, True)), 64) in tva.CONFIGS[kind]
            assert max(sum(hc(d, True, True)), 64) in tco.CONFIGS[kind] or d > 128
