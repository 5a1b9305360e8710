"""Matrix factorization: a user table and an item table, scored by dot product."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from recsys.data.schemas import ITEM, USER
from recsys.errors import ConfigError

NEG_ITEM = "neg_item"


def mf_tables(n_users: int, n_items: int, dim: int, init_scale: float = 0.1) -> list[EmbeddingBagConfig]:
    """Table configs of MF: ``user`` (feature user) and ``item`` (features item and neg_item).

    Rows are initialised uniformly in [-init_scale, init_scale] / sqrt(dim).
    """
    if min(n_users, n_items, dim) < 1:
        raise ConfigError(f"mf tables need n_users, n_items, dim >= 1; got {n_users}, {n_items}, {dim}")
    bound = init_scale / dim**0.5
    common = dict(embedding_dim=dim, weight_init_min=-bound, weight_init_max=bound,
                  init_fn=lambda w: nn.init.uniform_(w, -bound, bound))
    return [EmbeddingBagConfig(name=USER, num_embeddings=n_users, feature_names=[USER], **common),
            EmbeddingBagConfig(name=ITEM, num_embeddings=n_items, feature_names=[ITEM, NEG_ITEM], **common)]


class MatrixFactorization(nn.Module):
    """Returns one pooled D-dimensional embedding per feature; scores are dot products.

    Args:
        embeddings: a collection with a ``user`` feature and item-side features (``item``,
            ``neg_item``) sharing the item table.

    Example:
        >>> mf = MatrixFactorization(EmbeddingBagCollection(mf_tables(10, 20, 8)))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item", "neg_item"],
        ...     torch.tensor([1, 2, 3, 4, 5, 6]), torch.ones(6, dtype=torch.int32))
        >>> out = mf(kjt)
        >>> MatrixFactorization.score(out["user"], out["item"]).shape
        torch.Size([2])
    """

    def __init__(self, embeddings: EmbeddingBagCollection):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """features with keys (user, item, neg_item) of stride B -> {feature: (B, D)}."""
        return self.embeddings(features).to_dict()

    @staticmethod
    def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Row-wise dot product of (B, D) users and (B, D) items -> (B,)."""
        return (users * items).sum(-1)
