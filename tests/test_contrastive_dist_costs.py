"""What one rank of the distributed contrastive losses costs (gloo, CPU), measured:
the GEMM passes per rank, counted by the audit's counters
(mmkernels.tools.audit_counters), and the memory per rank of each mode against the
formulas of mmkernels/ops/_contrastive_dist.py."""

import pytest
import torch
from _dist_worker import run_ranks

#: per rank, GEMM passes over B_r x N x D (forward, backward); ring SigLIP takes one more
#: than all_gather SigLIP: its forward cannot form the texts' gradients, because every
#: rank's incoming gradient scales them before they travel and the forward would have to
#: keep each block's unscaled (B_q, D) gradient, (N, D) per rank (_contrastive_dist.py)
PASS_BUDGET = {"all_gather-clip": (1, 3), "ring-clip": (1, 3),
               "all_gather-siglip": (3, 0), "ring-siglip": (1, 3)}


def _data(sizes, D, dtype) -> dict:
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    gen = torch.Generator().manual_seed(len(sizes))

    def unit():
        x = torch.randn(bounds[-1], D, generator=gen, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=1).to(dtype)

    return dict(image=unit(), text=unit(), scale=torch.tensor(9.0, dtype=dtype),
                bias=torch.tensor(-3.0, dtype=dtype), bounds=bounds, chunk=4)


def test_distributed_gemm_passes_per_rank(tmp_path):
    """The Triton kernels' tl.dot FLOPs plus torch's GEMM FLOPs per rank (fp16, the
    interpreter; uneven batches whose sizes are multiples of the interpreter's tiles, so
    the passes are whole): InfoNCE 1 + 3 in both modes, as on one process (the column
    statistics are all-reduced, never recomputed); SigLIP 3 + 0 in all_gather mode and
    1 + 3 in ring mode."""
    sizes, D = [32, 16], 64
    N = sum(sizes)
    res = run_ranks(tmp_path, _data(sizes, D, torch.float16), len(sizes), "passes")
    for r, got in enumerate(res):
        one_pass = 2 * sizes[r] * N * D
        for key, (fwd, bwd) in PASS_BUDGET.items():
            passes = (got[key]["fwd"] / one_pass, got[key]["bwd"] / one_pass)
            assert passes == (fwd, bwd), (r, key, passes)
            assert "_contrastive_weights_kernel" in got[key]["kernels"], (r, key)
    assert sum(PASS_BUDGET["all_gather-clip"]) <= 4 and sum(PASS_BUDGET["ring-clip"]) <= 4
    assert sum(PASS_BUDGET["all_gather-siglip"]) <= 3


@pytest.mark.parametrize("sizes", [pytest.param([8, 6], id="2-ranks"),
                                   pytest.param([8, 6, 7], id="3-ranks")])
def test_distributed_memory_per_rank(tmp_path, sizes):
    """Per rank and mode (float64, the chunked path; e = 8 bytes; the statistics are
    float64 too): the bytes kept from forward to backward, the collectives' buffers and
    the largest tensor created, against the formulas of _contrastive_dist.py. all_gather
    holds (N, D) blocks; ring never does: every term is O(B_max D) and the same at any
    world size."""
    D, e = 64, 8
    N, B_max = sum(sizes), max(sizes)
    padded = len(sizes) * B_max  # the collectives' blocks are padded to B_max rows
    res = run_ranks(tmp_path, _data(sizes, D, torch.float64), len(sizes), "memory",
                    interpret=False)
    for r, got in enumerate(res):
        B = sizes[r]
        ag_clip, ag_sig = got["all_gather-clip"], got["all_gather-siglip"]
        ring_clip, ring_sig = got["ring-clip"], got["ring-siglip"]
        # all_gather InfoNCE: the gathered texts (N D) kept, with the column statistics
        # (N) and three per-row ones (B); gathered in the forward, reduce-scattered in
        # the backward: 2 N D (2 world B_max D with the padding of uneven batches)
        assert ag_clip["saved"] == (N * D + N + 3 * B) * e, (r, ag_clip)
        assert ag_clip["gathered"] == 2 * padded * D * e, (r, ag_clip)
        assert ag_clip["largest"] == padded * D * e, (r, ag_clip)
        # all_gather SigLIP: the texts' (N D) and the images' (B D) gradient factors and
        # at most three scalars kept; the gathered texts and the reduce-scattered
        # gradient: 2 N D
        assert (N + B) * D * e <= ag_sig["saved"] <= (N + B) * D * e + 3 * e, (r, ag_sig)
        assert ag_sig["gathered"] == 2 * padded * D * e, (r, ag_sig)
        # ring InfoNCE: four per-row statistics kept; one step's exchange at most two
        # blocks of B_max rows with their column log-sum-exps (D + 1 columns), or the
        # carried accumulator and the arriving one (D + 1 columns, float32 / float64)
        assert ring_clip["saved"] == 4 * B * e, (r, ring_clip)
        assert ring_clip["gathered"] == 0
        assert ring_clip["in_flight"] <= 2 * B_max * (D + 1) * e, (r, ring_clip)
        assert ring_clip["largest"] <= B_max * (D + 1) * e, (r, ring_clip)
        # ring SigLIP: nothing kept but the inputs; two blocks (or accumulators) in flight
        assert ring_sig["saved"] == 0 and ring_sig["gathered"] == 0, (r, ring_sig)
        assert ring_sig["in_flight"] <= 2 * B_max * D * e, (r, ring_sig)
        assert ring_sig["largest"] <= B_max * D * e, (r, ring_sig)
        if len(sizes) == 3:  # ring holds less than one gathered block
            for ring in (ring_clip, ring_sig):
                assert ring["in_flight"] + ring["saved"] < N * D * e
