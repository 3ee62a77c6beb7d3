"""Static GPU resource report: ``python -m mmkernels.tools.kernel_report``.

Proves, without a GPU, that every kernel we ship is sound for sm_80 and sm_90:

* the CUDA extension's embedded cubins (``cuobjdump --list-elf``), one per arch of
  the build's ``TORCH_CUDA_ARCH_LIST`` (default: every arch torch ships, see
  :mod:`mmkernels._build_config`), and its PTX (``--list-ptx``);
* every Triton kernel registered in :data:`TRITON_KERNELS`, compiled ahead of time
  with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
  each configuration it can be launched with.

For each kernel it prints registers, spills (STACK and LOCAL bytes: ptxas puts
spilled registers in the stack frame) from ``cuobjdump --dump-resource-usage``,
shared memory, and the number of tensor-core instructions (HMMA on sm_80; HGMMA or
HMMA on sm_90) in the SASS.
For the extension's bandwidth-bound kernels it also counts the 16-byte global
loads and stores (``LDG.E.128`` / ``STG.E.128``) in the SASS: the token-gather row
movers must show both, the channels-last RoIAlign forward the loads
(:data:`VECTOR_IO`).
It exits 1 when a kernel spills, exceeds the SM's shared memory, when a
matmul-bearing kernel has no tensor-core instruction, when a kernel of
:data:`VECTOR_IO` lacks its 16-byte accesses, or (with
MMKERNELS_REQUIRE_CUDA=1, as in CI) when the extension has no cubin for an arch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from mmkernels._build_config import SMEM_LIMIT, default_cuda_arch_list, parse_arch_list

#: archs the Triton kernels are compiled for ahead of time
ARCHS = (80, 90)

#: extension kernels (regex on the short name) that must move 16-byte words:
#: (needs LDG.E.128, needs STG.E.128)
VECTOR_IO = {
    r"^_move_rows_kernel<": (True, True),          # token gathers: every row move
    r"^_roi_align_fwd_cl_vec_kernel<": (True, True),  # roi_align forward, channels-last
}


@dataclasses.dataclass
class KernelReport:
    source: str          # "cuda-ext" or "triton"
    name: str
    arch: int
    config: str
    regs: int
    stack: int
    local: int
    shared: int
    mma: int
    needs_mma: bool
    ldg128: int = 0
    stg128: int = 0
    needs_vec: tuple[bool, bool] = (False, False)

    def problems(self) -> list[str]:
        out = []
        if self.needs_vec[0] and self.ldg128 == 0:
            out.append("no 16-byte vector load (LDG.E.128) in the SASS")
        if self.needs_vec[1] and self.stg128 == 0:
            out.append("no 16-byte vector store (STG.E.128) in the SASS")
        if self.local > 0 or self.stack > 0:
            # ptxas places spilled registers in the stack frame (local memory)
            out.append(f"spills (stack {self.stack} B, local {self.local} B)")
        limit = SMEM_LIMIT.get(self.arch, min(SMEM_LIMIT.values()))
        if self.shared > limit:
            out.append(f"uses {self.shared} bytes of shared memory > {limit}")
        if self.needs_mma and self.mma == 0:
            out.append("has tl.dot but no tensor-core (HMMA/HGMMA) instruction")
        return out


def find_tool(name: str) -> str:
    """cuobjdump/nvdisasm: the copies shipped in the triton wheel, else CUDA_HOME, else PATH."""
    candidates = []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia",
                                       "bin", name))
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", name))
    for c in candidates:
        if os.path.exists(c):
            return c
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (looked in the triton wheel, CUDA_HOME, PATH)")


def _run(args: list[str]) -> str:
    # without LD_PRELOAD: under `make asan` the sanitizer runtimes are preloaded into
    # the test process, and nvcc (a tool, not our code) segfaults with them
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout


def _list(cuobjdump: str, what: str, so: str) -> str:
    """``cuobjdump --list-elf/--list-ptx``; empty when the file holds no device code
    (cuobjdump exits non-zero then)."""
    res = subprocess.run([cuobjdump, f"--list-{what}", so], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else ""


def expected_extension_archs() -> tuple[list[int], list[int]]:
    """(SASS archs, PTX archs) the extension is built for: the build's
    TORCH_CUDA_ARCH_LIST, or setup.py's default when it is unset."""
    return parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or default_cuda_arch_list())


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def _short(name: str) -> str:
    name = re.sub(r"^void |\(anonymous namespace\)::|mmkernels::|\w+::cuda::", "", name)
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return name


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin_or_so: str, cuobjdump: str, arch: int | None = None
                   ) -> dict[str, tuple[int, int, int, int]]:
    """{mangled function: (regs, stack, shared, local)} from --dump-resource-usage."""
    args = [cuobjdump, "--dump-resource-usage"]
    if arch is not None:
        args += ["-arch", f"sm_{arch}"]
    out = _run(args + [cubin_or_so])
    res, fn = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = _RES.search(line)
        if m and fn is not None:
            res[fn] = tuple(int(v) for v in m.groups())
            fn = None
    return res


def _sass_by_function(cubin_or_so: str, cuobjdump: str, arch: int | None = None
                      ) -> dict[str, list[str]]:
    """{mangled function: its SASS lines} from --dump-sass."""
    args = [cuobjdump, "--dump-sass"]
    if arch is not None:
        args += ["-arch", f"sm_{arch}"]
    out = _run(args + [cubin_or_so])
    funcs, fn = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            funcs[fn] = []
        elif fn is not None:
            funcs[fn].append(line)
    return funcs


def mma_counts(cubin_or_so: str, cuobjdump: str, arch: int | None = None) -> dict[str, int]:
    """{mangled function: number of HMMA/HGMMA instructions} from --dump-sass."""
    return {fn: sum(bool(re.search(r"\b(HGMMA|HMMA)\b", line)) for line in lines)
            for fn, lines in _sass_by_function(cubin_or_so, cuobjdump, arch).items()}


def vector_io_counts(cubin_or_so: str, cuobjdump: str, arch: int | None = None
                     ) -> dict[str, tuple[int, int]]:
    """{mangled function: (LDG.E.128 count, STG.E.128 count)} from --dump-sass
    (``LDG.E.128.CONSTANT`` counts as a load)."""
    return {fn: (sum(bool(re.search(r"\bLDG\.E\.128\b", line)) for line in lines),
                 sum(bool(re.search(r"\bSTG\.E\.128\b", line)) for line in lines))
            for fn, lines in _sass_by_function(cubin_or_so, cuobjdump, arch).items()}


def _needs_vec(short_name: str) -> tuple[bool, bool]:
    for pattern, need in VECTOR_IO.items():
        if re.search(pattern, short_name):
            return need
    return (False, False)


def source_reports(src: str, arch: int, workdir: str) -> list[KernelReport]:
    """Reports of the kernels of one of the extension's .cu files (they include no
    torch headers), compiled alone with nvcc for sm_<arch> into ``workdir``: the
    GPU_LESS.md recipe, without building the extension. Raises FileNotFoundError when
    nvcc or cuobjdump is missing."""
    cuobjdump = find_tool("cuobjdump")
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    if nvcc is None or not os.path.exists(nvcc):
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME)")
    csrc = os.path.dirname(os.path.dirname(os.path.abspath(src)))
    out = os.path.join(workdir, f"{os.path.basename(src)}.sm_{arch}.o")
    # torch's CUDAExtension flags that change what compiles (no implicit half/bf16
    # conversions), so a kernel that builds here builds in the extension too.
    flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    _run([nvcc, "-std=c++20", "--expt-relaxed-constexpr", *flags, f"-I{csrc}", f"-arch=sm_{arch}",
          "-c", src, "-o", out])
    return extension_reports(cuobjdump, out)[0]


def extension_path() -> str | None:
    spec = importlib.util.find_spec("mmkernels._C")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    return spec.origin


def extension_reports(cuobjdump: str, so: str | None = None, only: tuple[int, ...] | None = None
                      ) -> tuple[list[KernelReport], list[str]]:
    """Reports for every cubin in ``so`` (default: mmkernels._C), or for the archs in
    ``only``, and notes on what is missing."""
    so = so or extension_path()
    if so is None:
        return [], ["mmkernels._C is not built"]
    elfs = _list(cuobjdump, "elf", so)
    archs = sorted({int(a) for a in re.findall(r"\.sm_(\d+)\.cubin", elfs)})
    ptx = sorted({int(a) for a in re.findall(r"\.sm_(\d+)\.ptx", _list(cuobjdump, "ptx", so))})
    if not archs and not ptx:
        return [], ["mmkernels._C has no CUDA code (built with MMKERNELS_SKIP_CUDA=1, or "
                    "without nvcc/CUDA torch): only the Triton kernels are reported"]
    want_sass, want_ptx = expected_extension_archs()
    notes = []
    missing = [a for a in want_sass if a not in archs]
    if missing:
        notes.append(f"mmkernels._C has no cubin for sm_{', sm_'.join(map(str, missing))} "
                     "(built with another TORCH_CUDA_ARCH_LIST?)")
    missing_ptx = [a for a in want_ptx if a not in ptx]
    if missing_ptx:
        notes.append(f"mmkernels._C has no PTX for compute_{', compute_'.join(map(str, missing_ptx))}")
    reports = []
    for arch in archs:
        if only is not None and arch not in only:
            continue
        usage = resource_usage(so, cuobjdump, arch)
        mma = mma_counts(so, cuobjdump, arch)
        vio = vector_io_counts(so, cuobjdump, arch)
        names = _demangle(list(usage))
        for fn, (regs, stack, shared, local) in sorted(usage.items(), key=lambda kv: names[kv[0]]):
            short = _short(names[fn])
            ld, st = vio.get(fn, (0, 0))
            reports.append(KernelReport("cuda-ext", short, arch, "-", regs, stack, local, shared,
                                        mma.get(fn, 0), needs_mma=False, ldg128=ld, stg128=st,
                                        needs_vec=_needs_vec(short)))
    for arch in archs:  # a renamed kernel must not slip past the check
        for pattern in VECTOR_IO:
            if not any(r.arch == arch and re.search(pattern, r.name) for r in reports):
                notes.append(f"sm_{arch}: no extension kernel matches {pattern!r} (VECTOR_IO)")
    return reports, notes


def representative_specs(specs: list) -> list:
    """One configuration per kernel (``--compact``): the first whose config names D128
    or bf16 (the common production launch), else the kernel's first."""
    chosen: dict[str, object] = {}
    for spec in specs:
        best = chosen.get(spec.name)
        if best is None or (not _typical(best.config) and _typical(spec.config)):
            chosen[spec.name] = spec
    return list(chosen.values())


def _typical(config: str) -> bool:
    return bool(re.search(r"\bD128\b|\bbf16\b", config))


def _compile_spec(spec, arch: int, cuobjdump: str) -> list[KernelReport]:
    """AOT-compile one spec for one arch and read its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                    attrs=spec.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        path = f.name
    try:
        usage = resource_usage(path, cuobjdump)
        mma = mma_counts(path, cuobjdump)
    finally:
        os.unlink(path)
    return [KernelReport("triton", spec.name, arch, spec.config, regs, stack, local,
                         int(k.metadata.shared), mma.get(fn, 0), needs_mma=spec.needs_mma)
            for fn, (regs, stack, _shared, local) in usage.items()]


_WORKER_SPECS: list | None = None


def _compile_index(job: tuple[int, int, str]) -> list[KernelReport]:
    """Worker side of :func:`triton_reports`: specs are rebuilt in each worker process
    (they hold @triton.jit functions) and addressed by index."""
    global _WORKER_SPECS
    if _WORKER_SPECS is None:
        from mmkernels.triton import kernel_specs

        _WORKER_SPECS = kernel_specs()
    index, arch, cuobjdump = job
    return _compile_spec(_WORKER_SPECS[index], arch, cuobjdump)


def triton_reports(cuobjdump: str, archs: tuple[int, ...], only: str | None = None,
                   jobs: int = 1, compact: bool = False) -> list[KernelReport]:
    """AOT-compile every registered Triton kernel configuration for each arch (with
    `only`, those whose "name config" matches that regular expression; with `compact`,
    one representative configuration per kernel), in `jobs` processes. The order of
    the reports does not depend on `jobs`."""
    try:
        from mmkernels.triton import kernel_specs
    except ImportError:
        return []
    specs = kernel_specs()
    chosen = {id(s) for s in (representative_specs(specs) if compact else specs)}
    todo = [(i, arch, cuobjdump) for i, spec in enumerate(specs)
            if id(spec) in chosen and (not only or re.search(only, f"{spec.name} {spec.config}"))
            for arch in archs]
    if jobs <= 1 or len(todo) < 2:
        return [r for i, arch, _ in todo for r in _compile_spec(specs[i], arch, cuobjdump)]
    import concurrent.futures
    import multiprocessing

    # spawn, not fork: the parent has torch's thread pools running
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [r for rs in pool.map(_compile_index, todo, chunksize=4) for r in rs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.tools.kernel_report",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--no-extension", action="store_true",
                        help="skip the CUDA extension's cubins")
    parser.add_argument("--extension", help="the extension .so to inspect (default: mmkernels._C)")
    parser.add_argument("--only", metavar="REGEX",
                        help="only the kernels whose 'name config' matches (while iterating on "
                             "one kernel; CI runs the full report)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per core)")
    parser.add_argument("--compact", action="store_true",
                        help="one representative Triton configuration per kernel and arch "
                             "(seconds instead of minutes; the default builds them all)")
    args = parser.parse_args(argv)

    cuobjdump = find_tool("cuobjdump")
    reports, notes = [], []
    if not args.no_extension:
        reports, notes = extension_reports(cuobjdump, args.extension)
        if args.only:
            reports = [r for r in reports if re.search(args.only, f"{r.name} {r.config}")]
    if not args.no_triton:
        reports += triton_reports(cuobjdump, ARCHS, args.only, args.jobs, args.compact)
    failures = []
    print(f"{'source':<9} {'arch':<6} {'kernel':<58} {'config':<28} {'REG':>4} {'STACK':>5} "
          f"{'LOCAL':>5} {'SHARED':>7} {'MMA':>4} {'LD/ST128':>8}  status")
    for r in reports:
        probs = r.problems()
        status = "ok" if not probs else "FAIL: " + "; ".join(probs)
        if probs:
            failures.append(f"{r.name} sm_{r.arch} {r.config}: {'; '.join(probs)}")
        print(f"{r.source:<9} sm_{r.arch:<3} {r.name[:58]:<58} {r.config[:28]:<28} {r.regs:>4} "
              f"{r.stack:>5} {r.local:>5} {r.shared:>7} {r.mma:>4} "
              f"{f'{r.ldg128}/{r.stg128}':>8}  {status}")
    for n in notes:
        print("note:", n)
    if notes and os.environ.get("MMKERNELS_REQUIRE_CUDA", "0") == "1":
        failures += notes
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    if failures:
        print("\nkernel report FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nkernel report: {len(reports)} kernel builds, no spills, shared memory within "
          "limits, tensor cores where matmuls are, 16-byte vector loads/stores where "
          "required")
    return 0


if __name__ == "__main__":
    sys.exit(main())
