"""Data utilities for vision-language training: :class:`VLMPackingCollator` packs
samples with images into one padding-free row (``cu_seq_lens``, ``position_ids``,
``block_ids``, ``labels``; Hugging Face's field names), see :mod:`mmkernels.data.packing`.
"""

from mmkernels.data.packing import IGNORE_INDEX, VLMPackingCollator, image_block_ids

__all__ = ["VLMPackingCollator", "image_block_ids", "IGNORE_INDEX"]
