"""NBMF: non-negative user weights and bit-packed binary item codes."""

from __future__ import annotations

import torch

from recsys.inference.package import Package
from recsys.inference.scorers.base import VectorRecommender
from recsys.models import nbmf
from recsys.models.nbmf import unpack_codes


class NBMFRecommender(VectorRecommender):
    """NBMF: non-negative user weights W and bit-packed binary item codes H; score w_u . h_i over every item."""

    family, uses_index = nbmf.FAMILY, False

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        model = package.section("model")
        codes = unpack_codes(model["item_codes"], package.meta["build"]["factors"], torch.float32)
        super().__init__(package, model["user_factors"], codes, tables, index)

    def serving_tensors(self, package: Package) -> dict[str, torch.Tensor]:
        model = package.section("model")
        return {"item_codes": model["item_codes"], "user_factors": model["user_factors"]}

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_matrix[users.long()] @ self.item_matrix.T
