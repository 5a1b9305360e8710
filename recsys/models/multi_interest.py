"""Multi-interest extractors of ComiRec (Cen et al., KDD 2020) and the model that reads the item table.

Shape letters: B users (batch), L history positions (padded), K interests, D dimension, H attention
hidden size. A history lists a user's items most recent first: position 0 is the latest item, so
positional parameters mean "how long ago", and padding sits at the end of each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys.data.schemas import ITEM
from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.models.settings import check, is_int, is_number

HISTORY = "history"
NEG_ITEM = "neg_item"

FAMILY = "comirec"  # the family name of ComiRec model packages


def multi_interest_specs(n_items: int, dim: int) -> list[TableSpec]:
    """The one item table, unpooled, read by ``history``, ``item`` (targets) and ``neg_item`` (negatives)."""
    return [TableSpec(ITEM, n_items, dim, (HISTORY, ITEM, NEG_ITEM), pooling="none")]


def squash(s: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule squash along the last dim: |s|^2 / (1 + |s|^2) * s / |s| (norm below 1, direction kept).

    Example:
        >>> round(squash(torch.tensor([[3.0, 4.0]])).norm().item(), 4)
        0.9615
    """
    norm2 = s.pow(2).sum(-1, keepdim=True)
    return norm2 / (1 + norm2) * s / torch.sqrt(norm2 + eps)


class CapsuleRouting(nn.Module):
    """ComiRec-DR: dynamic-routing capsules with a bilinear map per interest (and per position).

    Item i of the history predicts interest k as c_ki = W_ik e_i, with one map per (position,
    interest) as in the paper (``positions=L``) or one per interest shared by all positions
    (``positions=1``, as MIND and the authors' ``bilinear_type=1``). The maps start at the identity plus Gaussian
    noise: interests start as squashed sums of history items in the item space, and the noise
    tells them apart (a purely random start, as in the authors' code, trained to clearly worse
    recall on ML-100K). Routing logits b start at zero, so the result is deterministic; each of
    ``iterations`` rounds sets the couplings softmax_k(b), masked at padding, forms
    v_k = squash(sum_i coupling_ki c_ki) and adds c_ki . v_k to b. As in the authors' code, the
    rounds before the last route through gradient-stopped predictions.

    Args:
        dim: item embedding size D.
        interests: number of interests K.
        positions: maps per interest: the longest history L (one per position), or 1 (shared by all).
        iterations: routing rounds (3 in the paper).
        noise: the maps start at identity + noise * N(0, 1/D).

    Example:
        >>> extractor = CapsuleRouting(dim=8, interests=2, positions=5, iterations=3)
        >>> extractor(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)).shape
        torch.Size([3, 2, 8])
    """

    def __init__(self, dim: int, interests: int, positions: int, iterations: int = 3, noise: float = 0.1):
        super().__init__()
        self.iterations = iterations
        self.weight = nn.Parameter(torch.eye(dim) + noise / dim**0.5 * torch.randn(positions, interests, dim, dim))

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) history and (B, L) bool mask (True = item; L <= positions unless 1) -> (B, K, D) interests."""
        if len(self.weight) == 1:
            batch, length, dim = history.shape
            predictions = (history @ self.weight[0].reshape(-1, dim).T).view(batch, length, -1, dim)
            predictions = predictions.transpose(1, 2).contiguous()
        else:
            predictions = torch.einsum("bli,lkoi->bklo", history, self.weight[:history.shape[1]])
        logits = history.new_zeros(predictions.shape[:3])
        mask = mask.unsqueeze(1).to(history.dtype)
        for step in range(self.iterations):
            last = step == self.iterations - 1
            routed = predictions if last else predictions.detach()
            coupling = torch.softmax(logits, dim=1) * mask
            interests = squash(torch.einsum("bkl,bkld->bkd", coupling, routed))
            if not last:
                logits = logits + torch.einsum("bkld,bkd->bkl", routed, interests)
        return interests


class SelfAttentiveInterests(nn.Module):
    """ComiRec-SA: K attention heads over the history, A = softmax(W2 tanh(W1 (H + P)^T)), interests = A H.

    P are learned positional embeddings; padded positions get zero attention. A history with no
    items gives zero interests.

    Args:
        dim: item embedding size D.
        interests: number of heads K.
        max_length: longest history L (one positional embedding per position).
        hidden: hidden size H of the attention MLP (the paper uses 4 D).

    Example:
        >>> extractor = SelfAttentiveInterests(dim=8, interests=2, max_length=5, hidden=16)
        >>> extractor(torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)).shape
        torch.Size([3, 2, 8])
    """

    def __init__(self, dim: int, interests: int, max_length: int, hidden: int):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(max_length, dim) / dim**0.5)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, interests, bias=False)

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) history and (B, L) bool mask (True = item, L <= max_length) -> (B, K, D) interests."""
        logits = self.w2(torch.tanh(self.w1(history + self.positions[:history.shape[1]]))).transpose(1, 2)
        logits = logits.masked_fill(~mask.unsqueeze(1), torch.finfo(logits.dtype).min)
        attention = torch.softmax(logits, dim=-1) * mask.unsqueeze(1)
        return attention @ history


@dataclass
class DynamicRouting:
    """Settings of ComiRec-DR's extractor (``model.extractor``).

    Args:
        interests: number of interests K.
        iterations: routing rounds.
        per_position: one bilinear map per (position, interest) as in the paper, else one per interest.
        noise: the maps start at identity + noise * N(0, 1/D) (see ``CapsuleRouting``).
    """

    interests: int = 4
    iterations: int = 3
    per_position: bool = True
    noise: float = 0.1

    def __post_init__(self):
        check(is_int(self.interests), "extractor.interests", self.interests, "an integer >= 1")
        check(is_int(self.iterations), "extractor.iterations", self.iterations, "an integer >= 1")
        check(isinstance(self.per_position, bool), "extractor.per_position", self.per_position, "true or false")
        check(is_number(self.noise) and self.noise >= 0, "extractor.noise", self.noise, "a number >= 0")

    def build(self, dim: int, max_length: int) -> CapsuleRouting:
        return CapsuleRouting(dim, self.interests, max_length if self.per_position else 1, self.iterations,
                              self.noise)


@dataclass
class SelfAttention:
    """Settings of ComiRec-SA's extractor (``model.extractor``).

    Args:
        interests: number of attention heads K.
        hidden: hidden size H of the attention MLP; None = 4 D.
    """

    interests: int = 4
    hidden: int | None = None

    def __post_init__(self):
        check(is_int(self.interests), "extractor.interests", self.interests, "an integer >= 1")
        check(self.hidden is None or is_int(self.hidden), "extractor.hidden", self.hidden, "an integer >= 1 or null")

    def build(self, dim: int, max_length: int) -> SelfAttentiveInterests:
        return SelfAttentiveInterests(dim, self.interests, max_length, self.hidden or 4 * dim)


class MultiInterest(nn.Module):
    """Looks up items in the (any-compression) item table and extracts K interests from histories.

    Args:
        embeddings: the collection holding the unpooled ``item`` table of ``multi_interest_specs``.
        extractor: a ``CapsuleRouting`` or ``SelfAttentiveInterests`` (any (B, L, D), (B, L) -> (B, K, D)).

    Example:
        >>> emb = CompressedEmbeddings(multi_interest_specs(20, 8))
        >>> model = MultiInterest(emb, CapsuleRouting(8, interests=2, positions=4))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["history", "item"], torch.tensor([3, 2, 1, 5, 7, 9]),
        ...                                           torch.tensor([3, 1, 1, 1]))
        >>> interests, items = model(kjt)
        >>> interests.shape, items["item"].shape
        (torch.Size([2, 2, 8]), torch.Size([2, 8]))
    """

    def __init__(self, embeddings: CompressedEmbeddings, extractor: nn.Module):
        super().__init__()
        self.embeddings = embeddings
        self.extractor = extractor

    @classmethod
    def build(cls, n_items: int, dim: int, max_length: int, extractor: DynamicRouting | SelfAttention,
              settings: EmbeddingSettings | None = None, stats: Mapping[str, TableStats] | None = None,
              device: torch.device | None = None) -> MultiInterest:
        """ComiRec over the ``multi_interest_specs`` table stored as ``settings`` says, interests extracted as
        ``extractor`` says: what training builds from the prepared data and loading builds from a package."""
        embeddings = CompressedEmbeddings(multi_interest_specs(n_items, dim), settings, stats, device=device)
        return cls(embeddings, extractor.build(dim, max_length))

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """features with keys among (history, item, neg_item) -> ((B, K, D) interests of the histories or
        None without ``history``, {other feature: (n_ids, D) one vector per id})."""
        out = self.embeddings(features)
        vectors = {f: jagged.values() for f, jagged in out.items() if f != HISTORY}
        if HISTORY not in out:
            return None, vectors
        lengths = out[HISTORY].lengths()
        width = max(int(lengths.max()), 1) if len(lengths) else 1
        history = out[HISTORY].to_padded_dense(desired_length=width)
        mask = torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)
        return self.extractor(history, mask), vectors
