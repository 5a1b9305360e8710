"""ALS: its solved factors."""

from __future__ import annotations

import torch

from recsys.inference.package import Package
from recsys.inference.scorers.base import VectorRecommender
from recsys.models import als


class ALSRecommender(VectorRecommender):
    """ALS: the solved user and item factors."""

    family = als.FAMILY

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        model = package.section("model")
        super().__init__(package, model["user_factors"], model["item_factors"], tables, index)

    def serving_tensors(self, package: Package) -> dict[str, torch.Tensor]:
        return {"item_vectors": self.item_matrix, "user_vectors": self.user_matrix}
