"""Losses of the retrieval and click-through-rate models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: mean of -log sigmoid(s_pos - s_neg) over (B,) scores.

    Example:
        >>> round(bpr_loss(torch.tensor([0.0]), torch.tensor([0.0])).item(), 4)
        0.6931
    """
    return -F.logsigmoid(positive - negative).mean()


def in_batch_softmax_loss(users: torch.Tensor, items: torch.Tensor, item_ids: torch.Tensor,
                          log_q: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Sampled softmax over the in-batch items, with logQ correction and accidental hits masked.

    Row b's positive is items[b]; the other rows' items are its negatives. ``log_q`` (B,) is
    the log-probability that each in-batch item was sampled (popularity); subtracting it
    corrects the bias towards popular negatives. Columns holding the same item as row b's
    positive (accidental hits) are masked.

    Args:
        users: (B, D) user embeddings.
        items: (B, D) positive item embeddings.
        item_ids: (B,) item indices of the positives.
        log_q: (B,) log sampling probability of each positive, or None.
        temperature: logits are divided by it.

    Example:
        >>> u, i = torch.eye(2), torch.eye(2)
        >>> round(in_batch_softmax_loss(u, i, torch.tensor([0, 1])).item(), 4)
        0.3133
    """
    logits = users @ items.T / temperature
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    logits = logits.masked_fill(same & ~torch.eye(len(item_ids), dtype=torch.bool, device=logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(item_ids), device=logits.device))


def sampled_softmax_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                         positive_ids: torch.Tensor, negative_ids: torch.Tensor,
                         log_q: tuple[torch.Tensor, torch.Tensor] | None = None,
                         temperature: float = 1.0) -> torch.Tensor:
    """Softmax over each row's positive and M negatives shared by the batch, logQ-corrected, accidental hits masked.

    Row b's logits are [u_b . p_b, u_b . n_1, ..., u_b . n_M] / temperature, each minus the log
    probability that its item was sampled (when ``log_q`` is given), so the loss estimates the full
    softmax without the sampler's bias (Jean et al. 2015; TensorFlow's ``sampled_softmax_loss``).
    A negative that is row b's positive item is masked for row b.

    Args:
        users: (B, D) user (or selected interest) vectors.
        positives: (B, D) vectors of the positive items.
        negatives: (M, D) vectors of the sampled items.
        positive_ids: (B,) item indices of the positives.
        negative_ids: (M,) item indices of the negatives.
        log_q: ((B,), (M,)) log sampling probabilities of the positives and the negatives, or None.
        temperature: logits are divided by it.

    Example:
        >>> u, p, n = torch.eye(2), torch.eye(2), torch.tensor([[0.0, 1.0]])
        >>> round(sampled_softmax_loss(u, p, n, torch.tensor([0, 1]), torch.tensor([1])).item(), 4)
        0.1566
    """
    positive = (users * positives).sum(-1, keepdim=True) / temperature
    negative = users @ negatives.T / temperature
    if log_q is not None:
        positive = positive - log_q[0].unsqueeze(1)
        negative = negative - log_q[1].unsqueeze(0)
    negative = negative.masked_fill(positive_ids.unsqueeze(1) == negative_ids.unsqueeze(0), float("-inf"))
    return -torch.log_softmax(torch.cat([positive, negative], dim=1), dim=1)[:, 0].mean()


def cosine_contrastive_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                            positive_ids: torch.Tensor, negative_ids: torch.Tensor, margin: float = 0.5,
                            negative_weight: float = 10.0) -> torch.Tensor:
    """SimpleX's cosine contrastive loss (CCL; Mao et al., CIKM 2021) over M negatives shared by the batch.

    With s the cosine similarity, row b's loss is (1 - s(u_b, p_b)) + w / M * sum_j max(0, s(u_b, n_j) - margin),
    averaged over the B rows. The negatives are shared: one (B, M) cosine matrix instead of SimpleX's M negatives
    per row. A negative that is row b's positive item (an accidental hit) adds nothing to row b (the sum still
    divides by M).

    Args:
        users: (B, D) user vectors.
        positives: (B, D) vectors of the positive items.
        negatives: (M, D) vectors of the sampled items.
        positive_ids: (B,) item indices of the positives.
        negative_ids: (M,) item indices of the negatives.
        margin: negatives less similar than this cost nothing.
        negative_weight: w, the weight of the mean negative term.

    Example:
        >>> u, p, n = torch.eye(2), torch.eye(2), torch.tensor([[1.0, 1.0]])
        >>> round(cosine_contrastive_loss(u, p, n, torch.tensor([1, 2]), torch.tensor([3]), 0.5, 2.0).item(), 4)
        0.4142
    """
    users, positives, negatives = F.normalize(users, dim=-1), F.normalize(positives, dim=-1), F.normalize(negatives, dim=-1)
    positive = 1 - (users * positives).sum(-1)
    negative = (users @ negatives.T - margin).clamp(min=0)
    negative = negative.masked_fill(positive_ids.unsqueeze(1) == negative_ids.unsqueeze(0), 0.0)
    return (positive + negative_weight * negative.mean(1)).mean()


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Click-through-rate loss: mean of -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))] over (B,) logits z.

    Example:
        >>> round(binary_cross_entropy(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])).item(), 4)
        0.41
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
