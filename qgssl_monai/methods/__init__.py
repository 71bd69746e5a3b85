"""SSL method strategies (one per module) and the shared quality-weighting component.

Select a method by name with :func:`build_method` (used by bundle configs).
"""

from qgssl_monai.methods.base import EMATeacherMixin, MethodOutput, SSLMethod, StepContext
from qgssl_monai.methods.composite import CompositeMethod
from qgssl_monai.methods.contrastive import ContrastivePseudoLabel
from qgssl_monai.methods.cps import CrossPseudoSupervision
from qgssl_monai.methods.ict import InterpolationConsistency
from qgssl_monai.methods.mean_teacher import MeanTeacher, UncertaintyAwareMeanTeacher
from qgssl_monai.methods.pseudo_label import (
    PseudoLabel,
    PseudoLabelConfidence,
    PseudoLabelThreshold,
    QualityWeightedPseudoLabel,
)
from qgssl_monai.methods.qar import QualityAwareRegularization
from qgssl_monai.methods.quality_weighting import QualityWeighting
from qgssl_monai.methods.registry import available_methods, build_method, register_method
from qgssl_monai.methods.sup import Supervised

__all__ = [
    "SSLMethod",
    "StepContext",
    "MethodOutput",
    "EMATeacherMixin",
    "QualityWeighting",
    "Supervised",
    "PseudoLabel",
    "PseudoLabelThreshold",
    "PseudoLabelConfidence",
    "QualityWeightedPseudoLabel",
    "MeanTeacher",
    "UncertaintyAwareMeanTeacher",
    "InterpolationConsistency",
    "ContrastivePseudoLabel",
    "CrossPseudoSupervision",
    "QualityAwareRegularization",
    "CompositeMethod",
    "build_method",
    "register_method",
    "available_methods",
]
