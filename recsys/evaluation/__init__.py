"""Offline evaluation: full-ranking top-k metrics, CTR metrics, popularity and click-rate baselines.

``recall@k`` is hits / |test items| (LightGCN, BARS, RecBole); ``recall_capped@k`` is
hits / min(k, |test items|) (Mult-VAE, EASE). Ties in scores are broken at random (seeded) and
``tied@k`` reports how many top-k slots a tie decided; see :mod:`recsys.evaluation.ranking`.

Example:
    >>> from recsys.evaluation import PopularityScorer, evaluate_ranking
    >>> # metrics = evaluate_ranking(PopularityScorer(train), train, test, ks=(10, 20))
"""

from __future__ import annotations

from recsys.evaluation.ctr import ClickRate, ctr_metrics
from recsys.evaluation.popularity import PopularityScorer
from recsys.evaluation.ranking import (METRIC_DEFINITIONS, TIE_BREAKS, check_tie_break, evaluate_ranking,
                                       ranking_metric_names, top_k)

__all__ = ["METRIC_DEFINITIONS", "TIE_BREAKS", "ClickRate", "PopularityScorer", "check_tie_break", "ctr_metrics",
           "evaluate_ranking", "ranking_metric_names", "top_k"]
