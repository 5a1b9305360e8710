"""DeepFM (Guo et al. 2017): first-order terms + a factorization machine + a deep MLP, summed."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.deepfm import DeepFM as DeepPart

from recsys.embeddings.collection import CompressedEmbeddings
from recsys.models.ctr.fields import check_dropout, check_layers, embedding_dim, mlp, out_size, stack_fields
from recsys.models.settings import check, is_int


def factorization_machine(fields: torch.Tensor) -> torch.Tensor:
    """The FM's second-order term sum_{i<j} <v_i, v_j> of (B, F, D) field vectors -> (B,), in O(F D).

    TorchRec's ``FactorizationMachine`` is not this: it flattens the fields and multiplies every
    pair of scalar entries, dimensions crossed included.

    Example:
        >>> factorization_machine(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]]))
        tensor([17.])
    """
    total = fields.sum(dim=1)
    return 0.5 * (total.pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)


class DeepFM(nn.Module):
    """DeepFM; returns logits = bias + first order + FM + deep.

    * First order: one weight per id of each field, read from ``first_order`` (a table per
      field, FIRST_ORDER_WIDTH wide: FBGEMM needs widths divisible by 4, so the weight is the
      sum of the id's row), plus a linear term of the dense features.
    * FM: the pairwise dot products of the F field embeddings and of one vector per dense
      feature, x_j v_j (as in Rendle's FM for real-valued features).
    * Deep: an MLP (through TorchRec's ``DeepFM`` module) over [dense features, the F field
      embeddings flattened], then a linear layer to one output.

    Args:
        embeddings: one pooled D-wide table per sparse field (any compression), shared by FM and deep part.
        first_order: one table per field, read by the same feature names (full or compressed), or
            None to leave out the sparse first-order terms.
        n_dense: number of dense features (0 = none).
        deep: hidden sizes of the deep MLP.
        dropout: dropout after every hidden layer of the deep MLP.

    Example:
        >>> from recsys.embeddings.spec import TableSpec
        >>> emb = CompressedEmbeddings([TableSpec(f, 10, 8, (f,)) for f in ("a", "b")])
        >>> linear = CompressedEmbeddings([TableSpec(f"{f}_linear", 10, 4, (f,)) for f in ("a", "b")])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.int32))
        >>> DeepFM(emb, linear, n_dense=3, deep=[16])(kjt, torch.rand(2, 3)).shape
        torch.Size([2])
    """

    def __init__(self, embeddings: CompressedEmbeddings, first_order: CompressedEmbeddings | None, n_dense: int,
                 deep: Sequence[int] = (400, 400, 400), dropout: float = 0.0):
        super().__init__()
        check(is_int(n_dense, 0), "n_dense", n_dense, "an integer >= 0")
        self.embeddings, self.first_order, self.features = embeddings, first_order, list(embeddings.feature_names)
        if first_order is not None:
            check(sorted(first_order.feature_names) == sorted(self.features), "first_order",
                  sorted(first_order.feature_names), f"first-order tables read by the fields {sorted(self.features)}")
        dim = embedding_dim(embeddings)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dense_linear = nn.Linear(n_dense, 1, bias=False) if n_dense else None
        self.dense_vectors = nn.Parameter(torch.randn(n_dense, dim) * 0.1 / dim**0.5) if n_dense else None
        width, deep = n_dense + len(self.features) * dim, check_layers(deep, "model.deep")
        self.deep = DeepPart(nn.Sequential(mlp(width, deep, check_dropout(dropout)), nn.Linear(out_size(width, deep), 1)))

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """sparse (one key per field, stride B) and (B, n_dense) dense features -> (B,) logits."""
        fields = stack_fields(self.embeddings(sparse), self.features)  # (B, F, D)
        logits = self.bias + self.deep([dense, fields]).squeeze(1)
        if self.first_order is not None:
            weights = self.first_order(sparse)
            logits = logits + sum(weights[f].sum(dim=1) for f in self.features)
        if self.dense_vectors is not None:
            logits = logits + self.dense_linear(dense).squeeze(1)
            fields = torch.cat([fields, dense.unsqueeze(2) * self.dense_vectors], dim=1)
        return logits + factorization_machine(fields)
