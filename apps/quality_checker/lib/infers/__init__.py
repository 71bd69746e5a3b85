from .quality import QualityInfer
from .segmentation import SegmentationInfer

__all__ = ["QualityInfer", "SegmentationInfer"]
