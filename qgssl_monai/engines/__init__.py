"""Training engines: the semi-supervised MONAI trainer shared by every SSL method, and the speed-path helpers."""

from qgssl_monai.engines import speed
from qgssl_monai.engines.autocast import AutocastInferer, engine_amp_flag, resolve_amp_dtype
from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer, ssl_optimizer_parameters

__all__ = [
    "AutocastInferer",
    "SemiSupervisedTrainer",
    "engine_amp_flag",
    "resolve_amp_dtype",
    "speed",
    "ssl_optimizer_parameters",
]
