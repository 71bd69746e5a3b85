"""Training engines: the semi-supervised MONAI trainer shared by every SSL method."""

from qgssl_monai.engines.autocast import AutocastInferer, engine_amp_flag, resolve_amp_dtype
from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer, ssl_optimizer_parameters

__all__ = [
    "AutocastInferer",
    "SemiSupervisedTrainer",
    "engine_amp_flag",
    "resolve_amp_dtype",
    "ssl_optimizer_parameters",
]
