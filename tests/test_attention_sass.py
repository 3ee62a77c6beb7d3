"""Masks only where needed (issue 12 §3): the SASS of the forward's interior key loop
carries no per-lane masking on its loads. Compiled ahead of time for sm_80 (no GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mmkernels.tools.kernel_report import find_tool

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


_COMPILE = """
import subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmkernels.tools.kernel_report import find_tool
from mmkernels.triton import varlen_attention as tva
(spec,) = [s for s in tva.kernel_specs() if s.name == sys.argv[1] and s.config == sys.argv[2]]
assert spec.constexprs["EVEN_D"] and not spec.constexprs["CAUSAL"]
src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                attrs=spec.attrs)
k = triton.compile(src, target=GPUTarget("cuda", int(sys.argv[3]), 32), options=spec.options)
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"])
    f.flush()
    print(subprocess.run([find_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True,
                         text=True, check=True).stdout)
"""


def _sass(name: str, config: str, arch: int = 80) -> list[tuple[int, str]]:
    """(address, instruction) of a kernel_specs() entry compiled for sm_<arch>, in a
    subprocess: the tests run under TRITON_INTERPRET=1, which AOT compilation cannot."""
    if find_tool("cuobjdump") is None:
        pytest.skip("no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _COMPILE, name, config, str(arch)], env=env,
                         capture_output=True, text=True, check=True, cwd=root).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in _LINE.finditer(out)]


def _loops(sass):
    """[(start, end)] of every backward branch (a loop) whose body holds tensor-core MMAs."""
    loops = []
    for addr, ins in sass:
        m = re.match(r"(@!?U?P\d+\s+)?BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
        if m and m.group(2) and int(m.group(2), 16) < addr:
            start = int(m.group(2), 16)
            if any("HMMA" in i for a, i in sass if start <= a <= addr):
                loops.append((start, addr))
    return loops


def _load_predicates(sass, start, end):
    """Global loads in [start, end]: (guard predicates, LDGSTS zero-fill predicates)."""
    guards, fills = set(), set()
    for a, ins in sass:
        if not start <= a <= end or not re.search(r"\bLDG(STS)?\b", ins):
            continue
        g = re.match(r"@(!?P\d+)", ins)
        if g:
            guards.add(g.group(1))
        f = re.search(r"LDGSTS\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(!?P\d+)", ins)
        if f:
            fills.add(f.group(1))
    return guards, fills


def test_forward_interior_loop_loads_are_unmasked():
    """The non-causal forward with EVEN_D (head dim 64: no lane mask) has two key loops
    with tensor cores: the interior one, whose K/V loads (LDGSTS, pipelined) all share
    one predicate, the software pipeline's "this prefetch is in range" bit (the same for
    every lane), and the boundary loop, whose loads carry per-row bounds predicates.
    Before the loop split there was one loop, with per-row predicates on every tile."""
    sass = _sass("_varlen_attn_fwd_kernel", "full D64 M128-N64-w8-s3 ints%16")
    loops = _loops(sass)
    assert len(loops) == 2, loops
    interior, boundary = sorted(loops)
    guards, fills = _load_predicates(sass, *interior)
    assert not guards, f"predicated global loads in the interior loop: {guards}"
    assert len(fills) <= 1, f"per-lane zero-fill masks in the interior loop: {fills}"
    b_guards, b_fills = _load_predicates(sass, *boundary)
    assert len(b_guards | b_fills) >= 2, "the boundary loop should mask rows"
