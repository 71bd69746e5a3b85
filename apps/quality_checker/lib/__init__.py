"""Task classes of the quality-checker MONAI Label app (infer tasks, active learning, scoring)."""
