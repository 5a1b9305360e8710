"""Exact top-k over scores that arrive in blocks of items, with per-query items left out.

A model that scores its items in their stored form (``CompressedEmbeddings.item_scores``) yields
``(start, (B, n) scores)`` blocks; ``top_k`` keeps the best ``k`` of each row as the blocks pass, so no
(B, N) score matrix and no decoded item table is ever held.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


TOPK_COLUMNS = 1 << 16  # columns per torch.topk call


def top_k(blocks: Iterable[tuple[int, torch.Tensor]], k: int, skip: list[np.ndarray] | None = None,
          allowed: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``k`` best items of each row over all blocks, best first.

    Args:
        blocks: ``(start, (B, n) scores of items start .. start + n - 1)``, consecutive or not.
        k: items per row.
        skip: per row, item indices never returned (e.g. seen items, OOV).
        allowed: item indices to choose from (None: all).

    Returns:
        Per row, (item indices, float32 scores); rows with fewer than ``k`` eligible items return fewer.

    Example:
        >>> blocks = [(0, torch.tensor([[1.0, 5.0]])), (2, torch.tensor([[3.0, 4.0]]))]
        >>> [items.tolist() for items, _ in top_k(blocks, 2, skip=[np.array([1])])]
        [[3, 2]]
    """
    rows_of_skip = cols_of_skip = None
    if skip is not None:
        rows_of_skip = torch.from_numpy(np.repeat(np.arange(len(skip)), [len(s) for s in skip]))
        cols_of_skip = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in skip]
                                                       or [np.empty(0, dtype=np.int64)]))
    allowed_ids = None if allowed is None else torch.as_tensor(allowed, dtype=torch.long)
    best_scores = best_items = None
    for start, scores in blocks:
        rows, n = scores.shape
        parts = -(-n // TOPK_COLUMNS)  # torch.topk is slow over very long rows: cut each into parts, one call
        width = -(-n // parts)
        padded = torch.full((rows, parts * width), -torch.inf)
        padded[:, :n] = scores.view(1, n) if rows == 1 else scores  # (torch copies a (n, 1).T view 10x slower)
        if cols_of_skip is not None:
            inside = (cols_of_skip >= start) & (cols_of_skip < start + n)
            padded[rows_of_skip[inside], cols_of_skip[inside] - start] = -torch.inf
        if allowed_ids is not None:
            keep = torch.ones(parts * width, dtype=torch.bool)
            keep[allowed_ids[(allowed_ids >= start) & (allowed_ids < start + n)] - start] = False
            padded[:, keep] = -torch.inf
        values, items = padded.view(rows * parts, width).topk(min(k, width), dim=1)
        items = (items.view(rows, parts, -1) + (start + torch.arange(parts) * width).view(1, -1, 1)).view(rows, -1)
        values = values.view(rows, -1)
        if best_scores is not None:
            values, items = torch.cat([best_scores, values], 1), torch.cat([best_items, items], 1)
        width = min(k, values.shape[1])
        best_scores, picked = values.topk(width, 1)
        best_items = items.gather(1, picked)
    if best_scores is None:
        raise ValueError("top_k got no score blocks")
    kept = torch.isfinite(best_scores)
    return [(best_items[r][kept[r]].numpy(), best_scores[r][kept[r]].float().numpy()) for r in range(len(kept))]
