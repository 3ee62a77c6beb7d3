"""The fused C++ CPU panel passes of the contrastive losses (csrc/contrastive/) against
the eager ones of mmkernels.reference: values, NaN, bad input, opcheck, and the
regressions of issue 10's defect 14 (all -inf columns, negative weights)."""

import pytest
import torch

from mmkernels import reference
from mmkernels.ops import contrastive as ops
from mmkernels.testing import assert_close_to_reference

# ---------------------------------------------------------------------------------
# the fused CPU panel passes against the eager ones
# ---------------------------------------------------------------------------------

FUSED, EAGER = ops.FusedCpuPasses(), reference.EAGER_PASSES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,m", [(1, 1), (7, 33), (40, 301), (17, 1024)])
def test_fused_lse_panel(k, m, dtype):
    # CLIP-sized spread (s = 100): exp() arguments far below the float range
    tiles = [torch.randn(k, m, dtype=torch.float64).mul_(60).to(dtype) for _ in range(3)]
    stats = {}
    for name, passes in (("fused", FUSED), ("eager", EAGER)):
        rm = torch.full((k,), float("-inf"), dtype=dtype)
        rs = torch.zeros(k, dtype=dtype)
        cm = torch.full((m,), float("-inf"), dtype=dtype)
        cs = torch.zeros(m, dtype=dtype)
        for S in tiles:  # three tiles of the same rows and columns: running statistics
            passes.lse_panel(S, rm, rs, cm, cs)
        stats[name] = (rm + rs.log(), cm + cs.log())
    ref_r = torch.logsumexp(torch.cat([t.double() for t in tiles], 1), 1)
    ref_c = torch.logsumexp(torch.cat([t.double() for t in tiles], 0), 0)
    for name, (r, c) in stats.items():
        assert_close_to_reference(r, ref_r, what=f"{name} row lse")
        assert_close_to_reference(c, ref_c, what=f"{name} column lse")


def test_fused_lse_panel_rows_only_and_threads():
    S = torch.randn(100, 513) * 30
    out = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            rm, rs = torch.full((100,), float("-inf")), torch.zeros(100)
            cm, cs = torch.full((513,), float("-inf")), torch.zeros(513)
            FUSED.lse_panel(S, rm, rs, cm, cs)
            rm2, rs2 = torch.full((100,), float("-inf")), torch.zeros(100)
            FUSED.lse_panel(S, rm2, rs2, None, None)
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(rm + rs.log(), rm2 + rs2.log())
        out.append((rm + rs.log(), cm + cs.log()))
    # the statistics are merged in a fixed order: 1 and 2 threads give the same bits
    assert all(torch.equal(x, y) for x, y in zip(out[0], out[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_cols", [False, True])
def test_fused_grad_panel(dtype, with_cols):
    S = (torch.randn(23, 301, dtype=torch.float64) * 40).to(dtype)
    # shifts are log-sum-exps (minus log weights): at or above each row's / column's max
    rshift = (S.double().amax(1) + torch.rand(23, dtype=torch.float64) * 5).to(dtype)
    cshift = ((S.double().amax(0) + torch.rand(301, dtype=torch.float64) * 5).to(dtype)
              if with_cols else None)
    # exponent arguments rounded as the kernels round them (in dtype): this checks exp()
    ref = (S - rshift[:, None]).double().exp()
    if with_cols:
        ref += (S - cshift[None, :]).double().exp()
    for passes in (FUSED, EAGER):
        W = S.clone()
        passes.grad_panel(W, rshift, cshift)
        # both floor exp() near e^-80..e^-87 (no denormals): the table's exp entries
        assert_close_to_reference(W, ref, what="weights",
                                  tol="exp_float32" if dtype == torch.float32 else "exp_float64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_siglip_panel(dtype):
    # logits over the whole useful range, incl. the tiny exp(-|x|) of most negatives
    L = torch.linspace(-120, 120, 4001, dtype=torch.float64).reshape(1, -1).repeat(3, 1)
    L = L.to(dtype)
    ref_loss = torch.nn.functional.softplus(L.double() - 7.0).sum()
    ref_grad = 0.25 * torch.sigmoid(L.double() - 7.0)
    for passes in (FUSED, EAGER):
        X = L.clone()
        total = passes.siglip_panel(X, -7.0, 0.25, True)
        assert_close_to_reference(total, ref_loss, what="loss")
        assert_close_to_reference(X, ref_grad, what="grad")
        assert_close_to_reference(passes.siglip_panel(L.clone(), -7.0, 0.25, False), ref_loss,
                                  what="loss without grad")


def test_fused_passes_nan_and_bad_input():
    S = torch.randn(4, 9)
    S[1, 3] = float("nan")
    rm, rs = torch.full((4,), float("-inf")), torch.zeros(4)
    cm, cs = torch.full((9,), float("-inf")), torch.zeros(9)
    FUSED.lse_panel(S, rm, rs, cm, cs)
    assert torch.isnan(rm[1] + rs[1].log()) and torch.isnan(cm[3] + cs[3].log())
    assert torch.isfinite(rm[0] + rs[0].log())
    W = S.clone()
    FUSED.grad_panel(W, torch.zeros(4), torch.zeros(9))
    assert torch.isnan(W[1, 3]) and torch.isfinite(W[0]).all()
    assert torch.isnan(FUSED.siglip_panel(S.clone(), 0.0, 1.0, True))
    with pytest.raises(RuntimeError, match="row_max must be"):
        FUSED.lse_panel(S, torch.zeros(3), torch.zeros(4), None, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        FUSED.grad_panel(S.T, torch.zeros(9), None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        FUSED.siglip_panel(S.half(), 0.0, 1.0, False)


def test_fused_passes_opcheck():
    S = torch.randn(6, 11)
    torch.library.opcheck(torch.ops.mmkernels.contrastive_lse_panel_.default,
                          (S, torch.full((6,), float("-inf")), torch.zeros(6),
                           torch.full((11,), float("-inf")), torch.zeros(11)))
    torch.library.opcheck(torch.ops.mmkernels.contrastive_grad_panel_.default,
                          (S.clone(), torch.zeros(6), torch.zeros(11)))
    torch.library.opcheck(torch.ops.mmkernels.siglip_panel_.default, (S.clone(), 0.5, 1.0, True))


@pytest.mark.parametrize("passes", [pytest.param(ops.FusedCpuPasses(), id="fused"),
                                    pytest.param(reference.EAGER_PASSES, id="eager")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_panel_all_neg_inf_column(passes, dtype):
    S = torch.randn(40, 9, dtype=dtype) * 10
    S[:, 4] = float("-inf")
    S[7] = float("-inf")
    rm, rs = torch.full((40,), float("-inf"), dtype=dtype), torch.zeros(40, dtype=dtype)
    cm, cs = torch.full((9,), float("-inf"), dtype=dtype), torch.zeros(9, dtype=dtype)
    passes.lse_panel(S, rm, rs, cm, cs)
    passes.lse_panel(S, rm, rs, cm, cs)  # a second tile: the running merge as well
    S2 = torch.cat([S, S], 1).double()
    assert_close_to_reference(rm + rs.log(), torch.logsumexp(S2, 1), what="row lse")
    assert_close_to_reference(cm + cs.log(), torch.logsumexp(torch.cat([S, S]).double(), 0),
                              what="column lse")


@pytest.mark.parametrize("passes", [pytest.param(ops.FusedCpuPasses(), id="fused"),
                                    pytest.param(reference.EAGER_PASSES, id="eager")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negative_grad_weight(passes, dtype):
    """Defect 14: a negative grad_weight flips the gradients' sign (the C++ pass flushed
    every negative weighted derivative to zero)."""
    L = torch.linspace(-30, 30, 301, dtype=torch.float64).reshape(7, 43).to(dtype)
    X = L.clone()
    total = passes.siglip_panel(X, 0.5, -0.25, True)
    assert_close_to_reference(X, -0.25 * torch.sigmoid(L.double() + 0.5), what="grad")
    assert_close_to_reference(total, torch.nn.functional.softplus(L.double() + 0.5).sum(),
                              what="loss")
