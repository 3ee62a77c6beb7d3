"""mmkernels: fused kernels for vision-language models.

The functional API is re-exported here; modules are in :mod:`mmkernels.nn`.
Importing this package never fails because the compiled extension is missing:
an op whose kernel is unavailable raises an actionable error when called.
"""

from mmkernels import nn
from mmkernels.ops.co_attention import co_attention
from mmkernels.ops.contrastive import info_nce, sigmoid_contrastive
from mmkernels.ops.roi_align import multiscale_roi_align, region_features, roi_align
from mmkernels.ops.token_gather import (
    masked_select_rows,
    random_masking,
    restore_tokens,
    scatter_image_features,
)
from mmkernels.ops.varlen_attention import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "nn", "roi_align", "region_features", "multiscale_roi_align", "random_masking",
    "restore_tokens", "masked_select_rows", "scatter_image_features", "varlen_attention",
    "co_attention",
    "info_nce",
    "sigmoid_contrastive",
    "__version__",
]
