"""Event handlers for the engines: lambda ramp-up, EMA teachers, quality-weight statistics, weak snapshots."""

from qgssl_monai.handlers.ema import EMATeacherHandler
from qgssl_monai.handlers.quality_stats import QualityWeightStatsHandler
from qgssl_monai.handlers.ramp import RampUpHandler
from qgssl_monai.handlers.snapshots import WeakSnapshotSaver

__all__ = ["EMATeacherHandler", "QualityWeightStatsHandler", "RampUpHandler", "WeakSnapshotSaver"]
