"""ViLBERT co-attention kernels: both directions in one launch.

Grid axis 2 runs over (direction, head): direction 0 is stream A's queries over stream
B's keys/values (out_a), direction 1 is B over A (out_b). Each program calls the same
tile functions as varlen attention (mmkernels.triton.attention), with the pointers of
its direction; the two branches are the same code, inlined twice. Dropout stream of
(direction d, head h) is d * H + h (Philox counter word 2, see
mmkernels.triton.attention._dropout_keep).

Backward: delta = rowsum(dO * O) of both directions in one launch
(:func:`_co_attn_bwd_delta_kernel`), then by default the one-pass dK/dV kernel with
ATOMIC_DQ (dQ of both streams added to float32 buffers with atomics, as varlen
attention's); the deterministic path runs the dK/dV kernel without atomics and then
the dQ kernel.

Every stream's K and V are read with its Q's strides (stride_a* / stride_b*), and
gradients and dO are written/read with them too: the launcher
(:func:`launch_fwd`, :func:`launch_bwd`) passes contiguous tensors whose shapes
mmkernels.ops.co_attention checked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmkernels.triton import KernelSpec, interpreter_tiles
from mmkernels.triton.attention import (
    PHILOX_ARGS,
    _attn_bwd_delta_tile,
    _attn_fwd_tile,
    _seq_bounds,
)
from mmkernels.triton.attention_bwd import _attn_bwd_dkdv_tile, _attn_bwd_dq_tile
from mmkernels.triton.attention_launch import (
    INTERPRET_CONFIG,
    AttnConfig,
    attention_spec,
    autotuning,
    cdiv,
    delta_block_t,
    delta_spec,
    device_guard,
    head_chunks,
    launch_attention,
    philox_args,
)
from mmkernels.triton.varlen_attention import CONFIGS as VARLEN_CONFIGS


@triton.jit
def _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads):
    """Direction, head (int64) and the two streams' (start, length) of sample b."""
    a0, len_a = _seq_bounds(cu_a_ptr, b)
    b0, len_b = _seq_bounds(cu_b_ptr, b)
    return dh // num_heads, (dh % num_heads).to(tl.int64), a0, len_a, b0, len_b


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _co_attn_fwd_kernel(qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, oa_ptr, ob_ptr,
                        lsea_ptr, lseb_ptr, cu_a_ptr, cu_b_ptr,
                        stride_at, stride_ah, stride_ad, stride_bt, stride_bh, stride_bd,
                        stride_oat, stride_oah, stride_oad, stride_obt, stride_obh, stride_obd,
                        stride_lah, stride_lbh, sm_scale, dropout_a, dropout_b, seed_lo,
                        seed_hi, ctr_lo, ctr_hi, head_dim, num_heads,
                        HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    dh = tl.program_id(2)
    d, h, a0, len_a, b0, len_b = _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads)
    a64 = a0.to(tl.int64)
    b64 = b0.to(tl.int64)
    stream = dh  # = d * num_heads + h
    if d == 0:
        if start_m * BLOCK_M < len_a:
            _attn_fwd_tile(qa_ptr + a64 * stride_at + h * stride_ah,
                           kb_ptr + b64 * stride_bt + h * stride_bh,
                           vb_ptr + b64 * stride_bt + h * stride_bh,
                           oa_ptr + a64 * stride_oat + h * stride_oah,
                           lsea_ptr + h.to(tl.int64) * stride_lah + a64,
                           cu_a_ptr, cu_a_ptr, cu_a_ptr,
                           stride_at, stride_ad, stride_bt, stride_bd, stride_bt, stride_bd,
                           stride_oat, stride_oad, len_a, len_b, start_m, head_dim, sm_scale,
                           dropout_a, seed_lo, seed_hi, ctr_lo, ctr_hi, stream, a0,
                           False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                           BLOCK_D1=BLOCK_D1, EVEN_D=EVEN_D)
    else:
        if start_m * BLOCK_M < len_b:
            _attn_fwd_tile(qb_ptr + b64 * stride_bt + h * stride_bh,
                           ka_ptr + a64 * stride_at + h * stride_ah,
                           va_ptr + a64 * stride_at + h * stride_ah,
                           ob_ptr + b64 * stride_obt + h * stride_obh,
                           lseb_ptr + h.to(tl.int64) * stride_lbh + b64,
                           cu_b_ptr, cu_b_ptr, cu_b_ptr,
                           stride_bt, stride_bd, stride_at, stride_ad, stride_at, stride_ad,
                           stride_obt, stride_obd, len_b, len_a, start_m, head_dim, sm_scale,
                           dropout_b, seed_lo, seed_hi, ctr_lo, ctr_hi, stream, b0,
                           False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                           BLOCK_D1=BLOCK_D1, EVEN_D=EVEN_D)


@triton.jit
def _co_attn_bwd_delta_kernel(oa_ptr, doa_ptr, ob_ptr, dob_ptr, deltaa_ptr, deltab_ptr, total_a,
                              total_b, stride_at, stride_ah, stride_ad, stride_bt, stride_bh,
                              stride_bd, stride_lah, stride_lbh, head_dim, num_heads,
                              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    """delta = rowsum(dO * O) of both directions in one launch: program (t, d * H + h)
    covers tokens [t*BLOCK_T, +BLOCK_T) of head h of stream A (d = 0) or B (d = 1).
    O and dO of a stream are contiguous, laid out like it (stride_a*/stride_b*)."""
    start_t = tl.program_id(0)
    dh = tl.program_id(1)
    d = dh // num_heads
    h = (dh % num_heads).to(tl.int64)
    if d == 0:
        if start_t * BLOCK_T < total_a:
            _attn_bwd_delta_tile(oa_ptr + h * stride_ah, doa_ptr + h * stride_ah,
                                 deltaa_ptr + h * stride_lah, start_t, total_a, head_dim,
                                 stride_at, stride_ad, stride_at, stride_ad, BLOCK_T, BLOCK_D,
                                 BLOCK_D1, EVEN_D)
    else:
        if start_t * BLOCK_T < total_b:
            _attn_bwd_delta_tile(ob_ptr + h * stride_bh, dob_ptr + h * stride_bh,
                                 deltab_ptr + h * stride_lbh, start_t, total_b, head_dim,
                                 stride_bt, stride_bd, stride_bt, stride_bd, BLOCK_T, BLOCK_D,
                                 BLOCK_D1, EVEN_D)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _co_attn_bwd_dkdv_kernel(qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, doa_ptr, dob_ptr,
                             lsea_ptr, lseb_ptr, deltaa_ptr, deltab_ptr, dka_ptr, dva_ptr,
                             dkb_ptr, dvb_ptr, dq_acc_a_ptr, dq_acc_b_ptr, cu_a_ptr, cu_b_ptr,
                             stride_at, stride_ah, stride_ad, stride_bt, stride_bh, stride_bd,
                             stride_lah, stride_lbh, sm_scale, dropout_a, dropout_b, seed_lo,
                             seed_hi, ctr_lo, ctr_hi, head_dim, num_heads,
                             HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr = 0,
                             EVEN_D: tl.constexpr = False):
    """Direction 0 (A queries over B keys) produces dK_b, dV_b; direction 1 dK_a, dV_a.
    All gradient tensors are contiguous, laid out like their stream (stride_a*/stride_b*).
    ATOMIC_DQ (the one-pass backward): direction 0 also adds dQ_a into the float32
    dq_acc_a, direction 1 dQ_b into dq_acc_b (contiguous, their stream's layout), with
    atomics."""
    start_n = tl.program_id(0)
    b = tl.program_id(1)
    dh = tl.program_id(2)
    d, h, a0, len_a, b0, len_b = _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads)
    a64 = a0.to(tl.int64)
    b64 = b0.to(tl.int64)
    # the tile loops over `group` query heads starting at kv_head * group: group = 1,
    # kv_head = h; query head h draws stream stream0 + h
    stream0 = d * num_heads
    if d == 0:
        if start_n * BLOCK_N < len_b:
            _attn_bwd_dkdv_tile(qa_ptr + a64 * stride_at, kb_ptr + b64 * stride_bt + h * stride_bh,
                                vb_ptr + b64 * stride_bt + h * stride_bh, doa_ptr + a64 * stride_at,
                                lsea_ptr + a64, deltaa_ptr + a64,
                                dkb_ptr + b64 * stride_bt + h * stride_bh,
                                dvb_ptr + b64 * stride_bt + h * stride_bh,
                                cu_a_ptr, cu_a_ptr, cu_a_ptr,
                                stride_at, stride_ah, stride_ad, stride_bt, stride_bd,
                                stride_bt, stride_bd, stride_at, stride_ah, stride_ad, stride_lah,
                                stride_bt, stride_bd, stride_bt, stride_bd,
                                len_a, len_b, start_n, head_dim, sm_scale, dropout_a,
                                seed_lo, seed_hi, ctr_lo, ctr_hi, stream0, a0, h, 1,
                                False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                                dq_seq=dq_acc_a_ptr + a64 * stride_at, stride_dqt=stride_at,
                                stride_dqh=stride_ah, stride_dqd=stride_ad, ATOMIC_DQ=ATOMIC_DQ,
                                BLOCK_D1=BLOCK_D1, EVEN_D=EVEN_D)
    else:
        if start_n * BLOCK_N < len_a:
            _attn_bwd_dkdv_tile(qb_ptr + b64 * stride_bt, ka_ptr + a64 * stride_at + h * stride_ah,
                                va_ptr + a64 * stride_at + h * stride_ah, dob_ptr + b64 * stride_bt,
                                lseb_ptr + b64, deltab_ptr + b64,
                                dka_ptr + a64 * stride_at + h * stride_ah,
                                dva_ptr + a64 * stride_at + h * stride_ah,
                                cu_b_ptr, cu_b_ptr, cu_b_ptr,
                                stride_bt, stride_bh, stride_bd, stride_at, stride_ad,
                                stride_at, stride_ad, stride_bt, stride_bh, stride_bd, stride_lbh,
                                stride_at, stride_ad, stride_at, stride_ad,
                                len_b, len_a, start_n, head_dim, sm_scale, dropout_b,
                                seed_lo, seed_hi, ctr_lo, ctr_hi, stream0, b0, h, 1,
                                False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                                dq_seq=dq_acc_b_ptr + b64 * stride_bt, stride_dqt=stride_bt,
                                stride_dqh=stride_bh, stride_dqd=stride_bd, ATOMIC_DQ=ATOMIC_DQ,
                                BLOCK_D1=BLOCK_D1, EVEN_D=EVEN_D)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _co_attn_bwd_dq_kernel(qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, doa_ptr, dob_ptr,
                           lsea_ptr, lseb_ptr, deltaa_ptr, deltab_ptr, dqa_ptr, dqb_ptr,
                           cu_a_ptr, cu_b_ptr,
                           stride_at, stride_ah, stride_ad, stride_bt, stride_bh, stride_bd,
                           stride_lah, stride_lbh, sm_scale, dropout_a, dropout_b, seed_lo,
                           seed_hi, ctr_lo, ctr_hi, head_dim, num_heads,
                           HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    dh = tl.program_id(2)
    d, h, a0, len_a, b0, len_b = _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads)
    a64 = a0.to(tl.int64)
    b64 = b0.to(tl.int64)
    stream = dh  # = d * num_heads + h
    if d == 0:
        if start_m * BLOCK_M < len_a:
            _attn_bwd_dq_tile(qa_ptr + a64 * stride_at + h * stride_ah,
                              kb_ptr + b64 * stride_bt + h * stride_bh,
                              vb_ptr + b64 * stride_bt + h * stride_bh,
                              doa_ptr + a64 * stride_at + h * stride_ah,
                              dqa_ptr + a64 * stride_at + h * stride_ah,
                              lsea_ptr + h.to(tl.int64) * stride_lah + a64,
                              deltaa_ptr + h.to(tl.int64) * stride_lah + a64,
                              cu_a_ptr, cu_a_ptr, cu_a_ptr,
                              stride_at, stride_ad, stride_bt, stride_bd, stride_bt, stride_bd,
                              stride_at, stride_ad, stride_at, stride_ad,
                              len_a, len_b, start_m, head_dim, sm_scale, dropout_a, seed_lo,
                              seed_hi, ctr_lo, ctr_hi, stream, a0, False, False, HAS_DROPOUT,
                              BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D1=BLOCK_D1, EVEN_D=EVEN_D)
    else:
        if start_m * BLOCK_M < len_b:
            _attn_bwd_dq_tile(qb_ptr + b64 * stride_bt + h * stride_bh,
                              ka_ptr + a64 * stride_at + h * stride_ah,
                              va_ptr + a64 * stride_at + h * stride_ah,
                              dob_ptr + b64 * stride_bt + h * stride_bh,
                              dqb_ptr + b64 * stride_bt + h * stride_bh,
                              lseb_ptr + h.to(tl.int64) * stride_lbh + b64,
                              deltab_ptr + h.to(tl.int64) * stride_lbh + b64,
                              cu_b_ptr, cu_b_ptr, cu_b_ptr,
                              stride_bt, stride_bd, stride_at, stride_ad, stride_at, stride_ad,
                              stride_bt, stride_bd, stride_bt, stride_bd,
                              len_b, len_a, start_m, head_dim, sm_scale, dropout_b, seed_lo,
                              seed_hi, ctr_lo, ctr_hi, stream, b0, False, False, HAS_DROPOUT,
                              BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D1=BLOCK_D1, EVEN_D=EVEN_D)


# ---------------------------------------------------------------------------------
# launch configurations and launches
# ---------------------------------------------------------------------------------

# (kind, padded D) -> configs (the autotune space on a GPU): the first entry of each
# varlen list, except where the two-direction kernel spills with it (checked by the
# kernel report); varlen's further candidates are not checked for this kernel.
CONFIGS = {kind: {d: table[d][:1] for d in table} for kind, table in VARLEN_CONFIGS.items()}
# Where varlen's first entry spills here (kernel report, sm_80; co-attention has no
# window, softcap or image-block variants but its own register mix):
# forward D96 and D128: M128-N32-w8 with two or three stages spilled 8-16 bytes (full,
# full + dropout); one stage keeps the 128-query tile and fits (M64-N64-w4-s2 spilled
# 8-72 bytes, M64-N32-w4-s2 fits too)
CONFIGS["fwd"][96] = [AttnConfig(128, 32, 8, 1)]
CONFIGS["fwd"][128] = [AttnConfig(128, 32, 8, 1), AttnConfig(64, 32, 4, 2)]
# one-pass backward D64: M32-N64-w4 spilled 48 bytes with dropout once interior tiles
# ran unmasked; varlen's M32-N64-w8 fits. Deterministic dK/dV D64: varlen's M64-N32-w8
# spilled 8 bytes; M32-N64-w8 fits.
CONFIGS["dkdv"][64] = [AttnConfig(32, 64, 8, 1)]
# the delta pre-kernel (varlen's tiles, both directions inlined): 4 warps spill 8
# bytes at D64 on sm_80 (255 registers); 8 warps need 80
DELTA_WARPS = 8


def _pick(kind: str, block_d: int) -> AttnConfig:
    return INTERPRET_CONFIG if interpreter_tiles() else CONFIGS[kind][max(block_d, 64)][0]


def _configs(kind: str, block_d: int, tune: bool) -> list[AttnConfig]:
    """The configurations a launch chooses from: CONFIGS' whole list when it autotunes
    (:func:`mmkernels.triton.attention_launch.autotuning`; no GQA here, so no head
    split either), else :func:`_pick`'s one."""
    return list(CONFIGS[kind][max(block_d, 64)]) if tune else [_pick(kind, block_d)]


def _stream_layout(*tensors: Tensor) -> list[Tensor]:
    """The kernels read a stream's K and V (and dO, and write its gradients) with its
    Q's strides: give them contiguous tensors. Their shapes are equal (_check_streams),
    so they address alike (a contiguous tensor's strides can differ only on size-1
    dims, where the index is always 0)."""
    return [t.contiguous() for t in tensors]


def launch_fwd(qa, ka, va_, qb, kb, vb, cu_a, cu_b, max_a, max_b, scale, p_a, p_b, seed,
                offset):
    qa, ka, va_, qb, kb, vb = _stream_layout(qa, ka, va_, qb, kb, vb)
    cu_a, cu_b = cu_a.contiguous(), cu_b.contiguous()
    total_a, H, D = qa.shape
    total_b = qb.shape[0]
    batch = cu_a.numel() - 1
    oa = torch.zeros_like(qa)
    ob = torch.zeros_like(qb)
    lse_a = torch.full((H, total_a), float("-inf"), dtype=torch.float32, device=qa.device)
    lse_b = torch.full((H, total_b), float("-inf"), dtype=torch.float32, device=qa.device)
    if batch == 0 or max(max_a, max_b) == 0:
        return oa, ob, lse_a, lse_b
    block_d, block_d1 = head_chunks(D)
    chunks = dict(BLOCK_D=block_d, BLOCK_D1=block_d1, EVEN_D=D == block_d + block_d1)
    bucket = block_d + block_d1  # the config bucket
    longest = max(max_a, max_b)
    with device_guard(qa.device):
        launch_attention(
            _co_attn_fwd_kernel, "fwd", bucket, _configs("fwd", bucket, autotuning()),
            lambda m, n: (cdiv(longest, m), batch, 2 * H),
            (qa, ka, va_, qb, kb, vb, oa, ob, lse_a, lse_b, cu_a, cu_b,
             *qa.stride(), *qb.stride(), *oa.stride(), *ob.stride(), lse_a.stride(0),
             lse_b.stride(0), scale, p_a, p_b, *philox_args(seed, offset), D, H),
            dict(HAS_DROPOUT=(p_a > 0 or p_b > 0), **chunks), qa.device, longest)
    return oa, ob, lse_a, lse_b


def launch_bwd(doa, dob, qa, ka, va_, qb, kb, vb, oa, ob, lse_a, lse_b, cu_a, cu_b, max_a,
                max_b, scale, p_a, p_b, seed, offset, deterministic=False):
    """One pass (default): one launch of the delta pre-kernel, then one of the dK/dV
    kernel with ATOMIC_DQ (dQ of both streams into float32 buffers with atomics).
    Deterministic (``torch.use_deterministic_algorithms(True)``): dK/dV without atomics,
    then the dQ kernel (it recomputes S and dP: 7 GEMMs per tile pair instead of 5).
    Each kernel covers both directions in one launch."""
    # dO_a (O_a) is read with stream A's strides, dO_b (O_b) with B's (as the gradients written)
    qa, ka, va_, doa, oa, qb, kb, vb, dob, ob = _stream_layout(qa, ka, va_, doa, oa, qb, kb, vb,
                                                               dob, ob)
    cu_a, cu_b = cu_a.contiguous(), cu_b.contiguous()
    lse_a, lse_b = lse_a.contiguous(), lse_b.contiguous()
    total_a, H, D = qa.shape
    total_b = qb.shape[0]
    batch = cu_a.numel() - 1
    if batch == 0 or max(max_a, max_b) == 0:
        return tuple(torch.zeros_like(t) for t in (qa, ka, va_, qb, kb, vb))
    # every key row of either stream belongs to a launched key tile, which stores its
    # dK/dV rows (zeros where no query sees it): no zero-fill
    dka, dva, dkb, dvb = (torch.empty_like(t) for t in (ka, va_, kb, vb))
    one_pass = not deterministic
    if one_pass:  # accumulated with atomics: start at zero
        dq_acc_a = torch.zeros(qa.shape, dtype=torch.float32, device=qa.device)
        dq_acc_b = torch.zeros(qb.shape, dtype=torch.float32, device=qa.device)
    else:
        dqa, dqb = torch.empty_like(qa), torch.empty_like(qb)
        dq_acc_a, dq_acc_b = lse_a, lse_b  # unused placeholders (float32)
    block_d, block_d1 = head_chunks(D, backward=True, deterministic=deterministic)
    chunks = dict(BLOCK_D=block_d, BLOCK_D1=block_d1, EVEN_D=D == block_d + block_d1)
    block_d += block_d1  # the config bucket
    delta_a = torch.empty(H, total_a, dtype=torch.float32, device=qa.device)
    delta_b = torch.empty(H, total_b, dtype=torch.float32, device=qa.device)
    block_t = delta_block_t(block_d)
    common = (cu_a, cu_b, *qa.stride(), *qb.stride(), lse_a.stride(0), lse_b.stride(0), scale,
              p_a, p_b, *philox_args(seed, offset), D, H)
    with device_guard(qa.device):
        _co_attn_bwd_delta_kernel[(cdiv(max(total_a, total_b), block_t), 2 * H)](
            oa, doa, ob, dob, delta_a, delta_b, total_a, total_b, *qa.stride(), *qb.stride(),
            delta_a.stride(0), delta_b.stride(0), D, H, BLOCK_T=block_t,
            num_warps=DELTA_WARPS, **chunks)
        kind = "bwd" if one_pass else "dkdv"
        longest = max(max_a, max_b)
        launch_attention(
            _co_attn_bwd_dkdv_kernel, kind, block_d,
            _configs(kind, block_d, one_pass and autotuning()),
            lambda m, n: (cdiv(longest, n), batch, 2 * H),
            (qa, ka, va_, qb, kb, vb, doa, dob, lse_a, lse_b, delta_a, delta_b, dka, dva, dkb,
             dvb, dq_acc_a, dq_acc_b, *common),
            dict(HAS_DROPOUT=(p_a > 0 or p_b > 0), ATOMIC_DQ=one_pass, **chunks),
            qa.device, longest,
            reset_to_zero=("dq_acc_a_ptr", "dq_acc_b_ptr") if one_pass else ())
        if one_pass:
            dqa, dqb = (t if qa.dtype == torch.float32 else t.to(qa.dtype)
                        for t in (dq_acc_a, dq_acc_b))
            return dqa, dka, dva, dqb, dkb, dvb
        cfg = _pick("dq", block_d)
        _co_attn_bwd_dq_kernel[(cdiv(max(max_a, max_b), cfg.block_m), batch, 2 * H)](
            qa, ka, va_, qb, kb, vb, doa, dob, lse_a, lse_b, delta_a, delta_b, dqa, dqb,
            *common, HAS_DROPOUT=(p_a > 0 or p_b > 0), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, **cfg.options, **chunks)
    return dqa, dka, dva, dqb, dkb, dvb



# ---------------------------------------------------------------------------------
# static report specs
# ---------------------------------------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    specs = []
    for kernel, kind in ((_co_attn_fwd_kernel, "fwd"), (_co_attn_bwd_dkdv_kernel, "bwd"),
                         (_co_attn_bwd_dkdv_kernel, "dkdv"), (_co_attn_bwd_dq_kernel, "dq")):
        for block_d in (d for d in (64, 80, 96, 128) if d in CONFIGS[kind]):
            for cfg in CONFIGS[kind][block_d]:  # the autotune space (the dq kernel: first)
                for dropout in (False, True):
                    for ints16 in (False, True):
                        specs.append(attention_spec(kernel, block_d, cfg, False, False, "bf16",
                                                    dropout=dropout, ints16=ints16,
                                                    atomic_dq=kind == "bwd"))
    for block_d in (64, 80, 96, 128):
        names = ("oa_ptr", "doa_ptr", "ob_ptr", "dob_ptr", "deltaa_ptr", "deltab_ptr")
        sig = {n: "*fp32" if n.startswith("delta") else "*bf16" for n in names}
        sig.update({n: "i32" for n in ("total_a", "total_b", "stride_at", "stride_ah")})
        sig.update({"stride_ad": "constexpr", "stride_bt": "i32", "stride_bh": "i32",
                    "stride_bd": "constexpr", "stride_lah": "i32", "stride_lbh": "i32",
                    "head_dim": "i32", "num_heads": "i32", "BLOCK_T": "constexpr",
                    "BLOCK_D": "constexpr"})
        specs.append(delta_spec(_co_attn_bwd_delta_kernel, "_co_attn_bwd_delta_kernel", sig, 6,
                                block_d, num_warps=DELTA_WARPS))
    return specs
