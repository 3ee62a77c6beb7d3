"""Packed multimodal attention: ``varlen_attention`` (flash_attn_varlen_func semantics,
plus image blocks that see each other inside a causal sequence).

Layers: Triton kernels, their launch configs, launchers and static-report specs in
mmkernels/triton/varlen_attention.py (on the shared core in mmkernels/triton/attention.py
and its host side, attention_launch.py); here, two opaque ``torch.library.custom_op``s
(forward, backward) with fake kernels and autograd, then the functional API with
validation (mmkernels/ops/_attention_checks.py) and the backend choice; the module is
:class:`mmkernels.nn.VarlenSelfAttention`. mmkernels.triton never imports mmkernels.ops.

Backends (chosen in :func:`mmkernels.ops._attention_checks._uses_triton`): CUDA
tensors, or any tensors under ``TRITON_INTERPRET=1``: Triton. CPU tensors: the CPU
path of mmkernels/ops/_attention_cpu.py, per sequence and row chunk, never padded:
torch's fused CPU flash-attention kernel (aten._scaled_dot_product_flash_attention_for_cpu,
forward and backward) for float32/bfloat16/float16 without dropout; otherwise the
explicit path of :mod:`mmkernels.reference` (float64, or dropout with a regenerable
mask). ``MMKERNELS_BACKEND=reference``: eager autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmkernels import _extension, reference
from mmkernels.ops import _attention_checks as _chk
from mmkernels.ops._attention_checks import (
    _check_op_inputs,
    _check_qkv,
    check_cu_seqlens,
    check_dropout_p,
    check_softcap,
    check_window_size,
)
from mmkernels.ops._attention_cpu import (
    _cpu_bwd,
    _cpu_bwd_fused,
    _cpu_fwd,
    _cpu_fwd_fused,
    _keep_heads,
    _lazy_keep_masks,
    _use_fused_cpu,
)

__all__ = ["varlen_attention", "dropout_keep_mask"]


# ---------------------------------------------------------------------------------
# dropout: Philox state (seed, offset), one mask definition for every backend
# ---------------------------------------------------------------------------------


def _int64_bits(x: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits (schema ints are int64)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def philox_state(device: torch.device, increment: int,
                 dropout_seed: int | None = None) -> tuple[int, int]:
    """The (seed, offset) of one dropout call, as int64 bit patterns.

    CUDA tensors: reserved from the device's default CUDA generator with
    ``Generator.philox_state(increment)``, PyTorch's own protocol: reproducible
    under ``torch.manual_seed``, and the offset advances per call, so no two calls
    (nor PyTorch's own random kernels) share a Philox counter. CPU tensors (the
    interpreter and the CPU path; torch's CPU generator is not Philox), and any device
    under ``torch.compile``: a fresh 64-bit seed drawn from the CPU default generator,
    offset 0 (reproducible under ``torch.manual_seed``; two calls collide only if two
    64-bit draws do).
    ``dropout_seed`` (testing hook): that seed, offset 0.
    """
    if dropout_seed is not None:
        return _int64_bits(int(dropout_seed)), 0
    # Dynamo cannot trace Generator.philox_state: under torch.compile the seed is a
    # fresh 64-bit draw (offset 0), as on CPU, which traces without a graph break.
    if device.type == "cuda" and not torch.compiler.is_compiling():
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dropout_p > 0 is not supported under CUDA graph capture (the "
                               "Philox seed and offset would be baked into the graph); "
                               "capture with dropout_p=0")
        index = device.index if device.index is not None else torch.cuda.current_device()
        seed, offset, _ = torch.cuda.default_generators[index].philox_state(increment)
        return int(seed.item()), int(offset.item())
    return int(torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64).item()), 0



def dropout_increment(max_seqlen_k: int) -> int:
    """Philox values one call reserves: each (stream, row) subsequence uses one value
    per key column, one counter (4 values) per four columns."""
    return 4 * ((max(int(max_seqlen_k), 1) + 3) // 4)


def deterministic_backward(deterministic: bool) -> bool:
    """The deterministic backward runs when asked for (``deterministic=True``) or under
    ``torch.use_deterministic_algorithms(True)`` (read when the backward runs)."""
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------------
# torch.library ops: forward, backward, fake kernels, autograd
# ---------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                          cu_seqlens_k: Tensor, block_ids: Tensor | None, max_seqlen_q: int,
                          max_seqlen_k: int, softmax_scale: float, causal: bool,
                          dropout_p: float, seed: int, offset: int, window_left: int = -1,
                          window_right: int = -1, softcap: float = 0.0,
                          deterministic: bool = False) -> tuple[Tensor, Tensor]:
    _check_op_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids)
    window = (window_left, window_right)
    if _chk._uses_triton(q.device):
        from mmkernels.triton import varlen_attention as tva

        return tva.launch_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, max_seqlen_q,
                           max_seqlen_k, softmax_scale, causal, dropout_p, seed, offset, window,
                           softcap)
    if _use_fused_cpu(q, k, dropout_p, softcap=softcap):
        return _cpu_fwd_fused(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, softmax_scale,
                              causal, window)
    out, lse = _cpu_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, softmax_scale, causal,
                        dropout_p, seed, offset, window=window, softcap=softcap)
    return out.contiguous(), lse.contiguous()


@_varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, dropout_p, seed, offset, window_left=-1, window_right=-1, softcap=0.0,
      deterministic=False):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("mmkernels::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          block_ids: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, dropout_p: float,
                          seed: int, offset: int, window_left: int = -1, window_right: int = -1,
                          softcap: float = 0.0, deterministic: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor]:
    _check_op_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids)
    for t, n in ((grad_out, "grad_out"), (out, "out")):
        if t.shape != q.shape:
            raise ValueError(f"{n} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must have shape (H, total_q) = {(q.shape[1], q.shape[0])}, got "
                         f"{tuple(lse.shape)}")
    window = (window_left, window_right)
    if _chk._uses_triton(q.device):
        from mmkernels.triton import varlen_attention as tva

        return tva.launch_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_ids,
                           max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p, seed,
                           offset, window, softcap,
                              deterministic_backward(deterministic))
    if _use_fused_cpu(q, k, dropout_p, backward=True, softcap=softcap):
        return _cpu_bwd_fused(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_ids,
                              softmax_scale, causal, window)
    return _cpu_bwd(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, softmax_scale,
                    causal, dropout_p, seed, offset, window=window, softcap=softcap)


@_varlen_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_ids, max_seqlen_q,
      max_seqlen_k, softmax_scale, causal, dropout_p, seed, offset, window_left=-1,
      window_right=-1, softcap=0.0, deterministic=False):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, block_ids, max_q, max_k, scale, causal, dropout_p, seed,
     offset, *rest) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, block_ids)
    ctx.args = (max_q, max_k, scale, causal, dropout_p, seed, offset, *rest)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, block_ids = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                       block_ids, *ctx.args)
    return (dq, dk, dv) + (None,) * 14


_varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int | Tensor, max_seqlen_k: int | Tensor,
                     dropout_p: float = 0.0, softmax_scale: float | None = None,
                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                     deterministic: bool = False, return_attn_probs: bool = False, *,
                     block_ids: Tensor | None = None, return_lse: bool = False,
                     dropout_seed: int | None = None):
    """Attention over packed variable-length sequences, ``flash_attn_varlen_func``'s
    signature and positional order (existing callers switch by changing the import).

    Args:
        q: (total_q, H, D); k, v: (total_k, H_kv, D) with H % H_kv == 0 (GQA/MQA).
            float16/bfloat16/float32 (float64 on the CPU path); any D <= 256 (padded
            internally to a power of two); any strides.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 offsets of the sequences, on q's
            device: 0 first, non-decreasing, total_q (total_k) last; zero lengths are
            allowed.
        max_seqlen_q, max_seqlen_k: >= the longest sequence lengths: Python ints, or
            0-dim integer Tensors. A Tensor is never read on the host (no sync, so
            ``torch.compile`` and CUDA-graph capture need no ``.item()``): the grid is
            sized from the packed token count instead (extra programs exit at once) and
            the bound is checked by a device-side assert.
        dropout_p: dropout on the attention probabilities, in [0, 1). Philox4x32-10 with
            a (seed, offset) state as PyTorch's (see :func:`philox_state`); every
            backend (Triton, the CPU path, ``MMKERNELS_BACKEND=reference``) draws the
            same mask for the same state (:func:`mmkernels.reference.dropout_keep`),
            and the backward regenerates it. Use 0 in evaluation.
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned causal mask when seqlen_q != seqlen_k, as flash-attn.
        window_size: (left, right) sliding-window (local) attention as flash-attn: query i
            sees keys j with i + off - left <= j <= i + off + right, off = seqlen_k -
            seqlen_q; -1 leaves a side unbounded. With causal the right side is 0 (as
            flash-attn). Key tiles outside the window are skipped by the kernels.
        softcap: > 0 caps the scaled scores, S = softcap * tanh(S / softcap) (Gemma-2,
            PaliGemma-2), in the forward and the backward; 0 disables it.
        alibi_slopes: not supported (must be None).
        deterministic: selects the deterministic backward (also taken under
            ``torch.use_deterministic_algorithms(True)``). The default backward (Triton)
            is FA2's one pass: dK/dV per key tile and dQ added with float32 atomics, so
            dQ may differ in its last bits from run to run. The deterministic one
            computes dQ in a second kernel without atomics, recomputing S and dP: 7
            GEMMs per tile pair instead of 5 (1.4x the MMA work of the backward), and
            no float32 dQ buffer. The CPU path is deterministic either way.
        return_attn_probs: not supported (must be False): the kernels never form the
            probabilities. Use ``return_lse=True`` for the log-sum-exp.
        block_ids: optional (total_q,) int32; requires cu_seqlens_q == cu_seqlens_k. With
            causal=True, two tokens of one sequence with the same non-zero id see each
            other both ways (an image's patches attend bidirectionally, text stays
            causal). With a window, block visibility is added on top of the windowed
            causal mask: a patch always sees its whole image, also outside the window.
            Ignored without causal.
        return_lse: also return the log-sum-exp (H, total_q) float32 (not differentiable).
        dropout_seed: testing hook; the Philox seed, with offset 0 (default: the
            state reserved from torch's default generator). :func:`dropout_keep_mask`
            returns the same mask.

    Returns:
        out (total_q, H, D) in q's dtype; with return_lse, (out, lse). A query row with
        no visible key (causal with seqlen_q > seqlen_k, a window, an empty key
        sequence) outputs zeros and lse = -inf (flash-attn also writes zeros; its lse
        there is +inf).
        Gradients flow to q, k and v (see ``deterministic``).

    Raises:
        TypeError / ValueError naming the offending argument (shapes, dtypes, devices,
        offsets, window_size, softcap; on CUDA the offset checks are device-side
        asserts, without a sync); NotImplementedError for alibi_slopes and
        return_attn_probs.
    """
    _check_qkv(q, k, v)
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported by mmkernels.varlen_attention "
                                  "(pass None)")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs=True is not supported: the kernels never "
                                  "form the attention probabilities (return_lse=True returns "
                                  "the log-sum-exp)")
    check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q", "max_seqlen_q",
                     "q", q.device)
    check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k", "max_seqlen_k",
                     "k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1} sequences")
    if block_ids is not None:
        if not isinstance(block_ids, Tensor) or block_ids.dtype != torch.int32:
            raise TypeError("block_ids must be an int32 Tensor")
        if block_ids.shape != (q.shape[0],):
            raise ValueError(f"block_ids must have shape (total_q,) = ({q.shape[0]},), got "
                             f"{tuple(block_ids.shape)}")
        if block_ids.device != q.device:
            raise ValueError(f"block_ids must be on q's device ({q.device}), got "
                             f"{block_ids.device}")
        if q.shape[0] != k.shape[0]:
            raise ValueError("block_ids requires seqlen_q == seqlen_k for every sequence "
                             "(cu_seqlens_q == cu_seqlens_k)")
        if q.device.type in ("cuda", "meta") or torch.compiler.is_compiling():
            torch._assert_async((cu_seqlens_q == cu_seqlens_k).all(),
                                "block_ids requires cu_seqlens_q == cu_seqlens_k")
        elif not torch.equal(cu_seqlens_q, cu_seqlens_k):
            raise ValueError("block_ids requires seqlen_q == seqlen_k for every sequence "
                             "(cu_seqlens_q == cu_seqlens_k)")
    dropout_p = check_dropout_p(dropout_p)
    causal = bool(causal)
    window = check_window_size(window_size, causal)
    softcap = check_softcap(softcap)
    deterministic = bool(deterministic)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    # a sequence is never longer than its packed tensor: bounds the grid however large
    # the caller's max_seqlen is (a Tensor max_seqlen is never read: the count bounds it)
    max_q = q.shape[0] if isinstance(max_seqlen_q, Tensor) else min(max_seqlen_q, q.shape[0])
    max_k = k.shape[0] if isinstance(max_seqlen_k, Tensor) else min(max_seqlen_k, k.shape[0])
    seed = offset = 0
    if dropout_p > 0:
        seed, offset = philox_state(q.device, dropout_increment(max_k), dropout_seed)
    if _extension.backend_override() == "reference":
        keep = None
        if dropout_p > 0:
            keep = _lazy_keep_masks(seed, offset, cu_seqlens_q, cu_seqlens_k, q.shape[1],
                                    dropout_p, device=q.device)
        out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,
                                              block_ids, dropout_p, keep, window_size=window,
                                              softcap=softcap)
    else:
        out, lse = _varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids,
                                         int(max_q), int(max_k), scale, causal, dropout_p,
                                         seed, offset, window[0], window[1], softcap,
                                         deterministic)
    return (out, lse) if return_lse else out


def dropout_keep_rows(seed: int, offset: int, stream: int, rows: Tensor, num_cols: int,
                      dropout_p: float, device: torch.device | str | None = None) -> Tensor:
    """Testing hook: (len(rows), num_cols) bool, element (packed query row rows[i], key
    column j) of dropout stream `stream` under Philox state (seed, offset), drawn by the
    kernels' own :func:`mmkernels.triton.attention._dropout_keep` when `device` runs
    Triton (CUDA, or the interpreter), else by :func:`mmkernels.reference.dropout_keep`
    (on the C++ op mmkernels::dropout_keep when built; all agree bit for bit)."""
    device = torch.device(device) if device is not None else rows.device
    if not _chk._uses_triton(device):
        return _keep_heads(seed, offset, stream, 1, rows.cpu(), torch.arange(num_cols),
                           dropout_p)[0]
    return _triton_keep(seed, offset, stream, rows, num_cols, dropout_p, 1, device)[0]


def _triton_keep(seed, offset, stream0, rows, num_cols, dropout_p, num_heads, device,
                 carry_by_compare=False):
    from mmkernels.triton.attention_launch import dropout_keep_launch

    return dropout_keep_launch(seed, offset, stream0, rows, num_cols, dropout_p, num_heads,
                               device, carry_by_compare)


def dropout_keep_mask(seed: int, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, num_heads: int,
                      dropout_p: float, *, offset: int = 0, stream0: int = 0,
                      device: torch.device | str = "cpu") -> list[Tensor]:
    """Testing hook: the keep-masks that ``varlen_attention(..., dropout_seed=seed)``
    used (offset 0), one (H, seqlen_q, seqlen_k) bool tensor per sequence, on the CPU
    (for a per-sequence reference). ``stream0`` selects the direction in co-attention
    (0 for A->B, H for B->A). On a Triton device the kernels' mask function computes
    it, elsewhere :func:`mmkernels.reference.dropout_keep_masks` (on the C++ op when
    built)."""
    device = torch.device(device)
    if not _chk._uses_triton(device):
        return reference.dropout_keep_masks(seed, offset, cu_seqlens_q.cpu(),
                                            cu_seqlens_k.cpu(), num_heads, dropout_p, stream0,
                                            generate=_keep_heads)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    batch = len(cq) - 1
    num_cols = max((ck[b + 1] - ck[b] for b in range(batch)), default=0)
    mask = _triton_keep(seed, offset, stream0, torch.arange(cq[-1]), num_cols, dropout_p,
                        num_heads, device).cpu()
    return [mask[:, cq[b]:cq[b + 1], : ck[b + 1] - ck[b]] for b in range(batch)]
