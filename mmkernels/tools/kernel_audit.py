"""FLOP/traffic audit: ``python -m mmkernels.tools.kernel_audit`` (``make audit``).

Shows how efficient the GPU kernels are without a GPU (issues 12 and 13). Every
Triton kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1; the command sets
it) with its production launch configuration, the GPU tiles of ``CONFIGS``
(:func:`mmkernels.triton.production_tiles`), on moderate sizes, through the public
ops (forward, then backward). :mod:`mmkernels.tools.audit_counters` counts what
runs:

* executed MMA FLOPs, ``2 * M * N * K`` per ``tl.dot``, plus the GEMM FLOPs that
  run through torch (``FlopCounterMode``);
* bytes requested from global memory: Triton loads and stores with masked-off lanes
  excluded (atomics as a load and a store), plus an estimate for the torch ops that
  run around the kernels (each argument read and each output written once).

Inputs are float16: the counts depend on the dtype only through the launch
configs, and float16 takes the tensor-core tiles that bf16 takes. (The interpreter's
bf16 tl.dot is wrong, so bf16 cannot run here.)

For each op and mode it prints the executed FLOPs over the algorithm's minimum
(attention forward ``4 * pairs * H * D``, backward ``10 * pairs * H * D``, FA2's five
GEMMs, with pairs the visible (query, key) pairs summed over the sequences; the
contrastive losses in GEMM passes over B^2 * D, one pass = ``2 * B^2 * D``), bytes
requested against the inputs plus outputs, arithmetic intensity, and H100 times:
``roof`` for the executed work at 989 TFLOP/s (bf16 dense) and 3.35 TB/s, ``floor``
for the minimum FLOPs and bytes. The L2 cache is not modelled: the requested bytes
are an upper bound on DRAM traffic, and ``roof`` is an upper bound too.

It also computes, on the host, the backward grid of an MQA batch of one 4K-token
sequence (issue 12: at least as many programs as an H100 has SMs).

Then it checks :data:`BUDGETS`. By default it prints everything and marks the rows
over budget; ``--check`` exits 1 listing every enforced budget exceeded.
``--issue N`` (repeatable) audits only the op families of issue N's budgets and
enforces only those; ``--waive KEY`` (repeatable) reports a budget without enforcing
it (CI enforces every budget; a waiver is for a local run while work is open).
``--json PATH`` writes the results (schema ``mmkernels.kernel_audit/1``), ``--op``
selects op families, ``--quick`` takes small sizes (for tests: tile tails weigh
more there, so its verdicts are not the audit's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

from mmkernels.tools.audit_counters import Counts, measure

SCHEMA = "mmkernels.kernel_audit/1"
#: The roofline device: H100 SXM, dense bf16/fp16 tensor-core rate and HBM3 bandwidth.
H100 = {"name": "H100 SXM", "flops_per_s": 989e12, "bytes_per_s": 3.35e12}
OPS = ("varlen_attention", "co_attention", "contrastive")
#: the tile that the non-causal forward budget allows for ragged tails ("+ tail tiles")
TAIL_TILE = 128
#: the issue whose budgets each op family's audit computes
OP_ISSUES = {"varlen_attention": 12, "co_attention": 12, "contrastive": 13}
#: the MQA backward-grid case: query heads (PaliGemma's Gemma-2B: 8 heads, 1 kv head),
#: one sequence of this many tokens
MQA_GRID_HEADS, MQA_GRID_TOKENS = 8, 4096


@dataclasses.dataclass(frozen=True)
class Budget:
    text: str
    limit: float
    issue: int
    enforced: bool = True  # False: reported, but --check does not fail on it
    note: str = ""
    at_least: bool = False  # the value must be >= limit (else <=)


#: The budgets of issues 12 and 13. Each value is computed by the case that names it.
BUDGETS: dict[str, Budget] = {
    "varlen_fwd_noncausal": Budget(
        "varlen fwd, non-causal: executed / minimum", 1.0, 12,
        note="+ tail tiles: the limit is multiplied by the FLOPs of 128x128 tiles over the "
             "ragged lengths, over the minimum"),
    "varlen_fwd_causal_4096": Budget(
        "varlen fwd, causal, one sequence L=4096: executed / dense minimum", 0.52, 12),
    "varlen_bwd_fwd_noncausal": Budget("varlen bwd / fwd executed, non-causal", 2.5, 12),
    "varlen_bwd_fwd_causal": Budget("varlen bwd / fwd executed, causal", 2.5, 12),
    "varlen_bwd_fwd_blocks": Budget("varlen bwd / fwd executed, causal + block_ids", 2.5, 12),
    "co_attention_bwd_fwd": Budget("co-attention bwd / fwd executed", 2.5, 12),
    "varlen_bwd_mqa_grid": Budget(
        "varlen bwd grid, MQA H=8, batch 1, L=4096: programs (min over D)", 132, 12,
        at_least=True, note="host-side grid of the dK/dV kernel (both backward paths, "
                            "D=64/80/128/256): >= an H100's 132 SMs"),
    "d80_fwd": Budget("D=80 fwd: executed / useful", 1.2, 12),
    "d96_fwd": Budget("D=96 fwd: executed / useful", 1.2, 12),
    "d80_bwd": Budget("D=80 bwd: executed / useful", 1.2, 12),
    "d96_bwd": Budget("D=96 bwd: executed / useful", 1.2, 12),
    # D=72: the forward in 64 + 16 lanes (80 / 72 = 1.11), as D=80; the backward in 64 +
    # 32 (96 / 72 = 1.33), as every head dim in (64, 96]: a 16-lane chunk spills there
    "d72_fwd": Budget("D=72 fwd: executed / useful", 1.2, 12),
    "d72_bwd": Budget("D=72 bwd: executed / useful", 1.2, 12, enforced=False,
                      note="issue 12: <= 1.2 or say why: the backward's 16-lane chunk "
                           "spilled on sm_80 at every tile tried (head_chunks)"),
    "info_nce_passes": Budget("InfoNCE GEMM passes over B^2*D, fwd + bwd", 4.0, 13),
    "siglip_passes": Budget("SigLIP GEMM passes over B^2*D, fwd + bwd", 3.0, 13),
    "info_nce_stored": Budget(
        "InfoNCE bytes stored fwd + bwd / (2.5 x grads + one BxB write)", 1.0, 13),
    "siglip_stored": Budget(
        "SigLIP bytes stored fwd + bwd / (2.5 x grads + one BxB write)", 1.0, 13),
}


@dataclasses.dataclass
class Measurement:
    """One op in one mode ("fwd" or "bwd") on one case."""
    op: str
    case: str
    mode: str
    counts: Counts
    min_flops: int
    io_bytes: int

    @property
    def flops(self) -> int:
        return self.counts.flops

    @property
    def ratio(self) -> float:
        return self.flops / self.min_flops if self.min_flops else math.nan

    @property
    def bytes(self) -> int:
        return self.counts.bytes_loaded + self.counts.bytes_stored

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.nan

    def roof_s(self, device=H100) -> float:
        """H100 time of the executed work (upper bound: every requested byte from DRAM)."""
        return max(self.flops / device["flops_per_s"], self.bytes / device["bytes_per_s"])

    def floor_s(self, device=H100) -> float:
        """H100 time of the minimum FLOPs and of reading the inputs and writing the outputs once."""
        return max(self.min_flops / device["flops_per_s"], self.io_bytes / device["bytes_per_s"])

    def as_dict(self) -> dict:
        c = self.counts
        return {
            "op": self.op, "case": self.case, "mode": self.mode,
            "flops": {"executed": self.flops, "triton_mma": c.mma_flops,
                      "torch": sum(c.torch_flops.values()), "minimum": self.min_flops,
                      "executed_over_minimum": self.ratio},
            "bytes": {"requested": self.bytes, "loaded": c.bytes_loaded, "stored": c.bytes_stored,
                      "torch_ops": c.torch_bytes, "inputs_outputs": self.io_bytes},
            "intensity_flop_per_byte": self.intensity,
            "h100_roof_s": self.roof_s(), "h100_floor_s": self.floor_s(),
            "kernels": [k.as_dict() for k in c.kernels.values()],
            "torch_flops": dict(c.torch_flops),
            "torch_ops": {k: {"calls": v[0], "bytes_read": v[1], "bytes_written": v[2]}
                          for k, v in c.torch_ops.items()},
        }


@dataclasses.dataclass
class Check:
    """A budget evaluated on a measured value."""
    key: str
    value: float
    limit: float

    @property
    def budget(self) -> Budget:
        return BUDGETS[self.key]

    @property
    def over(self) -> bool:
        if self.budget.at_least:
            return not self.value >= self.limit
        return not self.value <= self.limit  # NaN is over

    def as_dict(self) -> dict:
        b = self.budget
        return {"key": self.key, "text": b.text, "issue": b.issue, "value": self.value,
                "limit": self.limit, "at_least": b.at_least, "enforced": b.enforced,
                "over": self.over, "note": b.note}


@dataclasses.dataclass
class AuditResult:
    measurements: list[Measurement]
    checks: list[Check]
    quick: bool = False
    seconds: float = 0.0
    waived: frozenset = frozenset()  # budget keys reported but not enforced (--waive)
    issues: frozenset = frozenset()  # enforce only these issues' budgets (--issue); all if empty

    def enforced(self, check: Check) -> bool:
        b = check.budget
        return (b.enforced and check.key not in self.waived
                and (not self.issues or b.issue in self.issues))

    def over_budget(self) -> list[Check]:
        """The enforced budgets exceeded (what --check fails on)."""
        return [c for c in self.checks if c.over and self.enforced(c)]

    def as_dict(self) -> dict:
        return {"schema": SCHEMA, "device_model": dict(H100), "quick": self.quick,
                "seconds": self.seconds,
                "measurements": [m.as_dict() for m in self.measurements],
                "budgets": [c.as_dict() for c in self.checks]}


# ---------------------------------------------------------------------------------
# minimum formulas
# ---------------------------------------------------------------------------------


def attention_pairs(lengths_q, lengths_k, causal: bool, block_ids: torch.Tensor | None = None) -> int:
    """Visible (query, key) pairs summed over the sequences: Lq * Lk without a mask;
    causal (bottom-right aligned, as the kernels): query i sees keys j <= i + Lk - Lq;
    with block_ids (Lq == Lk, ids packed as the queries), counted from
    :func:`mmkernels.reference.attention_visibility`."""
    from mmkernels import reference

    total, start = 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        if not causal:
            total += lq * lk
        elif block_ids is not None:
            bid = block_ids[start:start + lq]
            total += int(reference.attention_visibility(lq, lk, True, bid, bid).sum())
        else:  # sum over i of clamp(i + 1 + lk - lq, 0, lk)
            total += sum(min(lk, max(0, i + 1 + lk - lq)) for i in range(lq))
        start += lq
    return total


def attention_min_flops(pairs: int, heads: int, head_dim: int, mode: str) -> int:
    """The forward's two GEMMs (S = QK^T, O = PV): 4 * pairs * H * D; the backward's
    five (FA2: S, dP = dO V^T, dV = P^T dO, dK = dS^T Q, dQ = dS K): 10 * pairs * H * D."""
    per_pair = {"fwd": 4, "bwd": 10}[mode]
    return per_pair * pairs * heads * head_dim


def contrastive_pass_flops(batch: int, dim: int) -> int:
    """One GEMM pass over the B x B similarities: 2 * B^2 * D."""
    return 2 * batch * batch * dim


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# ---------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------


def _lens(lengths) -> str:
    return ",".join(map(str, lengths))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _leaf(gen, *shape, dtype=torch.float16):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).requires_grad_()


def run_varlen(case: str, lengths, heads: int, head_dim: int, causal: bool = False,
               block_ids: torch.Tensor | None = None, backward: bool = True
               ) -> list[Measurement]:
    """mmkernels.varlen_attention on one packed batch (seqlen_q == seqlen_k), float16."""
    import mmkernels

    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (_leaf(gen, total, heads, head_dim) for _ in range(3))
    cu = _cu(lengths)
    pairs = attention_pairs(lengths, lengths, causal, block_ids)
    with measure() as fwd:
        out, lse = mmkernels.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths),
                                              causal=causal, block_ids=block_ids,
                                              return_lse=True)
    res = [Measurement("varlen_attention", case, "fwd", fwd,
                       attention_min_flops(pairs, heads, head_dim, "fwd"),
                       _nbytes(q, k, v, cu, block_ids, out, lse))]
    if backward:
        do = torch.randn(out.shape, generator=gen).to(out.dtype)
        with measure() as bwd:
            out.backward(do)
        res.append(Measurement("varlen_attention", case, "bwd", bwd,
                               attention_min_flops(pairs, heads, head_dim, "bwd"),
                               _nbytes(do, q, k, v, out, lse, cu, block_ids, q.grad, k.grad, v.grad)))
    return res


def run_co_attention(case: str, lengths_a, lengths_b, heads: int, head_dim: int
                     ) -> list[Measurement]:
    """mmkernels.co_attention (both directions in one launch), float16."""
    import mmkernels

    gen = torch.Generator().manual_seed(0)
    ta, tb = sum(lengths_a), sum(lengths_b)
    qa, ka, va = (_leaf(gen, ta, heads, head_dim) for _ in range(3))
    qb, kb, vb = (_leaf(gen, tb, heads, head_dim) for _ in range(3))
    cu_a, cu_b = _cu(lengths_a), _cu(lengths_b)
    pairs = 2 * attention_pairs(lengths_a, lengths_b, False)  # A->B and B->A
    with measure() as fwd:
        oa, ob = mmkernels.co_attention(qa, ka, va, qb, kb, vb, cu_a, cu_b, max(lengths_a),
                                        max(lengths_b))
    lse_bytes = 4 * heads * (ta + tb)  # the saved log-sum-exps (float32)
    inputs = (qa, ka, va, qb, kb, vb, cu_a, cu_b)
    res = [Measurement("co_attention", case, "fwd", fwd,
                       attention_min_flops(pairs, heads, head_dim, "fwd"),
                       _nbytes(*inputs, oa, ob) + lse_bytes)]
    doa = torch.randn(oa.shape, generator=gen).to(oa.dtype)
    dob = torch.randn(ob.shape, generator=gen).to(ob.dtype)
    with measure() as bwd:
        torch.autograd.backward((oa, ob), (doa, dob))
    grads = [t.grad for t in inputs[:6]]
    res.append(Measurement("co_attention", case, "bwd", bwd,
                           attention_min_flops(pairs, heads, head_dim, "bwd"),
                           _nbytes(*inputs, oa, ob, doa, dob, *grads) + lse_bytes))
    return res


def run_contrastive(loss: str, batch: int, dim: int) -> list[Measurement]:
    """mmkernels.info_nce / sigmoid_contrastive, one process, float16 features.
    The minimum is one GEMM pass (2 * B^2 * D), so executed / minimum reads as passes."""
    import mmkernels

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    img, txt = (t.half().requires_grad_() for t in (img, txt))
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True) if loss == "sigmoid_contrastive" else None
    params = [t for t in (scale, bias) if t is not None]
    with measure() as fwd:
        if bias is None:
            value = mmkernels.info_nce(img, txt, scale)
        else:
            value = mmkernels.sigmoid_contrastive(img, txt, scale, bias)
    with measure() as bwd:
        value.backward()
    one_pass = contrastive_pass_flops(batch, dim)
    case = f"B={batch} D={dim} fp16"
    return [Measurement(loss, case, "fwd", fwd, one_pass, _nbytes(img, txt, *params, value)),
            Measurement(loss, case, "bwd", bwd, one_pass,
                        _nbytes(img, txt, *params, img.grad, txt.grad, *[p.grad for p in params]))]


def run_open_clip(loss: str, batch: int, dim: int) -> list[Measurement] | None:
    """The baseline a user would run instead: open_clip's ClipLoss / SigLipLoss on the
    same float16 features (eager torch: the B x B logits are materialised). Reported
    for comparison (bytes, arithmetic intensity), never budgeted. None without
    open_clip."""
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    img, txt = (t.half().requires_grad_() for t in (img, txt))
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    params = [scale] if loss == "info_nce" else [scale, bias]
    with measure() as fwd:
        if loss == "info_nce":
            value = ClipLoss()(img, txt, scale)
        else:
            value = SigLipLoss()(img, txt, scale, bias)
    with measure() as bwd:
        value.backward()
    one_pass = contrastive_pass_flops(batch, dim)
    case = f"B={batch} D={dim} fp16"
    name = "open_clip " + ("Clip" if loss == "info_nce" else "SigLip")  # ClipLoss, SigLipLoss
    return [Measurement(name, case, "fwd", fwd, one_pass, _nbytes(img, txt, *params, value)),
            Measurement(name, case, "bwd", bwd, one_pass,
                        _nbytes(img, txt, *params, img.grad, txt.grad, *[p.grad for p in params]))]


def _tail_allowance(lengths) -> float:
    """FLOPs of TAIL_TILE x TAIL_TILE tiles over the lengths, over the exact pairs."""
    t = TAIL_TILE
    padded = sum((-(-lq // t) * t) ** 2 for lq in lengths)
    return padded / sum(lq * lq for lq in lengths)


def _image_blocks(lengths, spans) -> torch.Tensor:
    """block_ids for packed sequences: spans[b] = [(start, stop), ...] image blocks of
    sequence b (local positions), numbered 1, 2, ... across the batch."""
    bid = torch.zeros(sum(lengths), dtype=torch.int32)
    start, next_id = 0, 1
    for length, blocks in zip(lengths, spans):
        for a, b in blocks:
            bid[start + a:start + min(b, length)] = next_id
            next_id += 1
        start += length
    return bid


def audit_varlen(quick: bool) -> tuple[list[Measurement], list[Check]]:
    """Ragged lengths for the forward's tail budget; lengths that are multiples of 128
    (every tile) for the bwd / fwd ratios, so that tail tiles do not blur the GEMM
    counts (causal diagonal tiles still do, less as L grows)."""
    ragged = [100, 37] if quick else [300, 517, 77, 1000]
    aligned = [256, 128] if quick else [768, 256]
    spans = [[(5, 60)], [(0, 64)]] if quick else [[(10, 154), (300, 500)], [(0, 64)]]
    long_l = 512 if quick else 4096
    d_len = 128 if quick else 512
    H, D = 2, 64
    ms, checks = [], []
    tails = run_varlen(f"non-causal L={_lens(ragged)} H={H} D={D}", ragged, H, D, backward=False)
    ms += tails
    checks.append(Check("varlen_fwd_noncausal", tails[0].ratio, _tail_allowance(ragged)))
    desc = f"L={_lens(aligned)} H={H} D={D}"
    for key, causal, bid in (("noncausal", False, None), ("causal", True, None),
                             ("blocks", True, _image_blocks(aligned, spans))):
        case = ("causal+blocks " if bid is not None else "causal " if causal
                else "non-causal ") + desc
        f, b = run_varlen(case, aligned, H, D, causal=causal, block_ids=bid)
        ms += [f, b]
        checks.append(Check(f"varlen_bwd_fwd_{key}", ratio(b.flops, f.flops), 2.5))
    long = run_varlen(f"causal L={long_l} H=1 D={D}", [long_l], 1, D, causal=True,
                      backward=False)
    ms += long
    dense = attention_min_flops(long_l * long_l, 1, D, "fwd")
    checks.append(Check("varlen_fwd_causal_4096", ratio(long[0].flops, dense),
                        BUDGETS["varlen_fwd_causal_4096"].limit))
    checks.append(Check("varlen_bwd_mqa_grid", mqa_grid_programs(),
                        BUDGETS["varlen_bwd_mqa_grid"].limit))
    # head dims: one tile-aligned sequence, so only the padding of D shows. The
    # backward's useful FLOPs: the D=64 backward's, scaled by D / 64 (its GEMM count
    # cancels; the bwd / fwd budgets cover that).
    native = run_varlen(f"non-causal L={d_len} H=1 D=64", [d_len], 1, 64)
    ms += native
    for d in (72, 80, 96):
        f, b = run_varlen(f"non-causal L={d_len} H=1 D={d}", [d_len], 1, d)
        ms += [f, b]
        checks.append(Check(f"d{d}_fwd", f.ratio, BUDGETS[f"d{d}_fwd"].limit))
        checks.append(Check(f"d{d}_bwd", ratio(b.flops, native[1].flops * d / 64),
                            BUDGETS[f"d{d}_bwd"].limit))
    return ms, checks


def mqa_grid_programs() -> int:
    """The fewest programs the backward's dK/dV kernel is launched with for MQA
    (:data:`MQA_GRID_HEADS` query heads, one kv head), batch 1, one sequence of
    :data:`MQA_GRID_TOKENS` tokens, over head dims 64/80/128/256 and both backward
    paths, off CUDA (an H100's 132 SMs as the target): computed on the host with the
    launcher's own grid function, no kernel runs."""
    from mmkernels.triton import varlen_attention

    return min(math.prod(varlen_attention.dkdv_grid(MQA_GRID_TOKENS, 1, MQA_GRID_HEADS, 1, d,
                                                    deterministic=det))
               for d in (64, 80, 128, 256) for det in (False, True))


def audit_co_attention(quick: bool) -> tuple[list[Measurement], list[Check]]:
    """Lengths that are multiples of 128 (see :func:`audit_varlen`)."""
    la, lb = ([128, 128], [128, 128]) if quick else ([384, 256], [128, 256])
    ms = run_co_attention(f"A L={_lens(la)} x B L={_lens(lb)} H=2 D=64", la, lb, 2, 64)
    return ms, [Check("co_attention_bwd_fwd", ratio(ms[1].flops, ms[0].flops), 2.5)]


def audit_contrastive(quick: bool) -> tuple[list[Measurement], list[Check]]:
    """B a multiple of every tile and D of every feature slice: passes are whole."""
    B, D = (256, 128) if quick else (1024, 256)
    ms, checks = [], []
    for loss, key in (("info_nce", "info_nce"), ("sigmoid_contrastive", "siglip")):
        f, b = run_contrastive(loss, B, D)
        ms += [f, b]
        checks.append(Check(f"{key}_passes", ratio(f.flops + b.flops, f.min_flops),
                            BUDGETS[f"{key}_passes"].limit))
        grads = 2 * B * D * 2  # d_image, d_text in float16
        stored = f.counts.bytes_stored + b.counts.bytes_stored
        checks.append(Check(f"{key}_stored", ratio(stored, 2.5 * grads + B * B * 2), 1.0))
        baseline = run_open_clip(loss, B, D)  # for comparison only: no budget
        ms += baseline or []
    return ms, checks


AUDITS = {"varlen_attention": audit_varlen, "co_attention": audit_co_attention,
          "contrastive": audit_contrastive}


def _require_interpreter() -> None:
    """The counters hook the interpreter, and triton decides when a function is defined
    whether it is interpreted (triton's own tl.sum and friends: when mmkernels is
    imported), so TRITON_INTERPRET=1 must be set before anything imports triton."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    from mmkernels.triton import varlen_attention

    if not (isinstance(standard.sum, InterpretedFunction)
            and isinstance(varlen_attention._varlen_attn_fwd_kernel, InterpretedFunction)):
        raise RuntimeError("the kernel audit runs the kernels in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing mmkernels (python -m "
                           "mmkernels.tools.kernel_audit does it itself)")


def run(ops=OPS, quick: bool = False) -> AuditResult:
    """Run the audits of `ops` (names in :data:`OPS`) with the production tiles (the
    caller sets :attr:`AuditResult.waived` / :attr:`AuditResult.issues`)."""
    from mmkernels.triton import production_tiles

    _require_interpreter()
    start = time.perf_counter()
    ms, checks = [], []
    with production_tiles():
        for op in ops:
            m, c = AUDITS[op](quick)
            ms += m
            checks += c
    return AuditResult(ms, checks, quick, time.perf_counter() - start)


# ---------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------


def _shapes(shapes) -> str:
    return ", ".join("x".join(map(str, s)) for s in sorted(shapes))


def format_table(result: AuditResult, kernels: bool = True) -> str:
    mb = 1e-6
    lines = [
        "FLOP/traffic audit: Triton interpreter, production tiles, float16 (H100 times: 989 "
        "TFLOP/s, 3.35 TB/s)",
        "exec/min: executed FLOPs (Triton MMA + torch GEMMs) / the algorithm's minimum "
        "(attention fwd 4*pairs*H*D, bwd 10*pairs*H*D; contrastive: GEMM passes over B^2*D)",
        "MB req: bytes requested (Triton loads + stores, masked lanes excluded; torch ops "
        "estimated); MB io: inputs + outputs once.",
        "roof: H100 time of the executed work. L2 hits are not modelled: the bytes, and so "
        "roof, are an upper bound on DRAM traffic. floor: minimum FLOPs and io bytes.",
        "Kernel lines: launches, programs, MMA GFLOP, MB loaded / stored, tl.dot shapes "
        "M x N x K (the tiles that ran). L: sequence lengths.",
        "",
        f"{'op':<20}{'case':<38}{'mode':<5}{'GFLOP':>9}{'exec/min':>9}{'MB req':>9}"
        f"{'MB io':>8}{'req/io':>7}{'FLOP/B':>8}{'roof us':>9}{'floor us':>9}",
    ]
    for m in result.measurements:
        lines.append(
            f"{m.op:<20}{m.case[:37]:<38}{m.mode:<5}{m.flops / 1e9:>9.3f}{m.ratio:>9.3f}"
            f"{m.bytes * mb:>9.2f}{m.io_bytes * mb:>8.2f}{ratio(m.bytes, m.io_bytes):>7.1f}"
            f"{m.intensity:>8.1f}{m.roof_s() * 1e6:>9.2f}{m.floor_s() * 1e6:>9.2f}")
        if not kernels:
            continue
        for k in m.counts.kernels.values():
            lines.append(
                f"    {k.name:<34} {k.launches} launch, {k.programs} programs, "
                f"{k.mma_flops / 1e9:.3f} GFLOP, MB ld {k.bytes_loaded * mb:.2f} st "
                f"{k.bytes_stored * mb:.2f}" + (f" atomic {k.atomic_bytes * mb:.2f}"
                                               if k.atomic_bytes else "")
                + f"; dots {_shapes(k.dot_shapes)}")
        c = m.counts
        if c.torch_ops or c.torch_flops:
            top = sorted(c.torch_ops.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))[:3]
            lines.append(
                f"    {'torch ops':<34} {sum(c.torch_flops.values()) / 1e9:.3f} GFLOP, MB "
                f"{c.torch_bytes * mb:.2f} ("
                + ", ".join(f"{n} {v[0]}x {(v[1] + v[2]) * mb:.2f}" for n, v in top) + ")")
    lines += ["", f"{'budget':<66}{'issue':>6}{'value':>9}{'limit':>12}  verdict"]
    for c in result.checks:
        b = c.budget
        verdict = "ok" if not c.over else ("OVER" if result.enforced(c)
                                           else "over (not enforced)")
        limit = f"{'>= ' if b.at_least else ''}{c.limit:.3f}"
        lines.append(f"{b.text[:65]:<66}{b.issue:>6}{c.value:>9.3f}{limit:>12}  {verdict}")
    notes = {c.budget.note for c in result.checks if c.budget.note}
    lines += [f"  note: {n}" for n in sorted(notes)]
    lines.append(f"\n{len(result.over_budget())} enforced budget(s) exceeded; "
                 f"{result.seconds:.0f} s{' (--quick)' if result.quick else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.tools.kernel_audit",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", choices=OPS,
                        help="audit only this op family (repeatable; default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes (tests)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when an enforced budget is exceeded")
    parser.add_argument("--issue", action="append", type=int, metavar="N",
                        help="audit the op families of issue N's budgets and enforce only "
                             "those (repeatable; default: every issue)")
    parser.add_argument("--waive", action="append", default=[], choices=sorted(BUDGETS),
                        metavar="KEY", help="report budget KEY without enforcing it "
                                            "(repeatable)")
    parser.add_argument("--no-kernels", action="store_true", help="omit the per-kernel lines")
    args = parser.parse_args(argv)
    ops = tuple(op for op in OPS if (not args.op or op in args.op)
                and (not args.issue or OP_ISSUES[op] in args.issue))
    result = run(ops, quick=args.quick)
    result.waived = frozenset(args.waive)
    result.issues = frozenset(args.issue or ())
    print(format_table(result, kernels=not args.no_kernels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=1)
    over = result.over_budget()
    if args.check and over:
        print("kernel_audit: over budget:\n" + "\n".join(
            f"  {c.budget.text} (issue {c.budget.issue}): {c.value:.3f} > {c.limit:.3f}"
            for c in over), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        # mmkernels (imported before this module runs) has imported triton already:
        # start again with the interpreter selected from the first import
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "mmkernels.tools.kernel_audit",
                                  *sys.argv[1:]])
    sys.exit(main())
