"""Training engines: the semi-supervised MONAI trainer shared by every SSL method."""

from qgssl_monai.engines.ssl_trainer import AUTOCAST_DTYPES, SemiSupervisedTrainer, ssl_optimizer_parameters

__all__ = ["SemiSupervisedTrainer", "ssl_optimizer_parameters", "AUTOCAST_DTYPES"]
