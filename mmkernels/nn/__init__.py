"""Drop-in ``nn.Module`` wrappers around the functional API."""

from mmkernels.nn.attention import VarlenSelfAttention
from mmkernels.nn.co_attention import BiAttention
from mmkernels.nn.losses import ClipLoss, SigLipLoss
from mmkernels.nn.roi_align import RegionFeatures, RoIAlign

__all__ = ["RoIAlign", "RegionFeatures", "VarlenSelfAttention", "BiAttention", "ClipLoss",
           "SigLipLoss"]
