"""Matrix factorization: a user table and an item table, scored by dot product or cosine similarity, optionally plus a
learned per-item bias."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys.data.schemas import ITEM, USER
from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.spec import TableSpec, TableStats

NEG_ITEM = "neg_item"
FAMILY = "mf"  # the family name of MF model packages
SIMILARITIES = ("dot", "cosine")  # how MF scores a user and an item (cosine: trained with SimpleX's CCL)


def as_scored(vectors: torch.Tensor, similarity: str) -> torch.Tensor:
    """(n, D) vectors as MF scores them by inner products: unit length under ``cosine``, unchanged under ``dot``.
    Training evaluation and serving both score through it, so their rankings agree.

    Example:
        >>> as_scored(torch.tensor([[3.0, 4.0]]), "cosine")
        tensor([[0.6000, 0.8000]])
    """
    return F.normalize(vectors, dim=-1) if similarity == "cosine" else vectors


def mf_specs(n_users: int, n_items: int, dim: int) -> list[TableSpec]:
    """Tables of MF: ``user`` (feature user) and ``item`` (features item and neg_item)."""
    return [TableSpec(USER, n_users, dim, (USER,)), TableSpec(ITEM, n_items, dim, (ITEM, NEG_ITEM))]


class MatrixFactorization(nn.Module):
    """Returns one pooled D-dimensional embedding per feature; scores are dot products, plus ``b_item`` with
    ``item_bias``.

    The bias is one float per item, kept full (never compressed) beside the tables: items that share compressed rows
    (hashing, quotient-remainder) get equal vectors, so without it a rare item scores like the popular items it
    collides with; the bias carries each item's own popularity. It is a dense parameter (replicated over the ranks,
    trained by the tables' optimizer).

    Args:
        embeddings: the collection holding the ``user`` and ``item`` tables (any compression).
        item_bias: learn a per-item bias.

    Example:
        >>> mf = MatrixFactorization(CompressedEmbeddings(mf_specs(10, 20, 8)))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item", "neg_item"],
        ...     torch.tensor([1, 2, 3, 4, 5, 6]), torch.ones(6, dtype=torch.int32))
        >>> out = mf(kjt)
        >>> MatrixFactorization.score(out["user"], out["item"]).shape
        torch.Size([2])
    """

    def __init__(self, embeddings: CompressedEmbeddings, item_bias: bool = False):
        super().__init__()
        self.embeddings = embeddings
        n_items = embeddings.specs[ITEM].num_embeddings
        # (N, 1): one row per item, so the tables' row-wise optimizers train it like a table
        self.item_bias = nn.Parameter(torch.zeros(n_items, 1)) if item_bias else None

    @classmethod
    def build(cls, n_users: int, n_items: int, dim: int, settings: EmbeddingSettings | None = None,
              stats: Mapping[str, TableStats] | None = None, device: torch.device | None = None,
              item_bias: bool = False) -> MatrixFactorization:
        """MF over the ``mf_specs`` tables stored as ``settings`` says: what training builds from the prepared data
        and loading builds from a package (vocabulary sizes and table stats from either)."""
        return cls(CompressedEmbeddings(mf_specs(n_users, n_items, dim), settings, stats, device=device), item_bias)

    def bias(self, items: torch.Tensor) -> torch.Tensor | float:
        """(n,) biases of item indices ``items``; 0 without ``item_bias``."""
        return 0.0 if self.item_bias is None else self.item_bias[items, 0]

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """features with keys among (user, item, neg_item), stride B -> {feature: (B, D)}."""
        return self.embeddings(features)

    @staticmethod
    def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Row-wise dot product of (B, D) users and (B, D) items -> (B,)."""
        return (users * items).sum(-1)
