"""The FLOP/traffic audit (mmkernels.tools.kernel_audit): its counters are exact on a
hand-written kernel, the production tiles really run (and give the reference's
results), the minimum formulas and the ratio math, --check and the JSON output."""

import json
import math

import pytest
import torch
import triton
import triton.language as tl

import mmkernels
from mmkernels import reference
from mmkernels.ops import contrastive as cops
from mmkernels.testing import assert_close_to_reference
from mmkernels.tools import audit_counters as ac
from mmkernels.tools import kernel_audit as ka
from mmkernels.triton import co_attention as tco
from mmkernels.triton import interpreter_tiles, interpreting, production_tiles
from mmkernels.triton import varlen_attention as tva

pytestmark = pytest.mark.skipif(not interpreting(),
                                reason="the audit counts in Triton's interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _tiny_kernel(a_ptr, b_ptr, out_ptr, cnt_ptr, n, BLOCK: tl.constexpr):
    """One (BLOCK, BLOCK) dot, one batched (2, BLOCK, BLOCK) dot, a masked load of n
    lanes, an unmasked scalar load, a masked (n x n) store and an atomic add on n lanes."""
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    a = tl.load(a_ptr + tile)
    b = tl.load(b_ptr + tile)
    c = tl.dot(a, b)
    batch = tl.arange(0, 2)[:, None, None] * 0 + tile[None, :, :]
    c3 = tl.dot(tl.load(a_ptr + batch), tl.load(b_ptr + batch))
    ok = offs < n
    row = tl.load(a_ptr + offs, mask=ok, other=0.0)
    first = tl.load(b_ptr)
    c = c + tl.sum(c3, 0) + row[None, :] + first
    tl.store(out_ptr + tile, c, mask=ok[:, None] & ok[None, :])
    tl.atomic_add(cnt_ptr + offs, 1, mask=ok)


def test_triton_counter_is_exact():
    B, n = 16, 5
    a, b = torch.randn(B, B), torch.randn(B, B)
    out, cnt = torch.zeros(B, B), torch.zeros(B, dtype=torch.int32)
    with ac.measure() as counts:
        _tiny_kernel[(3,)](a, b, out, cnt, n, BLOCK=B)
    k = counts.kernels["_tiny_kernel"]
    assert (k.launches, k.programs, k.dots) == (1, 3, 6)
    assert k.mma_flops == 3 * (2 * B ** 3 + 2 * 2 * B ** 3)
    assert k.dot_shapes == {(B, B, B), (2, B, B, B)}
    per_program_loaded = 4 * (B * B * 2 + 2 * B * B * 2 + n + 1) + 4 * n  # + atomic reads
    per_program_stored = 4 * n * n + 4 * n  # + atomic writes
    assert k.bytes_loaded == 3 * per_program_loaded
    assert k.bytes_stored == 3 * per_program_stored
    assert k.atomic_bytes == 3 * 4 * n
    assert cnt[:n].tolist() == [3] * n  # the hooks leave the semantics alone
    assert counts.torch_ops == {} and counts.flops == k.mma_flops


@torch.library.custom_op("mmkernels_audit_test::gemm_sum", mutates_args=())
def _gemm_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b).sum(0)


@_gemm_sum.register_fake
def _(a, b):
    return a.new_empty(b.shape[1])


def test_torch_gemms_inside_custom_ops_are_counted():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with ac.measure(namespaces=("mmkernels_audit_test",)) as counts:
        _gemm_sum(a, b)
    assert counts.torch_flops == {"aten.mm": 2 * 8 * 16 * 4}
    # (inside a custom op the mode sees aten.matmul, which FlopCounterMode decomposes)
    calls, read, written = counts.torch_ops.get("aten.mm") or counts.torch_ops["aten.matmul"]
    assert (calls, read, written) == (1, 4 * (8 * 16 + 16 * 4), 4 * 8 * 4)
    assert counts.torch_ops["aten.sum"] == [1, 4 * 8 * 4, 4 * 4]
    with ac.measure() as opaque:  # the namespace not descended into: nothing inside seen
        _gemm_sum(a, b)
    assert opaque.flops == 0


def test_torch_byte_rules():
    x = torch.randn(4, 8)
    with ac.measure() as counts:
        y = x.t()  # a view: free
        torch.zeros(3, 5)  # a fill: written only
        x.expand(2, 4, 8).sum(0)  # the broadcast dim is read once
        y.contiguous()
        z = torch.empty(3)  # an allocation: free
        z.zero_()  # written only
        z.copy_(x[0, :3])  # the source read, the destination written
    ops = counts.torch_ops
    assert not {"aten.t", "aten.expand", "aten.empty", "aten.select", "aten.slice"} & set(ops)
    assert ops["aten.zeros"] == [1, 0, 60]
    assert ops["aten.zero_"] == [1, 0, 12]
    assert ops["aten.copy_"] == [1, 12, 12]
    assert ops["aten.sum"][1:] == [4 * 32, 4 * 32]
    assert ops["aten.clone"][1:] == [4 * 32, 4 * 32]


def test_production_tiles_switch():
    assert interpreter_tiles()
    with production_tiles():
        assert not interpreter_tiles()
        with production_tiles():
            assert not interpreter_tiles()
        assert not interpreter_tiles()
        assert tva.pick_config("fwd", 64) == tva.CONFIGS["fwd"][64][0]
        assert cops._config("weights", torch.float16) == cops.CONFIGS["weights"]["mma"][0]
    assert interpreter_tiles()
    assert tva.pick_config("fwd", 64) == tva.INTERPRET_CONFIG


def _dims(counts, kernel):
    return {s[-3:] for s in counts.kernels[kernel].dot_shapes}


def test_audit_counts_the_production_tiles():
    """The counted dot shapes are the production configs' tiles (the interpreter's
    16 x 16 tiles outside production_tiles())."""
    with production_tiles():
        f, b = ka.run_varlen("t", [130], 1, 64)
        fwd, bwd = (tva.pick_config(kind, 64) for kind in ("fwd", "bwd"))
        cf, cb = cops._config("fwd", torch.float16), cops._config("weights", torch.float16)
        info = ka.run_contrastive("info_nce", 130, 128)
        co_bwd = ka.run_co_attention("t", [130], [40], 1, 64)[1]
        co_cfg = tco._pick("bwd", 64)
    assert (fwd.block_m, fwd.block_n, 64) in _dims(f.counts, "_varlen_attn_fwd_kernel")
    # the one-pass backward: dK/dV (N x D x M) and the atomic dQ (M x D x N) in one kernel
    one_pass = _dims(b.counts, "_varlen_attn_bwd_dkdv_kernel")
    assert {(bwd.block_n, 64, bwd.block_m), (bwd.block_m, 64, bwd.block_n)} <= one_pass
    assert "_varlen_attn_bwd_dq_kernel" not in b.counts.kernels
    co_one_pass = _dims(co_bwd.counts, "_co_attn_bwd_dkdv_kernel")
    assert {(co_cfg.block_n, 64, co_cfg.block_m), (co_cfg.block_m, 64, co_cfg.block_n)} <= co_one_pass
    assert "_co_attn_bwd_dq_kernel" not in co_bwd.counts.kernels
    assert _dims(info[0].counts, "_contrastive_fwd_kernel") == {(cf.block_m, cf.block_n, cf.block_k)}
    assert _dims(info[1].counts, "_contrastive_weights_kernel") == {(cb.block_m, cb.block_n,
                                                                    cb.block_k)}
    small = ka.run_varlen("t", [40], 1, 64, backward=False)[0]
    t = tva.INTERPRET_CONFIG
    assert _dims(small.counts, "_varlen_attn_fwd_kernel") == {(t.block_m, t.block_n, 64),
                                                              (t.block_m, 64, t.block_n)}


def test_production_tiles_match_reference_attention():
    """The GPU tiles (ragged tails, padded head dims, GQA, image blocks, dropout) give
    the float64 reference's results under the interpreter."""
    from test_co_attention import run_and_compare as co_compare
    from test_varlen_attention import run_and_compare as varlen_compare

    lengths = [150, 70]
    bid = torch.zeros(220, dtype=torch.int32)
    bid[10:90] = 1
    bid[160:200] = 2
    with production_tiles():
        varlen_compare(lengths, lengths, H=4, H_kv=2, D=80, dtype=torch.float32, causal=True,
                       block_ids=bid)
        varlen_compare([140, 9], [33, 200], H=2, H_kv=2, D=64, dtype=torch.float16, causal=True)
        varlen_compare([70], [70], H=2, H_kv=1, D=32, dtype=torch.float32, dropout_p=0.2)
        co_compare([140, 20], [36, 0], H=2, D=64, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_production_tiles_match_reference_contrastive(dtype):
    B, D = 150, 100  # a tail row/column block; D takes the zero-padded path
    img, txt = (torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
                for _ in range(2))
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    for ours, ref, extra in ((mmkernels.info_nce, reference.info_nce, ()),
                             (mmkernels.sigmoid_contrastive, reference.sigmoid_contrastive, (bias,))):
        results = {}
        for name, fn, dt in (("ours", ours, dtype), ("ref", ref, torch.float64), ("eager", ref, dtype)):
            leaves = [t.to(dt, copy=True).requires_grad_() for t in (img, txt, scale, *extra)]
            if name == "ours":
                with production_tiles():
                    loss = fn(*leaves)
                    loss.backward()
            else:
                loss = fn(*leaves)
                loss.backward()
            results[name] = [loss.detach()] + [t.grad for t in leaves]
        eager = results["eager"] if dtype == torch.float16 else [None] * len(results["ref"])
        for got, want, e, what in zip(results["ours"], results["ref"], eager,
                                      ("loss", "d image", "d text", "d scale", "d bias")):
            assert_close_to_reference(got, want, eager_lowp=e, what=f"{fn.__name__} {what}")


def test_attention_pairs_and_minimum():
    assert ka.attention_pairs([5, 3], [5, 3], causal=False) == 25 + 9
    for lq, lk in ((7, 7), (9, 4), (4, 9)):
        want = int(reference.attention_visibility(lq, lk, True).sum())
        assert ka.attention_pairs([lq], [lk], causal=True) == want
    bid = torch.tensor([0, 1, 1, 1, 0, 2, 2], dtype=torch.int32)
    want = int(reference.attention_visibility(4, 4, True, bid[:4], bid[:4]).sum()
               + reference.attention_visibility(3, 3, True, bid[4:], bid[4:]).sum())
    assert ka.attention_pairs([4, 3], [4, 3], causal=True, block_ids=bid) == want
    # a dense forward: 4 * Lq * Lk * H * D; the backward: 2.5 times that
    assert ka.attention_min_flops(ka.attention_pairs([64], [32], False), 3, 80, "fwd") == 4 * 64 * 32 * 3 * 80
    assert ka.attention_min_flops(10, 2, 8, "bwd") == 2.5 * ka.attention_min_flops(10, 2, 8, "fwd")
    assert ka.contrastive_pass_flops(4, 3) == 2 * 16 * 3
    assert ka._tail_allowance([128, 256]) == 1.0
    assert ka._tail_allowance([100]) == (128 * 128) / (100 * 100)


def _fake_measurement(flops=200, min_flops=100, loaded=30, stored=20, torch_bytes=(5, 5)):
    k = ac.KernelCount("k", launches=1, programs=2, dots=1, mma_flops=flops,
                       bytes_loaded=loaded, bytes_stored=stored, dot_shapes={(16, 16, 16)})
    counts = ac.Counts({"k": k}, {"aten.mm": 50}, {"aten.mul": [1, *torch_bytes]})
    return ka.Measurement("op", "case", "fwd", counts, min_flops, io_bytes=25)


def test_ratio_math():
    m = _fake_measurement()
    assert m.flops == 250 and m.bytes == 60 and m.ratio == 2.5
    assert m.intensity == 250 / 60
    dev = {"flops_per_s": 100.0, "bytes_per_s": 10.0}
    assert m.roof_s(dev) == max(250 / 100, 60 / 10)
    assert m.floor_s(dev) == max(100 / 100, 25 / 10)
    assert math.isnan(ka.ratio(1, 0))
    assert ka.Check("d80_fwd", 1.3, 1.2).over and not ka.Check("d80_fwd", 1.2, 1.2).over
    assert ka.Check("d80_fwd", math.nan, 1.2).over


def _fake_result(over_enforced: bool):
    checks = [ka.Check("varlen_bwd_fwd_causal", 3.5 if over_enforced else 2.0, 2.5),
              ka.Check("demo_unenforced", 1.8, 1.2)]  # over, but not enforced
    return ka.AuditResult([_fake_measurement()], checks, quick=True)


def test_check_exit_code(monkeypatch, capsys):
    monkeypatch.setitem(ka.BUDGETS, "demo_unenforced",
                        ka.Budget("demo: a reported budget", 1.2, 12, enforced=False))
    monkeypatch.setattr(ka, "run", lambda ops, quick: _fake_result(True))
    assert ka.main(["--check", "--no-kernels"]) == 1
    out, err = capsys.readouterr()
    assert "OVER" in out and "over (not enforced)" in out
    assert "varlen bwd / fwd executed, causal" in err and "demo:" not in err
    assert ka.main([]) == 0  # the table alone never fails
    monkeypatch.setattr(ka, "run", lambda ops, quick: _fake_result(False))
    assert ka.main(["--check"]) == 0  # only a non-enforced budget is over


def test_json_output(tmp_path, capsys):
    path = tmp_path / "audit.json"
    assert ka.main(["--op", "co_attention", "--quick", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["schema"] == ka.SCHEMA and data["quick"] is True
    assert set(data["device_model"]) == {"name", "flops_per_s", "bytes_per_s"}
    assert [(m["op"], m["mode"]) for m in data["measurements"]] == [("co_attention", "fwd"),
                                                                    ("co_attention", "bwd")]
    m = data["measurements"][1]
    assert set(m) >= {"case", "flops", "bytes", "intensity_flop_per_byte", "h100_roof_s",
                      "h100_floor_s", "kernels", "torch_flops", "torch_ops"}
    assert m["flops"]["executed"] == m["flops"]["triton_mma"] + m["flops"]["torch"] > 0
    assert m["bytes"]["requested"] == m["bytes"]["loaded"] + m["bytes"]["stored"]
    # the one-pass backward: the delta pre-kernel and dK/dV with atomic dQ, no dQ kernel
    assert {k["name"] for k in m["kernels"]} == {"_co_attn_bwd_delta_kernel",
                                                 "_co_attn_bwd_dkdv_kernel"}
    assert set(m["kernels"][0]) >= {"mma_flops", "bytes_loaded", "bytes_stored", "atomic_bytes",
                                    "dot_shapes", "launches", "programs"}
    (b,) = data["budgets"]
    assert b["key"] == "co_attention_bwd_fwd" and b["value"] == pytest.approx(
        data["measurements"][1]["flops"]["executed"] / data["measurements"][0]["flops"]["executed"])
    assert set(b) >= {"text", "issue", "limit", "enforced", "over"}
    assert "co-attention bwd / fwd" in capsys.readouterr().out


def test_mqa_backward_grid_budget():
    """Issue 12: the MQA (8 query heads, 1 kv head) backward grid at batch 1 and 4K
    tokens offers >= 132 programs, computed on the host (no kernel runs); without the
    head split it offered 64 (D64/D128: 4096 / 64-key tiles)."""
    with production_tiles():
        programs = ka.mqa_grid_programs()
        unsplit = 4096 // max(tva.pick_config(k, d).block_n
                              for k in ("bwd", "dkdv") for d in (64, 128, 256))
    assert programs >= 132 > unsplit
    assert not ka.Check("varlen_bwd_mqa_grid", programs, 132).over
    assert ka.Check("varlen_bwd_mqa_grid", 64, 132).over  # an at-least budget


def test_issue_and_waive_select_the_enforced_budgets(monkeypatch, capsys):
    monkeypatch.setitem(ka.BUDGETS, "demo_unenforced",
                        ka.Budget("demo: a reported budget", 1.2, 12, enforced=False))
    ran = []

    def fake_run(ops, quick):
        ran.append(ops)
        return _fake_result(True)

    monkeypatch.setattr(ka, "run", fake_run)
    assert ka.main(["--check", "--issue", "12", "--no-kernels"]) == 1
    assert ran[-1] == ("varlen_attention", "co_attention")
    assert ka.main(["--check", "--issue", "13", "--no-kernels"]) == 0
    assert ran[-1] == ("contrastive",)
    assert ka.main(["--check", "--waive", "varlen_bwd_fwd_causal", "--no-kernels"]) == 0
    assert "over (not enforced)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ka.main(["--waive", "no_such_budget"])
