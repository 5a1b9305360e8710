"""EASE: the item-item matrix B, dense or pruned."""

from __future__ import annotations

import numpy as np
import torch

from recsys.inference.package import Package
from recsys.inference.scorers.base import Recommender
from recsys.models import ease
from recsys.models.ease import _csr


class EASERecommender(Recommender):
    """EASE: scores x B of the user's item set x, with B dense or pruned (stored sparse)."""

    family, uses_index = ease.FAMILY, False

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, tables, index)
        model = package.section("model")
        self.kept = model["items"].long()
        m = len(self.kept)
        self.position = torch.full((self.n_items,), -1, dtype=torch.long)
        self.position[self.kept] = torch.arange(m)
        if "item_item" in model:
            self.b = model["item_item"].float()
            self.bt = None
        else:
            self.b = None
            self.bt = _csr(model["indptr"], model["indices"], model["values"].float(), (m, m))

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.score_histories([self.history(int(u)) for u in users])

    def score_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        x = torch.zeros(len(histories), len(self.kept))
        for row, items in enumerate(histories):
            columns = self.position[torch.as_tensor(items, dtype=torch.long)]
            x[row, columns[columns >= 0]] = 1.0
        kept = x @ self.b if self.b is not None else (self.bt @ x.T).T
        scores = (kept.min(dim=1, keepdim=True).values - 1).expand(len(histories), self.n_items).contiguous()
        return scores.index_copy_(1, self.kept, kept)

    def similar_scores(self, items: np.ndarray) -> torch.Tensor:
        """Row i of B: how much having item i raises each item's score."""
        return self.score_histories([np.array([i]) for i in items])

    def serving_tensors(self, package: Package) -> dict[str, torch.Tensor]:
        return package.section("model")
