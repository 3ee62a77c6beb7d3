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
It exits 1 when a kernel spills, exceeds the SM's shared memory, when a
matmul-bearing kernel has no tensor-core instruction, or (with
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

    def problems(self) -> list[str]:
        out = []
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
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


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


def mma_counts(cubin_or_so: str, cuobjdump: str, arch: int | None = None) -> dict[str, int]:
    """{mangled function: number of HMMA/HGMMA instructions} from --dump-sass."""
    args = [cuobjdump, "--dump-sass"]
    if arch is not None:
        args += ["-arch", f"sm_{arch}"]
    out = _run(args + [cubin_or_so])
    counts, fn = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            counts[fn] = 0
            continue
        if fn is not None and re.search(r"\b(HGMMA|HMMA)\b", line):
            counts[fn] += 1
    return counts


def extension_path() -> str | None:
    spec = importlib.util.find_spec("mmkernels._C")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    return spec.origin


def extension_reports(cuobjdump: str, so: str | None = None) -> tuple[list[KernelReport], list[str]]:
    """Reports for every cubin in ``so`` (default: mmkernels._C), and notes on what is
    missing."""
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
        usage = resource_usage(so, cuobjdump, arch)
        mma = mma_counts(so, cuobjdump, arch)
        names = _demangle(list(usage))
        for fn, (regs, stack, shared, local) in sorted(usage.items(), key=lambda kv: names[kv[0]]):
            reports.append(KernelReport("cuda-ext", _short(names[fn]), arch, "-", regs, stack,
                                        local, shared, mma.get(fn, 0), needs_mma=False))
    return reports, notes


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
                   jobs: int = 1) -> list[KernelReport]:
    """AOT-compile every registered Triton kernel configuration for each arch (with
    `only`, those whose "name config" matches that regular expression), in `jobs`
    processes. The order of the reports does not depend on `jobs`."""
    try:
        from mmkernels.triton import kernel_specs
    except ImportError:
        return []
    specs = kernel_specs()
    todo = [(i, arch, cuobjdump) for i, spec in enumerate(specs)
            if not only or re.search(only, f"{spec.name} {spec.config}") for arch in archs]
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
    args = parser.parse_args(argv)

    cuobjdump = find_tool("cuobjdump")
    reports, notes = [], []
    if not args.no_extension:
        reports, notes = extension_reports(cuobjdump, args.extension)
        if args.only:
            reports = [r for r in reports if re.search(args.only, f"{r.name} {r.config}")]
    if not args.no_triton:
        reports += triton_reports(cuobjdump, ARCHS, args.only, args.jobs)
    failures = []
    print(f"{'source':<9} {'arch':<6} {'kernel':<58} {'config':<28} {'REG':>4} {'STACK':>5} "
          f"{'LOCAL':>5} {'SHARED':>7} {'MMA':>4}  status")
    for r in reports:
        probs = r.problems()
        status = "ok" if not probs else "FAIL: " + "; ".join(probs)
        if probs:
            failures.append(f"{r.name} sm_{r.arch} {r.config}: {'; '.join(probs)}")
        print(f"{r.source:<9} sm_{r.arch:<3} {r.name[:58]:<58} {r.config[:28]:<28} {r.regs:>4} "
              f"{r.stack:>5} {r.local:>5} {r.shared:>7} {r.mma:>4}  {status}")
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
          "limits, tensor cores where matmuls are")
    return 0


if __name__ == "__main__":
    sys.exit(main())
