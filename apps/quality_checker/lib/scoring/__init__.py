from .quality_ranking import QUALITY_INFO_KEY, QualityRanking, score_image

__all__ = ["QUALITY_INFO_KEY", "QualityRanking", "score_image"]
