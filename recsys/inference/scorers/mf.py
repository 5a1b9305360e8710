"""MF from its compressed tables as stored."""

from __future__ import annotations

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from recsys.data.schemas import ITEM, USER
from recsys.inference.package import Package, from_config, stats_from
from recsys.inference.scorers.base import Recommender
from recsys.inference.scorers.weights import load_weights, quantize
from recsys.models import mf
from recsys.retrieval.exact import top_k


class MFRecommender(Recommender):
    """MF from its compressed tables as stored: a query's user vector is looked up when it is asked for, and items
    are scored in their stored form chunk by chunk (``CompressedEmbeddings.item_scores``: exact, no decoded item
    table). With an approximate FAISS ``index`` (not ``Flat``), the items are decoded once into that index.

    Args:
        package: the loaded package.
        tables: ``float`` or ``int8``/``int4``/``fp16`` rows.
        index: ``Flat`` (exact, from the stored tables) or a FAISS ``index_factory`` string.
    """

    family, has_tables = mf.FAMILY, True

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, tables, index)
        build = package.meta["build"]
        self.model = mf.MatrixFactorization.build(len(self.users), self.n_items, build["dim"],
                                                  from_config(build["settings"], "build.settings"), stats_from(package))
        load_weights(self.model, package)
        quantize(self.model.eval(), tables)
        self.uses_index = index != "Flat"

    @torch.no_grad()
    def _bags(self, feature: str, bags: list[np.ndarray]) -> torch.Tensor:
        """(B, D) sums of the vectors of each bag of ids."""
        lengths = torch.tensor([len(b) for b in bags], dtype=torch.int32)
        values = torch.from_numpy(np.concatenate([np.asarray(b, dtype=np.int64) for b in bags]))
        return self.model(KeyedJaggedTensor.from_lengths_sync([feature], values, lengths))[feature]

    def _vectors(self, feature: str, ids) -> torch.Tensor:
        """(n, D) vectors of single ids (``feature`` is also its table's name), from the stored tables."""
        return self.model.embeddings.vectors(feature, torch.from_numpy(np.asarray(ids, dtype=np.int64)))

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self._vectors(USER, users.numpy()).unsqueeze(1)

    def history_queries(self, histories: list[np.ndarray]) -> torch.Tensor:
        lengths = torch.tensor([max(len(h), 1) for h in histories], dtype=torch.float32)
        return (self._bags(ITEM, histories) / lengths.unsqueeze(1)).unsqueeze(1)

    def item_blocks(self, queries: torch.Tensor):
        """(B, D) queries -> ``(start, (B, n) scores)`` blocks over every item, from the stored tables."""
        return self.model.embeddings.item_scores(ITEM, queries)

    def item_vectors(self) -> torch.Tensor:
        """(N, D) decoded item vectors (only for an approximate FAISS index, never for exact retrieval)."""
        return self._vectors(ITEM, np.arange(self.n_items))

    def _dense(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.cat([s for _, s in self.item_blocks(queries[:, 0])], dim=1)

    def similar_scores(self, items: np.ndarray) -> torch.Tensor:
        return self._dense(self._vectors(ITEM, items).unsqueeze(1))

    def _top(self, source, users, histories, k, skip, allowed):
        if source == "popularity" or self.uses_index:
            return super()._top(source, users, histories, k, skip, allowed)
        queries = self.queries(torch.as_tensor(users)) if source == "model" else self.history_queries(histories)
        return top_k(self.item_blocks(queries[:, 0]), k, skip, allowed)
