"""Candidate retrieval over item vectors, independent of how the vectors were trained.

``ItemIndex`` searches item vectors by inner product (FAISS); ``multi_interest_retrieve`` gathers
each interest's top items; ``aggregate`` is ComiRec's controllable aggregation (relevance vs
category diversity) and ``diversity`` its Diversity@N measure. Stable API for the serving module.

Example:
    >>> import numpy as np
    >>> index = ItemIndex(np.eye(4, dtype=np.float32))
    >>> candidates = multi_interest_retrieve(np.eye(4, dtype=np.float32)[None, :2], index, 2)
    >>> aggregate(candidates, 2).ids.shape
    (1, 2)
"""

from __future__ import annotations

from recsys.retrieval.aggregation import Candidates, aggregate, diversity, multi_interest_retrieve
from recsys.retrieval.index import ItemIndex

__all__ = ["Candidates", "ItemIndex", "aggregate", "diversity", "multi_interest_retrieve"]
