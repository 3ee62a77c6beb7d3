"""GQA/MQA backward: the dK/dV kernel spreads a kv head's group of query heads over
several programs when its grid would leave SMs idle (head splits), writing float32
partials that the launcher sums in a fixed order. Under the interpreter the split
path runs whenever group > 1 (the SM target is an H100's 132 off CUDA)."""

import pytest
import torch
from test_varlen_attention import cu_of, make_qkv, run_and_compare

import mmkernels
from mmkernels import reference
from mmkernels.testing import assert_close_to_reference
from mmkernels.triton import attention_launch as al
from mmkernels.triton import interpreting, production_tiles
from mmkernels.triton import varlen_attention as tva

needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="the Triton path on CPU tensors (interpreter)")


@pytest.mark.parametrize("programs, group, sms, want", [
    (64, 1, 132, 1),      # MHA: nothing to split
    (200, 8, 132, 1),     # the grid already fills the GPU
    (132, 8, 132, 1),
    (64, 8, 132, 4),      # MQA, 4K tokens, 64-key tiles: 3 would do, 4 divides 8
    (64, 6, 132, 3),
    (64, 2, 132, 2),      # as many splits as the group allows
    (1, 32, 132, 32),
    (10, 7, 132, 7),      # a prime group: single heads
    (40, 12, 132, 4),
])
def test_head_splits_choice(programs, group, sms, want):
    splits = al.head_splits(programs, group, sms)
    assert splits == want
    assert group % splits == 0  # equal parts
    assert programs * splits >= sms or splits == group or splits == 1


def test_sm_count_off_cuda():
    assert al.sm_count(torch.device("cpu")) == al.DEFAULT_SMS == 132


def test_mqa_batch1_4k_backward_grid_fills_an_h100():
    """Issue 12: with MQA and batch 1 at 4K tokens the backward grid offers at least
    132 programs (host-side: the grid the launcher would use, no kernel runs). Before
    the split: 64 programs (D64/D128: 64-key tiles x 1 sequence x 1 kv head)."""
    with production_tiles():
        for d in (64, 80, 128, 256):
            for det in (False, True):
                grid = tva.dkdv_grid(4096, 1, 8, 1, d, deterministic=det)
                assert grid[0] * grid[1] * grid[2] >= 132, (d, det, grid)
        # the grid already large (64 sequences): no split
        assert tva.dkdv_grid(4096, 64, 8, 1, 128)[2] == 1
        assert tva.dkdv_grid(4096, 1, 8, 8, 128)[2] == 8  # MHA


@pytest.fixture
def splits_seen(monkeypatch):
    """The head splits each backward launch chose."""
    seen = []
    real = tva.dkdv_splits

    def spy(*args):
        out = real(*args)
        seen.append(out)
        return out

    monkeypatch.setattr(tva, "dkdv_splits", spy)
    return seen


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(6, 1), (6, 2), (5, 1)], ids=["mqa", "gqa", "mqa-odd"])
def test_split_path_matches_reference(splits_seen, dtype, heads):
    lengths = [19, 0, 33]
    run_and_compare(lengths, [23, 5, 33], H=heads[0], H_kv=heads[1], D=32, dtype=dtype,
                    causal=True)
    assert splits_seen and all(s > 1 for s in splits_seen)


@needs_interpreter
@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["one-pass", "deterministic"])
def test_split_path_blocks_dropout(splits_seen, deterministic_mode):
    lengths = [21, 0, 40]
    bid = torch.zeros(sum(lengths), dtype=torch.int32)
    bid[3:12] = 1
    bid[30:50] = 2
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        run_and_compare(lengths, lengths, H=4, H_kv=1, D=32, dtype=torch.float32, causal=True,
                        block_ids=bid, dropout_p=0.25)
        run_and_compare(lengths, lengths, H=6, H_kv=2, D=24, dtype=torch.float16, causal=True,
                        block_ids=bid, dropout_p=0.25, window=(9, -1))
    finally:
        torch.use_deterministic_algorithms(old)
    assert len(splits_seen) == 2 and all(s > 1 for s in splits_seen)


def _grads(lengths, H, H_kv, bid, deterministic):
    torch.manual_seed(3)
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, H, H_kv, 32,
                                                     torch.float32)]
    cu = cu_of(lengths)
    out = mmkernels.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), 0.2,
                                     causal=True, block_ids=bid, deterministic=deterministic,
                                     dropout_seed=7)
    out.backward(torch.randn_like(out))
    return [out.detach(), q.grad, k.grad, v.grad]


@needs_interpreter
def test_split_deterministic_bit_identical(splits_seen):
    """deterministic=True: the partials are written by one program each and summed in
    a fixed order, so reruns are bit-identical."""
    lengths = [17, 30]
    bid = torch.zeros(47, dtype=torch.int32)
    bid[20:28] = 1
    a = _grads(lengths, 6, 1, bid, True)
    b = _grads(lengths, 6, 1, bid, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert splits_seen == [6, 6]  # single heads: the grid is tiny


@needs_interpreter
def test_split_and_unsplit_agree(monkeypatch):
    """The split path against the unsplit one (a grid that 'fills' a 1-SM device) and
    both against float64."""
    lengths = [26, 11]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, 4, 1, 16, torch.float32)
    g = torch.randn_like(q)
    grads = []
    for sms in (132, 1):
        monkeypatch.setattr(tva, "sm_count", lambda device, sms=sms: sms)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mmkernels.varlen_attention(*leaves, cu, cu, 26, 26, causal=True,
                                         deterministic=True)
        out.backward(g)
        grads.append([t.grad for t in leaves])
    q64, k64, v64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.varlen_attention(q64, k64, v64, cu, cu, None, True)
    ref.backward(g.double())
    for got in grads:
        for x, want, name in zip(got, (q64.grad, k64.grad, v64.grad), ("dq", "dk", "dv")):
            assert_close_to_reference(x, want, what=name)
