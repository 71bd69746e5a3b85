"""Training data, evaluation and plots for the segmentation-quality predictor g.

* :mod:`.data` — K degraded masks per labeled image per epoch (Type 1 + Type 2), fixed held-out samples,
  the batch preparation ``(cat(image, mask), Dice)``.
* :mod:`.evaluation` — MAE/RMSE/Pearson/Spearman, image-zeroing test, scoring of real network predictions.
* :mod:`.plots` — predicted-vs-true scatter.
* :mod:`.io` — image-mask pair CSVs in, score CSV/JSON out.
* :mod:`.workflow` — helpers wired by ``bundles/quality_predictor/configs``.
"""
