"""Tiny LLaVA samples and packs shared by tests/models/test_llava.py and
tests/test_data_packing.py (the generators live in :mod:`mmkernels.models.llava`)."""

from mmkernels.models.llava import synthetic_pack as make_pack
from mmkernels.models.llava import synthetic_samples as random_samples

__all__ = ["make_pack", "random_samples"]
