"""MF from its compressed tables as stored."""

from __future__ import annotations

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from recsys.data.schemas import ITEM, USER
from recsys.inference.package import Package, from_config, stats_from
from recsys.inference.scorers.base import TableRecommender
from recsys.inference.scorers.weights import load_weights, quantize
from recsys.models import mf


class MFRecommender(TableRecommender):
    """MF from its compressed tables as stored (``TableRecommender``): a user's vector is looked up when a request
    asks for it; an unseen user's query is the mean of the given items' vectors.

    Args:
        package: the loaded package.
        tables: ``float`` or ``int8``/``int4``/``fp16`` rows.
        index: ``Flat`` (exact, from the stored tables) or a FAISS ``index_factory`` string.
    """

    family = mf.FAMILY

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, tables, index)
        build = package.meta["build"]
        self.model = mf.MatrixFactorization.build(len(self.users), self.n_items, build["dim"],
                                                  from_config(build["settings"], "build.settings"), stats_from(package))
        load_weights(self.model, package)
        quantize(self.model.eval(), tables)

    @torch.no_grad()
    def _bags(self, feature: str, bags: list[np.ndarray]) -> torch.Tensor:
        """(B, D) sums of the vectors of each bag of ids."""
        lengths = torch.tensor([len(b) for b in bags], dtype=torch.int32)
        values = torch.from_numpy(np.concatenate([np.asarray(b, dtype=np.int64) for b in bags]))
        return self.model(KeyedJaggedTensor.from_lengths_sync([feature], values, lengths))[feature]

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self._vectors(USER, users.numpy()).unsqueeze(1)

    def history_queries(self, histories: list[np.ndarray]) -> torch.Tensor:
        lengths = torch.tensor([max(len(h), 1) for h in histories], dtype=torch.float32)
        return (self._bags(ITEM, histories) / lengths.unsqueeze(1)).unsqueeze(1)
