"""Build defaults shared by ``setup.py``, the kernel report and the tests.

Plain Python with no import of :mod:`mmkernels` or of the extension, so that
``setup.py`` can load it by path before the package is built.
"""

from __future__ import annotations

#: the oldest torch the extension builds against: the C++ sources are C++20
#: (std::bit_cast, and torch >= 2.13's headers themselves require C++20); checked by
#: building and testing against torch 2.13.0 and 2.14.1.
MIN_TORCH = (2, 13)


def check_torch_version(version: str) -> None:
    """Raise a RuntimeError naming the minimum when ``version`` is older than MIN_TORCH."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_TORCH:
        raise RuntimeError(
            f"mmkernels needs torch>={'.'.join(map(str, MIN_TORCH))} (its C++ sources are C++20, "
            f"as are torch's own headers from 2.13); found torch {version}")


#: usable shared memory per block (bytes, the opt-in maximum) by SM version
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
              90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 110: 227 * 1024,
              120: 99 * 1024, 121: 99 * 1024}

#: the CUDA 13 range, used when torch reports no arch list
FALLBACK_ARCHS = ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0")


def torch_cuda_archs() -> list[int]:
    """SM versions the installed torch ships kernels for (e.g. [75, 80, 86, 90, 100, 120])."""
    import torch

    archs = set()
    for name in torch.cuda.get_arch_list():
        if name.startswith("sm_") and name[3:].isdigit():
            archs.add(int(name[3:]))
    if not archs:
        archs = {int(a.replace(".", "")) for a in FALLBACK_ARCHS}
    return sorted(archs)


def default_cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` when unset: every arch torch ships, PTX on the newest.

    A cubin for sm_XY runs on every sm_XZ with Z >= Y (8.0 serves 8.6/8.9, 10.0
    serves 10.3, 12.0 serves 12.1), and the driver JIT-compiles the newest arch's PTX
    for any later GPU, so the extension runs wherever torch does. Without a GPU,
    ``torch.cuda.get_arch_list()`` still reports what torch was compiled for.
    """
    archs = [f"{a // 10}.{a % 10}" for a in torch_cuda_archs()]
    archs[-1] += "+PTX"
    return ";".join(archs)


def parse_arch_list(value: str) -> tuple[list[int], list[int]]:
    """``"8.0;9.0+PTX"`` -> (SASS archs [80, 90], PTX archs [90])."""
    sass, ptx = [], []
    for item in value.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        base = item.split("+")[0]
        num = int(base.replace(".", ""))
        sass.append(num)
        if item.endswith("+PTX"):
            ptx.append(num)
    return sorted(set(sass)), sorted(set(ptx))
