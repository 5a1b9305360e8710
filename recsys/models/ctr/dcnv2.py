"""DCN-V2 (Wang et al. 2021): a cross network and a deep network over [dense, field embeddings]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet

from recsys.embeddings.collection import CompressedEmbeddings
from recsys.models.ctr.fields import check_dropout, check_layers, embedding_dim, mlp, out_size, stack_fields
from recsys.models.settings import check, is_int


@dataclass
class Cross:
    """The cross network of DCN-V2.

    Args:
        layers: cross layers, each x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.
        low_rank: None for full N x N matrices W_l (TorchRec's ``CrossNet``), or r for
            W_l = U_l V_l with U_l (N, r), V_l (r, N) (TorchRec's ``LowRankCrossNet``).
        structure: ``stacked`` (the deep network reads the cross network's output) or
            ``parallel`` (both read x_0; their outputs are concatenated).
    """

    layers: int = 3
    low_rank: int | None = None
    structure: Literal["stacked", "parallel"] = "stacked"

    def __post_init__(self):
        check(is_int(self.layers), "model.cross.layers", self.layers, "an integer >= 1")
        check(self.low_rank is None or is_int(self.low_rank), "model.cross.low_rank", self.low_rank,
              "null (full rank) or an integer >= 1")
        check(self.structure in ("stacked", "parallel"), "model.cross.structure", self.structure,
              "stacked or parallel")

    def build(self, in_features: int) -> nn.Module:
        """The cross network over N = ``in_features`` inputs."""
        if self.low_rank is None:
            return CrossNet(in_features, self.layers)
        return LowRankCrossNet(in_features, self.layers, self.low_rank)


class DCNv2(nn.Module):
    """DCN-V2 over x_0 = [dense features, the F field embeddings flattened], N = n_dense + F D wide.

    ``stacked``: logit = w . deep(cross(x_0)); ``parallel``: logit = w . [cross(x_0), deep(x_0)].
    An empty ``deep`` is the identity.

    Args:
        embeddings: one pooled D-wide table per sparse field (any compression).
        n_dense: number of dense features (0 = none), fed to x_0 as they are.
        cross: the cross network (layers, low rank, structure).
        deep: hidden sizes of the deep network.
        dropout: dropout after every hidden layer of the deep network.

    Example:
        >>> from recsys.embeddings.spec import TableSpec
        >>> emb = CompressedEmbeddings([TableSpec(f, 10, 8, (f,)) for f in ("a", "b")])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.int32))
        >>> DCNv2(emb, 3, Cross(layers=2, low_rank=4, structure="parallel"), deep=[16])(kjt, torch.rand(2, 3)).shape
        torch.Size([2])
    """

    def __init__(self, embeddings: CompressedEmbeddings, n_dense: int, cross: Cross | None = None,
                 deep: Sequence[int] = (256, 256), dropout: float = 0.0):
        super().__init__()
        check(is_int(n_dense, 0), "n_dense", n_dense, "an integer >= 0")
        self.embeddings, self.features = embeddings, list(embeddings.feature_names)
        self.structure = (cross := cross or Cross()).structure
        width = n_dense + len(self.features) * embedding_dim(embeddings)
        deep = check_layers(deep, "model.deep")
        self.cross = cross.build(width)
        self.deep = mlp(width, deep, check_dropout(dropout))
        self.head = nn.Linear(out_size(width, deep) + (width if self.structure == "parallel" else 0), 1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """sparse (one key per field, stride B) and (B, n_dense) dense features -> (B,) logits."""
        x0 = torch.cat([dense, stack_fields(self.embeddings(sparse), self.features).flatten(1)], dim=1)
        if self.structure == "stacked":
            return self.head(self.deep(self.cross(x0))).squeeze(1)
        return self.head(torch.cat([self.cross(x0), self.deep(x0)], dim=1)).squeeze(1)
