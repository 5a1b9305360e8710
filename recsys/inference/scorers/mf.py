"""MF from its compressed tables as stored."""

from __future__ import annotations

import numpy as np
import torch

from recsys.data.schemas import ITEM, USER
from recsys.errors import ConfigError
from recsys.inference.package import Package, from_config, stats_from
from recsys.inference.scorers.base import TableRecommender
from recsys.inference.scorers.weights import load_weights, quantize
from recsys.models import mf


class MFRecommender(TableRecommender):
    """MF from its compressed tables as stored (``TableRecommender``): a user's vector is looked up when a request
    asks for it; an unseen user's query is the mean of the given items' vectors.

    A package with ``similarity: cosine`` (SimpleX) scores unit-length vectors (``mf.as_scored``): queries are
    normalized, and the inner products of the stored items are divided by each item's norm, computed once at load
    from the tables as stored ((N,) floats; the tables stay as they are). A package with ``item_bias`` adds each
    item's bias to the scores of users and histories (not to item-to-item similarity); it serves exactly (``Flat``).

    Args:
        package: the loaded package.
        tables: ``float`` or ``int8``/``int4``/``fp16`` rows.
        index: ``Flat`` (exact, from the stored tables) or a FAISS ``index_factory`` string.
    """

    family = mf.FAMILY

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, tables, index)
        build = package.meta["build"]
        item_bias = build.get("item_bias", False)  # packages before item biases hold none
        if item_bias and self.uses_index:
            raise ConfigError(f"index={index!r}: an MF package with item biases serves exactly (index=Flat); a FAISS "
                              "index of the item vectors would leave the biases out of the ranking")
        self.model = mf.MatrixFactorization.build(len(self.users), self.n_items, build["dim"],
                                                  from_config(build["settings"], "build.settings"), stats_from(package),
                                                  item_bias=item_bias)
        load_weights(self.model, package)
        quantize(self.model.eval().requires_grad_(False), tables)  # served, never trained
        self.similarity = build.get("similarity", "dot")  # packages before SimpleX hold none: dot products
        if self.similarity not in mf.SIMILARITIES:
            raise ConfigError(f"build.similarity must be one of {list(mf.SIMILARITIES)}, got {self.similarity!r}")
        self._inverse_norms = self._item_inverse_norms() if self.similarity == "cosine" else None

    @torch.no_grad()
    def _item_inverse_norms(self, chunk: int = 65536) -> torch.Tensor:
        """(N,) 1 / ||e_i|| of every stored item vector (F.normalize's floor of 1e-12 on the norm)."""
        norms = [self.model.embeddings.vectors(ITEM, torch.arange(s, min(s + chunk, self.n_items))).norm(dim=1)
                 for s in range(0, self.n_items, chunk)]
        return 1 / torch.cat(norms).clamp(min=1e-12)

    def _vectors(self, table: str, ids) -> torch.Tensor:
        return mf.as_scored(super()._vectors(table, ids), self.similarity)

    def item_blocks(self, queries: torch.Tensor, bias: bool = True):
        """Blocks of scores of every item (``TableRecommender.item_blocks``), cosine-scaled under ``cosine``, plus
        the item biases unless ``bias`` is false."""
        for start, scores in super().item_blocks(queries):
            if self._inverse_norms is not None:
                scores = scores * self._inverse_norms[start:start + scores.shape[1]]
            if bias and self.model.item_bias is not None:
                scores = scores + self.model.bias(slice(start, start + scores.shape[1]))
            yield start, scores

    def similar_scores(self, items: np.ndarray) -> torch.Tensor:
        """Item-to-item similarity: the items' vectors against every item's, without the biases."""
        return torch.cat([s for _, s in self.item_blocks(self._vectors(ITEM, items).unsqueeze(1), bias=False)], dim=1)

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self._vectors(USER, users.numpy()).unsqueeze(1)

    def history_queries(self, histories: list[np.ndarray]) -> torch.Tensor:
        """The mean of the given items' vectors (unit vectors under ``cosine``, then normalized again)."""
        counts = torch.tensor([len(h) for h in histories])
        items = self._vectors(ITEM, np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]))
        sums = items.new_zeros(len(histories), items.shape[1]).index_add_(0, torch.repeat_interleave(counts), items)
        return mf.as_scored(sums / counts.clamp(min=1).unsqueeze(1), self.similarity).unsqueeze(1)
