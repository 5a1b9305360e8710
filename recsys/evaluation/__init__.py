"""Offline evaluation: full-ranking top-k metrics, CTR metrics, popularity and click-rate baselines.

Example:
    >>> from recsys.evaluation import PopularityScorer, evaluate_ranking
    >>> # metrics = evaluate_ranking(PopularityScorer(train), train, test, ks=(10, 20))
"""

from __future__ import annotations

from recsys.evaluation.ctr import ClickRate, ctr_metrics
from recsys.evaluation.popularity import PopularityScorer
from recsys.evaluation.ranking import evaluate_ranking, ranking_metric_names, top_k

__all__ = ["ClickRate", "PopularityScorer", "ctr_metrics", "evaluate_ranking", "ranking_metric_names", "top_k"]
