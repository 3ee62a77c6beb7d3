"""Build mmkernels._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/**/*.cu) are built
when torch was built with CUDA and nvcc is found, even with no GPU present.

Environment:
  MMKERNELS_SKIP_CUDA=1   skip the .cu sources (CPU-only extension).
  MMKERNELS_REQUIRE_CUDA=1  fail instead of silently skipping the .cu sources (CI).
  TORCH_CUDA_ARCH_LIST    honoured; when unset, every arch the installed torch was built
                          for (torch.cuda.get_arch_list(): 7.5;8.0;8.6;9.0;10.0;12.0 for
                          torch 2.14.1+cu130), with PTX for the newest, so every GPU torch
                          runs on has SASS or can JIT the PTX.
  CUDA_HOME               toolkit directory (the one whose bin/ holds nvcc); found
                          from nvcc on PATH when unset.
  MMKERNELS_CPU_ARCH      -march for the C++ CPU kernels. Default "" (the compiler's
                          portable default, as torch's own wheels); "native" is an opt-in
                          for a build that only ever runs on the building machine.
                          Floating-point contraction is off in every case
                          (-ffp-contract=off), so the arch never changes the numbers.
  MAX_JOBS                parallel compile jobs (ninja).
"""

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup


def _find_cuda_home():
    """Return the CUDA toolkit directory, or None.

    torch guesses the parent of the nvcc on PATH, which is wrong when nvcc is a
    wrapper script (as in /usr/local/bin here); ask nvcc where it lives instead.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return None


def _want_cuda():
    if os.environ.get("MMKERNELS_SKIP_CUDA", "0") == "1":
        return False, "MMKERNELS_SKIP_CUDA=1"
    import torch

    if torch.version.cuda is None:
        why = "torch was built without CUDA"
    else:
        home = _find_cuda_home()
        if home is not None and os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return True, home
        why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if os.environ.get("MMKERNELS_REQUIRE_CUDA", "0") == "1":
        raise RuntimeError(f"MMKERNELS_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return False, why


def _build_config():
    """mmkernels/_build_config.py, loaded by path (the package is not built yet)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmkernels", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_mmkernels_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    import torch

    _build_config().check_torch_version(torch.__version__)
    want_cuda, why = _want_cuda()
    # Imported after CUDA_HOME is settled: cpp_extension reads it at import time.
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(root, "csrc")
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # Portable by default: a wheel or image built on an AVX-512 host must not die
    # with SIGILL elsewhere. -ffp-contract=off keeps a*b+c as two roundings on every
    # target, so "native" (opt-in) changes speed, never results.
    cxx_flags = (["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"] if os.name != "nt"
                 else ["/O2", "/std:c++20"])
    cpu_arch = os.environ.get("MMKERNELS_CPU_ARCH", "")
    if cpu_arch and os.name != "nt":
        cxx_flags.append(f"-march={cpu_arch}")
    extra_cxx = os.environ.get("MMKERNELS_EXTRA_CFLAGS", "").split()
    cxx_flags += extra_cxx
    print(f"mmkernels: CUDA kernels {'ON (' + why + ')' if want_cuda else 'OFF (' + why + ')'}")
    if want_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _build_config().default_cuda_arch_list()
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension(
            "mmkernels._C",
            cpp_sources + cu_sources,
            include_dirs=[csrc],
            define_macros=[("MMKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"] + extra_cxx,
        )]
    return [CppExtension(
        "mmkernels._C",
        cpp_sources,
        include_dirs=[csrc],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] + extra_cxx,
    )]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


setup(
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
