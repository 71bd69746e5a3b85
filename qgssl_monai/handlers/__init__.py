"""Event handlers for the engines: lambda ramp-up, EMA teachers, quality-weight statistics and pseudo-label ranking, weak snapshots,
the non-finite loss guard and MLflow tracking that survives a tracking-server outage."""

from qgssl_monai.handlers.ema import EMATeacherHandler
from qgssl_monai.handlers.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from qgssl_monai.handlers.quality_stats import PseudoLabelRankingHandler, QualityWeightStatsHandler
from qgssl_monai.handlers.ramp import RampUpHandler
from qgssl_monai.handlers.snapshots import WeakSnapshotSaver

__all__ = [
    "EMATeacherHandler",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PseudoLabelRankingHandler",
    "QualityWeightStatsHandler",
    "RampUpHandler",
    "ResilientMLFlowHandler",
    "WeakSnapshotSaver",
]


def __getattr__(name: str):
    # MLflow is imported only by code that tracks (importing it costs ~1 s)
    if name == "ResilientMLFlowHandler":
        from qgssl_monai.handlers.tracking import ResilientMLFlowHandler

        return ResilientMLFlowHandler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
