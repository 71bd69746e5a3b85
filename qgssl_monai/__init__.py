"""qgssl_monai: quality-guided semi-supervised medical image segmentation on MONAI.

Layers (each imports only from the layers above it):
``data`` -> ``transforms`` -> ``networks`` -> ``losses``/``metrics`` -> ``engines``/``methods``
-> ``handlers`` -> bundles (``bundles/*/configs``) -> ``experiments`` -> ``serving``.
"""

__version__ = "0.1.0"
