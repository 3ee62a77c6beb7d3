"""varlen_attention on a GPU (every test is `cuda`-marked): the production tiles and,
off the deterministic path, the autotuned launches, against the float64 reference
with the 2x-eager rule for bf16/fp16 (mmkernels.testing.assert_close_to_reference,
through test_varlen_attention.run_and_compare). bf16 runs only here: the Triton
interpreter's bf16 tl.dot is wrong."""

import pytest
import torch
from test_varlen_attention import cu_of, make_qkv, run_and_compare

import mmkernels
from mmkernels.triton import attention_launch as al
from mmkernels.triton import varlen_attention as tva

pytestmark = pytest.mark.cuda

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _lengths(n, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n,), generator=g).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlen_q_differs_from_seqlen_k(dtype, D, causal):
    """Production tiles with ragged tails on both axes and seqlen_q != seqlen_k
    (bottom-right aligned causal mask, as flash-attn), including empty sequences."""
    lq = [300, 0, 77, 513, 129]
    lk = [129, 45, 700, 513, 0]
    run_and_compare(lq, lk, H=4, H_kv=2, D=D, dtype=dtype, causal=causal, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dim_256(dtype, causal):
    lengths = [257, 31, 400]
    run_and_compare(lengths, lengths, H=4, H_kv=4, D=256, dtype=dtype, causal=causal,
                    device="cuda")
    run_and_compare([100, 64], [250, 3], H=2, H_kv=1, D=256, dtype=dtype, causal=causal,
                    device="cuda", dropout_p=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_more_than_64_sequences(dtype):
    """Grid axis 1 runs over the sequences: 97 of them, with empty ones and long tails."""
    lq = _lengths(97, 0, 90, seed=1)
    lk = _lengths(97, 0, 90, seed=2)
    run_and_compare(lq, lk, H=4, H_kv=2, D=64, dtype=dtype, causal=True, device="cuda")
    run_and_compare(lq, lq, H=2, H_kv=2, D=128, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 2), (8, 1)], ids=["gqa", "mqa"])
def test_gqa_block_ids_dropout(dtype, heads):
    lengths = [700, 0, 311, 1025]
    bid = torch.zeros(sum(lengths), dtype=torch.int32)
    bid[10:300] = 1          # an image in sequence 0
    bid[720:900] = 2         # and in sequence 2
    bid[1100:1600] = 3       # sequence 3
    run_and_compare(lengths, lengths, H=heads[0], H_kv=heads[1], D=128, dtype=dtype,
                    causal=True, block_ids=bid.cuda(), dropout_p=0.15, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mqa_head_split_on_the_gpu(dtype, monkeypatch):
    """MQA, batch 1: the dK/dV grid is small, so the group's heads are split over
    several programs (float32 partials summed in a fixed order) on every GPU."""
    seen = []
    real = tva.dkdv_splits
    monkeypatch.setattr(tva, "dkdv_splits", lambda *a: seen.append(real(*a)) or seen[-1])
    run_and_compare([2048], [2048], H=8, H_kv=1, D=128, dtype=dtype, causal=True,
                    device="cuda", dropout_p=0.1)
    assert seen and seen[0] > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window, causal", [((64, 64), False), ((100, -1), True),
                                            ((-1, 30), False)], ids=["sym", "causal-left",
                                                                     "right"])
def test_window_softcap(dtype, window, causal):
    lq = [300, 0, 517, 77]
    lk = [300, 20, 600, 77]
    run_and_compare(lq, lk, H=4, H_kv=2, D=128, dtype=dtype, causal=causal, window=window,
                    softcap=30.0, device="cuda")
    run_and_compare(lq, lq, H=4, H_kv=1, D=64, dtype=dtype, causal=causal, window=window,
                    softcap=50.0, dropout_p=0.1, device="cuda")


def _fwd_bwd(deterministic, dropout_p, dtype=torch.bfloat16, H=8, H_kv=2, D=128):
    lengths = [300, 0, 77, 1000]
    bid = torch.zeros(sum(lengths), dtype=torch.int32, device="cuda")
    bid[400:600] = 1
    torch.manual_seed(1)
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, H, H_kv, D, dtype, "cuda")]
    cu = cu_of(lengths, "cuda")
    out = mmkernels.varlen_attention(q, k, v, cu, cu, 1000, 1000, dropout_p, causal=True,
                                     block_ids=bid, deterministic=deterministic)
    out.float().square().sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("heads", [(8, 2), (8, 1)], ids=["gqa", "mqa"])
def test_deterministic_bit_identical(dropout_p, heads):
    """deterministic=True: dK/dV (head-split partials summed in a fixed order), then dQ
    in its own kernel, fixed launch configs (no autotune): bit-identical reruns. (The
    default one-pass path adds dQ with atomics: it is checked against the float64
    reference, within the 2x-eager tolerance, by test_gqa_block_ids_dropout.)"""
    a = _fwd_bwd(True, dropout_p, H=heads[0], H_kv=heads[1])
    b = _fwd_bwd(True, dropout_p, H=heads[0], H_kv=heads[1])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_autotuned_one_pass_backward_resets_dq():
    """The first call of a new autotune key benchmarks every config; the one-pass
    backward's float32 dQ buffer is zeroed before each benchmark run and after the
    choice (reset_to_zero), so the first and second calls agree with the reference."""
    al.reset_autotune()
    for _ in range(2):
        run_and_compare([1500, 33], [1500, 33], H=4, H_kv=2, D=64, dtype=torch.bfloat16,
                        causal=True, device="cuda")
