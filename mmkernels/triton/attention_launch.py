"""Host side of the attention kernels shared by varlen attention and co-attention:
the launch-config type, head-dim padding, Philox argument packing, window bounds, the
image-block reach tables, the delta pre-kernel and dropout-mask launches, and the
:class:`KernelSpec` builder of the static report. The config tables live next to their
kernels (:mod:`mmkernels.triton.varlen_attention`, :mod:`mmkernels.triton.co_attention`).
Nothing here imports :mod:`mmkernels.ops`."""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mmkernels.triton import KernelSpec, cdiv, cuda_sm_count, device_guard, interpreting
from mmkernels.triton.attention import PHILOX_ARGS, _attn_bwd_delta_kernel, _dropout_mask_kernel


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    #: ptxas register cap (Triton's ``maxnreg``). None: ptxas chooses, and for some
    #: kernels it aims at a count that costs occupancy nothing but spills a few cold
    #: values (128 or 168 registers); 255, the architecture's limit, lets it keep them
    maxnreg: int | None = None

    def __str__(self) -> str:
        r = f"-r{self.maxnreg}" if self.maxnreg else ""
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}{r}"

    @property
    def options(self) -> dict:
        """The compile options of a launch (num_warps, num_stages, maxnreg if set)."""
        out = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            out["maxnreg"] = self.maxnreg
        return out


# CPU interpreter: small tiles, ragged tails (mmkernels.triton.production_tiles() overrides)
INTERPRET_CONFIG = AttnConfig(16, 16, 4, 1)

# ---------------------------------------------------------------------------------
# autotuning (GPUs)
# ---------------------------------------------------------------------------------
#
# On a GPU the attention kernels are launched through triton.autotune over their
# kernel's config list (CONFIGS[kind][padded D] next to each kernel: every entry
# compiled spill-free for sm_80 and sm_90, light and heavy variants, by the kernel
# report). The tuning key is (architecture, padded D, causal, image blocks, max_seqlen
# bucket): one triton Autotuner per (kernel, kind, compute capability, padded D,
# bucket), keyed inside by the CAUSAL and HAS_BLOCKS arguments (and, as Triton does,
# the tensors' dtypes). So no kernel argument is added for the key, and two GPUs of
# different architectures in one process never share a choice. One config, no
# benchmark: under the interpreter (production_tiles() included: the audit counts the
# first entry), on the deterministic backward and under
# torch.use_deterministic_algorithms(True) (a timing-dependent choice would change the
# accumulation order, hence the bits, from one process to the next: as cudnn.benchmark
# is off there), and with MMKERNELS_AUTOTUNE=0.

_TUNERS: dict[tuple, object] = {}


def autotuning() -> bool:
    """Whether launches autotune: on a GPU, outside deterministic algorithms, unless
    MMKERNELS_AUTOTUNE=0."""
    return (not interpreting() and os.environ.get("MMKERNELS_AUTOTUNE", "1") != "0"
            and not torch.are_deterministic_algorithms_enabled())


def seqlen_bucket(max_seqlen: int) -> int:
    """The max_seqlen part of the tuning key: the next power of two, from 256 to 16384."""
    return min(max(1 << max(int(max_seqlen) - 1, 0).bit_length(), 256), 16384)


def reset_autotune() -> None:
    """Forget every autotuning choice (tests)."""
    _TUNERS.clear()


def launch_attention(kernel, kind: str, block_d: int, configs: Sequence[AttnConfig],
                     grid: Callable[[int, int], tuple], args: Sequence, kwargs: dict,
                     device: torch.device, max_seqlen: int,
                     reset_to_zero: Sequence[str] = ()) -> None:
    """Launch `kernel` (args, then the constexpr/keyword kwargs) over grid(BLOCK_M,
    BLOCK_N): with configs[0] when there is one config, else autotuned over `configs`
    (see above). reset_to_zero: the buffers the kernel accumulates into (the one-pass
    backward's float32 dQ), zeroed before every benchmark run and after the choice."""
    if len(configs) == 1:
        c = configs[0]
        kernel[grid(c.block_m, c.block_n)](*args, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                                           **c.options, **kwargs)
        return
    import triton

    key = (kernel.fn.__name__, kind, torch.cuda.get_device_capability(device), block_d,
           seqlen_bucket(max_seqlen))
    tuner = _TUNERS.get(key)
    if tuner is None:
        tuner = triton.autotune(
            [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, **c.options)
             for c in configs],
            key=["CAUSAL", "HAS_BLOCKS"], reset_to_zero=list(reset_to_zero) or None)(kernel)
        _TUNERS[key] = tuner
    tuner[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **kwargs)


#: The dK/dV kernel's head-split arguments (see :func:`head_splits`): never
#: specialised, so that one split (== 1) compiles no kernel variant of its own.
SPLIT_ARGS = ("head_splits", "heads_per_split")
#: SMs the head split aims to fill off CUDA (an H100 SXM's), so that the interpreter
#: exercises the split path as a GPU would.
DEFAULT_SMS = 132


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CUDA), else :data:`DEFAULT_SMS`."""
    return cuda_sm_count(device) if device.type == "cuda" else DEFAULT_SMS


def head_splits(programs: int, group: int, sms: int) -> int:
    """Splits of a GQA/MQA backward's query-head loop: the dK/dV grid offers
    `programs` programs (key tiles x sequences x kv heads), each looping over the
    `group` query heads of its kv head. Below `sms` programs, the group is cut into
    the fewest equal parts (a divisor of `group`) that bring the grid to `sms`, or
    into single heads; each part's program writes float32 partial dK/dV that the
    launcher sums in a fixed order. One split when the grid already fills the GPU or
    group == 1. (Equal parts keep the tile's head loop as it is: a part is a group of
    group // splits heads of its own.)"""
    if group <= 1 or programs <= 0 or programs >= sms:
        return 1
    want = cdiv(sms, programs)
    return next((d for d in range(want, group) if group % d == 0), group)


def sum_head_splits(parts: Tensor, splits: int, dtype: torch.dtype) -> Tensor:
    """dK or dV from the float32 partials (total_k, H_kv * splits, D) of
    :func:`head_splits`: summed over the splits in their order (0, 1, ...), so the
    result is the same run to run, then cast to `dtype`."""
    total, hs, d = parts.shape
    parts = parts.view(total, hs // splits, splits, d)
    acc = parts[:, :, 0].clone()
    for s in range(1, splits):
        acc += parts[:, :, s]
    return acc if dtype == torch.float32 else acc.to(dtype)


def block_d_for(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def head_chunks(head_dim: int, backward: bool = False, deterministic: bool = False
                ) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D1): the head dim's two chunks of lanes in the kernels, a power of
    two and 0, 16 or 32. Head dims in (64, 96] run as 64 + 16 or 64 + 32 lanes instead of
    padding to 128, which would waste 37-44% of the MMA work; every other head dim pads
    to a power of two (BLOCK_D1 = 0). The launch-config bucket of a head dim is the sum
    of its chunks.

    Forward: D = 72 and 80 in 80 lanes, D = 96 in 96. Backward (`backward`: the dK/dV
    and dQ kernels; the delta pre-kernels have no MMA and take either, varlen's the
    forward's chunks, co-attention's its backward's): every head dim in (64, 96] in 96
    lanes. A 16-lane chunk does
    not fit the backward's registers: its dK/dV kernel spilled 8-376 bytes on sm_80 at
    every tile tried (M16/M32 x N32/N64 x 4/8 warps, kernel report), so D = 80 wastes
    1/6 of the backward's MMA work (96 / 80 = 1.2) and D = 72 a quarter (96 / 72).
    The deterministic backward (`deterministic`: its dK/dV and dQ kernels) pads them to
    128: its dK/dV kernel spilled 32-296 bytes on sm_80 with 64 + 32 lanes at every
    tile tried (M16/M32 x N32/N64 x 4/8 warps)."""
    if 64 < head_dim <= 96 and not deterministic:
        return 64, 16 if head_dim <= 80 and not backward else 32
    return block_d_for(head_dim), 0




def philox_args(seed: int, offset: int) -> tuple[int, int, int, int]:
    """Kernel arguments (seed_lo, seed_hi, ctr_lo, ctr_hi): the 64-bit key and the
    64-bit counter base offset // 4, as signed int32 halves (Triton launches ints
    below 2^31 as int32: the argument types never depend on the values)."""
    def s32(x):
        x &= 0xFFFFFFFF
        return x - (1 << 32) if x >= 1 << 31 else x
    seed &= (1 << 64) - 1
    ctr = (offset & ((1 << 64) - 1)) >> 2
    return s32(seed), s32(seed >> 32), s32(ctr), s32(ctr >> 32)


def window_args(window: tuple[int, int], causal: bool, total_q: int, total_k: int
                 ) -> tuple[bool, int, int]:
    """(HAS_WINDOW, left, right) for the kernels: an unbounded side (-1) becomes a bound
    that never binds (left >= seqlen_k - 1, right >= seqlen_q - 1; the packed token
    counts bound both), so the kernels test both sides with int32 arithmetic; with
    causal only the left side counts (right is 0)."""
    left, right = window
    has = left >= 0 or (right >= 0 and not causal)
    left = total_k if left < 0 else min(left, total_k)
    right = 0 if causal else (total_q if right < 0 else min(right, total_q))
    return has, left, right


def block_tables(block_ids: Tensor, cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Per-token reach tables for causal attention with image blocks (no host sync).

    reach[i]: last key (local index) query i sees = max(i, last position of i's block);
    reach_back[j]: first query that sees key j = min(j, first position of j's block).
    Both (total,) int32; block id 0 means "no block". Tiles outside these ranges are
    skipped by the kernels.
    """
    device = block_ids.device
    batch = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    seq = torch.repeat_interleave(torch.arange(batch, device=device), cu.diff(),
                                  output_size=total)
    pos = torch.arange(total, device=device) - cu[seq]
    ids = block_ids.long()
    key = (seq << 32) | (ids & 0xFFFFFFFF)
    order = torch.argsort(key, stable=True)
    sk = key[order]
    new = torch.ones_like(sk, dtype=torch.long)
    new[1:] = (sk[1:] != sk[:-1]).long()
    gid = torch.empty_like(order)
    gid[order] = torch.cumsum(new, 0) - 1
    last = torch.full((total,), -1, dtype=torch.long, device=device).scatter_reduce(
        0, gid, pos, "amax")
    first = torch.full((total,), total, dtype=torch.long, device=device).scatter_reduce(
        0, gid, pos, "amin")
    in_block = ids != 0
    reach = torch.where(in_block, torch.maximum(pos, last[gid]), pos)
    reach_back = torch.where(in_block, torch.minimum(pos, first[gid]), pos)
    return reach.to(torch.int32), reach_back.to(torch.int32)


def delta_block_t(block_d: int) -> int:
    """Tokens per program of the delta pre-kernel: about 8192 elements per operand tile
    (block_d: the head-dim bucket, the sum of the chunks)."""
    return max(16, 1 << (8192 // block_d).bit_length() - 1)


def attention_delta(out: Tensor, do: Tensor) -> Tensor:
    """delta = rowsum(dO * O): (H, total) float32 from out, do (total, H, D) in their own
    dtype and strides, by :func:`mmkernels.triton.attention._attn_bwd_delta_kernel`
    (no float32 copies of O or dO)."""
    total, H, D = out.shape
    delta = torch.empty(H, total, dtype=torch.float32, device=out.device)
    if delta.numel():
        block_d, block_d1 = head_chunks(D)
        block_t = delta_block_t(block_d + block_d1)
        with device_guard(out.device):
            _attn_bwd_delta_kernel[(cdiv(total, block_t), H)](
                out, do, delta, total, D, *out.stride(), *do.stride(), delta.stride(0),
                BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_D1=block_d1,
                EVEN_D=D == block_d + block_d1, num_warps=4)
    return delta


def dropout_keep_launch(seed, offset, stream0, rows, num_cols, dropout_p, num_heads, device,
                 carry_by_compare=False):
    rows = rows.to(device=device, dtype=torch.int32).contiguous()
    mask = torch.zeros(num_heads, rows.numel(), num_cols, dtype=torch.int8, device=device)
    if mask.numel():
        with device_guard(device):
            _dropout_mask_kernel[(cdiv(rows.numel(), 16), num_heads)](
                mask, rows, rows.numel(), num_cols, mask.stride(0), mask.stride(1),
                float(dropout_p), *philox_args(seed, offset), stream0, BLOCK_M=16, BLOCK_N=16,
                CARRY_BY_COMPARE=carry_by_compare)
    return mask.bool()


def attention_spec(kernel, block_d: int, cfg: AttnConfig, causal: bool, blocks: bool,
                   dtype: str, dropout: bool = False, ints16: bool = False, window: bool = False,
                   softcap: bool = False, atomic_dq: bool = False, split: bool = False
                   ) -> KernelSpec:
    """A KernelSpec for an attention kernel, specialised as a real launch on contiguous
    (total, heads, D) tensors is: the head-dim strides (stride_*d) are 1, the other
    strides and the pointers are multiples of 16. Pointers: lse/delta float32,
    cu/bid/reach int32, the rest `dtype`; sizes and window bounds int32;
    scale/p/softcap float32, dq_acc float32. window / softcap / atomic_dq: the
    HAS_WINDOW / HAS_SOFTCAP / ATOMIC_DQ variants (kernels without those constexprs
    ignore them). block_d: the head-dim bucket (:func:`head_chunks`: 80 and 96 run in
    two chunks). split: dk/dv are the float32 partials of a head split
    (:func:`head_splits`; kernels with a dk_ptr). ints16: the
    integer arguments (head dim, max_seqlen_k, seed, group) are multiples of 16 too, as
    Triton specialises such launches separately (head dims 64/80/128 always are), except
    the Philox and head-split arguments, which the kernels never specialise
    (PHILOX_ARGS, SPLIT_ARGS)."""
    names = list(inspect.signature(kernel.fn).parameters)
    d0, d1 = head_chunks(block_d)
    # EVEN_D (head dim == the chunks: no lane masks) goes with ints16, as head dims
    # 64/80/96/128/256 launch it (a padded multiple of 16 such as 48 is not checked)
    consts = {"CAUSAL": causal, "HAS_BLOCKS": blocks, "HAS_DROPOUT": dropout,
              "HAS_WINDOW": window, "HAS_SOFTCAP": softcap, "ATOMIC_DQ": atomic_dq,
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": d0, "BLOCK_D1": d1,
              "EVEN_D": ints16}
    consts = {k: v for k, v in consts.items() if k in names}
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n.startswith("stride_") and n.endswith("d") and n != "stride_dkh":
            sig[n] = "constexpr"
            consts[n] = 1
        elif n.endswith("_ptr"):
            if n.startswith(("lse", "delta", "dq_acc")) or (split and n in ("dk_ptr", "dv_ptr")):
                sig[n] = "*fp32"
            elif n.startswith(("cu", "bid", "reach")):
                sig[n] = "*i32"
            else:
                sig[n] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("sm_scale", "dropout_p", "softcap"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride_") or (ints16 and n not in PHILOX_ARGS + SPLIT_ARGS):
                attrs[(i,)] = [["tt.divisibility", 16]]
    tag = ("causal+blocks" if blocks else "causal" if causal else "full")
    tag += "+window" if window and "HAS_WINDOW" in consts else ""
    tag += "+softcap" if softcap and "HAS_SOFTCAP" in consts else ""
    tag += "+dropout" if dropout else ""
    tag += " one-pass" if atomic_dq and "ATOMIC_DQ" in consts else ""
    tag += " split" if split and "dk_ptr" in names else ""
    tag += f" D{block_d} {cfg}" + (" ints%16" if ints16 else "")
    return KernelSpec(kernel.fn.__name__, kernel, sig, consts,
                      cfg.options, tag,
                      attrs=attrs)


def delta_spec(kernel, name: str, sig: dict, num_ptrs: int, block_d: int,
               num_warps: int) -> KernelSpec:
    """A KernelSpec of a delta pre-kernel (no MMA): head-dim strides 1, the first
    `num_ptrs` pointers multiples of 16; block_d the head-dim bucket (EVEN_D off)."""
    consts = {n: 1 for n, t in sig.items() if t == "constexpr" and n.startswith("stride_")}
    d0, d1 = head_chunks(block_d)
    sig = {**sig, "BLOCK_D1": "constexpr", "EVEN_D": "constexpr"}
    consts.update(BLOCK_T=delta_block_t(block_d), BLOCK_D=d0, BLOCK_D1=d1, EVEN_D=False)
    return KernelSpec(name, kernel, sig, consts, {"num_warps": num_warps, "num_stages": 1},
                      f"D{block_d}", needs_mma=False,
                      attrs={(i,): [["tt.divisibility", 16]] for i in range(num_ptrs)})
