"""Build mmkernels._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/**/*.cu) are built
when torch was built with CUDA and nvcc is found, even with no GPU present.

Environment:
  MMKERNELS_SKIP_CUDA=1   skip the .cu sources (CPU-only extension).
  MMKERNELS_REQUIRE_CUDA=1  fail instead of silently skipping the .cu sources (CI).
  TORCH_CUDA_ARCH_LIST    honoured; defaults to "8.0;9.0" when no GPU is visible.
  CUDA_HOME               toolkit directory (the one whose bin/ holds nvcc); found
                          from nvcc on PATH when unset.
  MMKERNELS_CPU_ARCH      -march for the C++ CPU kernels (default "native"; "" = compiler default).
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


def _extensions():
    want_cuda, why = _want_cuda()
    # Imported after CUDA_HOME is settled: cpp_extension reads it at import time.
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(root, "csrc")
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3", "-fopenmp"] if os.name != "nt" else ["/O2"]
    # The CPU kernels are compiled for the installing machine's CPU (AVX2/AVX-512
    # lanes for the channel loops), as DeepSpeed's CPU ops are. For a wheel or an
    # image that runs elsewhere, set MMKERNELS_CPU_ARCH to a portable target
    # (e.g. x86-64-v2), or to "" for the compiler's default.
    cpu_arch = os.environ.get("MMKERNELS_CPU_ARCH", "native")
    if cpu_arch and os.name != "nt":
        cxx_flags.append(f"-march={cpu_arch}")
    print(f"mmkernels: CUDA kernels {'ON (' + why + ')' if want_cuda else 'OFF (' + why + ')'}")
    if want_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension(
            "mmkernels._C",
            cpp_sources + cu_sources,
            include_dirs=[csrc],
            define_macros=[("MMKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )]
    return [CppExtension(
        "mmkernels._C",
        cpp_sources,
        include_dirs=[csrc],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
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
