"""RoIAlign modules: thin wrappers over :mod:`mmkernels.ops.roi_align`."""

from __future__ import annotations

from torch import Tensor, nn

from mmkernels.ops.roi_align import BoxesLike, _check_sampling_ratio, _pair, region_features, roi_align


class RoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.RoIAlign``; see :func:`mmkernels.roi_align`.

    forward(input: Tensor[N, C, H, W], rois: Tensor[K, 5] or list of Tensor[L, 4])
    -> Tensor[K, C, PH, PW].

    The constructor validates its arguments as the functional API does (TypeError /
    ValueError naming ``output_size`` or ``sampling_ratio``).
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = _check_sampling_ratio(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class RegionFeatures(RoIAlign):
    """Pooled region vectors (K, C) for a ViLBERT/LXMERT visual stream; see
    :func:`mmkernels.region_features`."""

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return region_features(input, rois, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.aligned)
