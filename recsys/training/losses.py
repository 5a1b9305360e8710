"""Losses of the retrieval models."""

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
