"""ComiRec: interests extracted from the user's recent items."""

from __future__ import annotations

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from recsys.inference.package import Package, from_config, stats_from
from recsys.inference.scorers.base import TableRecommender
from recsys.inference.scorers.weights import load_weights, quantize
from recsys.models import multi_interest
from recsys.models.multi_interest import HISTORY


class ComiRecRecommender(TableRecommender):
    """ComiRec: K interests extracted from the user's last ``max_length`` items; score max_k v_k . e_i, over the
    item table as stored (``TableRecommender``)."""

    family = multi_interest.FAMILY

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, tables, index)
        build = package.meta["build"]
        self.max_length = build["max_length"]
        self.model = multi_interest.MultiInterest.build(
            self.n_items, build["dim"], self.max_length, from_config(build["extractor"], "build.extractor"),
            from_config(build["settings"], "build.settings"), stats_from(package))
        load_weights(self.model, package)
        quantize(self.model.eval(), tables)

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self.history_queries([self.history(int(u)) for u in users])

    @torch.no_grad()
    def history_queries(self, histories: list[np.ndarray]) -> torch.Tensor:
        recent = [np.asarray(h[::-1][:self.max_length], dtype=np.int64) for h in histories]  # most recent first
        lengths = torch.tensor([len(h) for h in recent], dtype=torch.int32)
        values = torch.from_numpy(np.concatenate(recent)) if recent else torch.empty(0, dtype=torch.int64)
        return self.model(KeyedJaggedTensor.from_lengths_sync([HISTORY], values, lengths))[0]
