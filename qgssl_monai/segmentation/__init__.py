"""Segmentation workflows around the SSL bundle: per-image evaluation, inference writers, training helpers.

Used by ``bundles/ssl_segmentation/configs/{train,evaluate,inference}.json``.
"""
