"""Method registry: ``build_method(name, **kwargs)`` lets bundle configs select an SSL method by name.

Names: ``sup``, ``pl-t``, ``pl-c``, ``pl-qw``, ``mt``, ``ua-mt``, ``ict``, ``cl``, ``cps``, ``qar``, ``qar+qw``,
the ``-qw`` variant of every pseudo-label method (``pl-t-qw``, ``pl-c-qw``, ``mt-qw``, ``ua-mt-qw``, ``ict-qw``,
``cl-qw``, ``cps-qw``), and ``fdpl``/``fdpl-qw`` (from :mod:`qgssl_monai.methods.fdpl`).

For ``-qw``/``qar`` names pass ``quality_net`` (the frozen predictor ``g``) and optionally the
``QualityWeighting`` options ``qw_mode``, ``qw_power``, ``qw_threshold``, ``qw_normalize`` (or a ready
``quality_weighting``); every other keyword goes to the method's constructor. ``qar+qw`` accepts
``qar_weight`` (0.01) and ``pl_weight`` (0.25) and forwards other keywords to the PL-QW component.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from qgssl_monai.methods.base import SSLMethod
from qgssl_monai.methods.composite import CompositeMethod
from qgssl_monai.methods.contrastive import ContrastivePseudoLabel
from qgssl_monai.methods.cps import CrossPseudoSupervision
from qgssl_monai.methods.ict import InterpolationConsistency
from qgssl_monai.methods.mean_teacher import MeanTeacher, UncertaintyAwareMeanTeacher
from qgssl_monai.methods.pseudo_label import PseudoLabelConfidence, PseudoLabelThreshold, QualityWeightedPseudoLabel
from qgssl_monai.methods.qar import QualityAwareRegularization
from qgssl_monai.methods.quality_weighting import QualityWeighting
from qgssl_monai.methods.sup import Supervised

__all__ = ["METHODS", "register_method", "build_method", "available_methods", "needs_quality_net"]

#: methods taking g itself (``quality_net=``) rather than a QualityWeighting
_TAKE_QUALITY_NET = frozenset({"qar", "qar+qw"})
#: name -> (factory, needs a QualityWeighting)
METHODS: dict[str, tuple[Callable[..., SSLMethod], bool]] = {}

#: methods of other areas, imported when first needed: name -> (module, class, takes quality_weighting)
LAZY_METHODS = {
    "fdpl": ("qgssl_monai.methods.fdpl", "FDPL", False),
    "fdpl-qw": ("qgssl_monai.methods.fdpl", "FDPLQW", True),
}


def register_method(name: str, factory: Callable[..., SSLMethod], quality_weighted: bool = False) -> None:
    """Register ``factory(**kwargs) -> SSLMethod`` under ``name`` (``quality_weighted``: it takes
    ``quality_weighting=QualityWeighting``)."""
    METHODS[name.lower()] = (factory, quality_weighted)


def available_methods() -> list[str]:
    for name in LAZY_METHODS:
        _register_lazy(name)
    return sorted(METHODS)


def _register_lazy(name: str) -> None:
    if name in METHODS or name not in LAZY_METHODS:
        return
    module_name, class_name, quality_weighted = LAZY_METHODS[name]
    # the module always ships: an import error inside it is a real bug and must surface, not read as "unknown method"
    factory = getattr(importlib.import_module(module_name), class_name)
    register_method(name, factory, quality_weighted)


def _quality_weighting(kwargs: dict[str, Any], name: str) -> QualityWeighting:
    ready = kwargs.pop("quality_weighting", None)
    options = {key[3:]: kwargs.pop(key) for key in list(kwargs) if key.startswith("qw_")}
    quality_net = kwargs.pop("quality_net", None)
    if ready is not None:
        return ready
    if quality_net is None:
        raise ValueError(f"method {name!r} needs quality_net=<frozen quality predictor> (or quality_weighting=...).")
    return QualityWeighting(quality_net, **options)


def _qar_plus_qw(quality_net: nn.Module, qar_weight: float = 0.01, pl_weight: float = 0.25, **kwargs: Any) -> SSLMethod:
    quality_weighting = _quality_weighting({"quality_net": quality_net, **kwargs}, "qar+qw")
    pl_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("qw_") and k != "quality_weighting"}
    return CompositeMethod(
        {
            "qar": QualityAwareRegularization(quality_net),
            "pl_qw": QualityWeightedPseudoLabel(quality_weighting, **pl_kwargs),
        },
        weights=[qar_weight, pl_weight],
        name="qar+qw",
    )


def needs_quality_net(name: str) -> bool:
    """True when the method registered as ``name`` takes the frozen quality predictor g (QAR, QAR+QW, every QW)."""
    key = name.lower()
    _register_lazy(key)
    if key not in METHODS:
        raise ValueError(f"unknown SSL method {name!r}; known: {', '.join(available_methods())}.")
    return key in _TAKE_QUALITY_NET or METHODS[key][1]


def build_method(name: str, **kwargs: Any) -> SSLMethod:
    """Instantiate the method registered as ``name`` (case-insensitive) with ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or missing ``quality_net``.
    """
    key = name.lower()
    _register_lazy(key)
    if key not in METHODS:
        raise ValueError(f"unknown SSL method {name!r}; known: {', '.join(available_methods())}.")
    factory, quality_weighted = METHODS[key]
    if quality_weighted:
        kwargs["quality_weighting"] = _quality_weighting(kwargs, key)
    method = factory(**kwargs)
    method.name = key
    return method


def _register_defaults() -> None:
    register_method("sup", Supervised)
    register_method("qar", QualityAwareRegularization)
    register_method("qar+qw", _qar_plus_qw)
    register_method("pl-qw", QualityWeightedPseudoLabel, quality_weighted=True)
    for base, cls in (
        ("pl-t", PseudoLabelThreshold),
        ("pl-c", PseudoLabelConfidence),
        ("mt", MeanTeacher),
        ("ua-mt", UncertaintyAwareMeanTeacher),
        ("ict", InterpolationConsistency),
        ("cl", ContrastivePseudoLabel),
        ("cps", CrossPseudoSupervision),
    ):
        register_method(base, cls)
        register_method(f"{base}-qw", cls, quality_weighted=True)


_register_defaults()
