"""Experiments end to end: ``qgssl experiment run/report`` and ``qgssl demo-job``.

``config`` (experiment YAML) -> ``pipeline`` (steps executing the bundles) -> ``runner`` (skip / resume,
one MLflow run per step, GPU fan-out) -> ``report`` (Table 1, paired tests, plots, HTML from MLflow).
See ``docs/EXPERIMENTS.md``.
"""
