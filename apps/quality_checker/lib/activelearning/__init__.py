from .lowest_quality import LowestQuality

__all__ = ["LowestQuality"]
