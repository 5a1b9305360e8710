"""DLRM (Naumov et al. 2019): bottom MLP for dense features, pairwise dot interactions, top MLP."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.models.dlrm import DenseArch, InteractionArch

from recsys.embeddings.collection import CompressedEmbeddings
from recsys.models.ctr.fields import check_dropout, check_layers, embedding_dim, mlp, out_size, stack_fields
from recsys.models.settings import check, is_int


class DLRM(nn.Module):
    """DLRM over the sparse fields' embeddings and the dense features; returns logits.

    The bottom MLP (TorchRec's ``DenseArch``, ``bottom`` + a last layer of width D) maps the
    dense features to one D-vector; TorchRec's ``InteractionArch`` takes the dot products of
    every pair among [that vector, the F field embeddings] and concatenates the vector; the top
    MLP maps the result to a logit. Without dense features there is no bottom MLP and the top
    MLP reads the F (F - 1) / 2 dot products of the field embeddings only.

    Args:
        embeddings: one pooled D-wide table per sparse field (any compression).
        n_dense: number of dense features (0 = none).
        bottom: hidden sizes of the bottom MLP (its last layer, of width D, is added).
        top: hidden sizes of the top MLP (a last linear layer to the logit is added).
        dropout: dropout after every hidden layer of the top MLP.

    Example:
        >>> from recsys.embeddings.spec import TableSpec
        >>> emb = CompressedEmbeddings([TableSpec(f, 10, 8, (f,)) for f in ("a", "b")])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.int32))
        >>> DLRM(emb, n_dense=3, bottom=[16], top=[16])(kjt, torch.rand(2, 3)).shape
        torch.Size([2])
    """

    def __init__(self, embeddings: CompressedEmbeddings, n_dense: int, bottom: Sequence[int] = (64,),
                 top: Sequence[int] = (256, 128), dropout: float = 0.0):
        super().__init__()
        self.embeddings, self.features, self.n_dense = embeddings, list(embeddings.feature_names), n_dense
        dim, fields = embedding_dim(embeddings), len(self.features)
        check(is_int(n_dense, 0), "n_dense", n_dense, "an integer >= 0")
        check(fields + (n_dense > 0) >= 2, "fields", self.features, "at least two vectors to interact (two sparse "
              "fields, or one and dense features)")
        bottom, top = check_layers(bottom, "model.bottom"), check_layers(top, "model.top")
        if n_dense:
            self.bottom = DenseArch(n_dense, [*bottom, dim])
            self.interaction = InteractionArch(fields)  # (B, D + (F + 1) F / 2)
            width = dim + (fields + 1) * fields // 2
        else:
            self.interaction = InteractionArch(fields - 1)  # field 0 plays the dense vector; its columns are dropped
            width = fields * (fields - 1) // 2
        self.top = nn.Sequential(mlp(width, top, check_dropout(dropout)), nn.Linear(out_size(width, top), 1))

    def interact(self, fields: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
        """(B, F, D) field embeddings and (B, D) projected dense features (or None) -> the top MLP's input."""
        if dense is not None:
            return self.interaction(dense, fields)
        return self.interaction(fields[:, 0], fields[:, 1:])[:, fields.shape[2]:]

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """sparse (one key per field, stride B) and (B, n_dense) dense features -> (B,) logits."""
        fields = stack_fields(self.embeddings(sparse), self.features)
        projected = self.bottom(dense) if self.n_dense else None
        return self.top(self.interact(fields, projected)).squeeze(1)
