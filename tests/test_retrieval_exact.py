"""Exact top-k over blocks of item scores equals a dense top-k with the same items left out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.retrieval.exact import top_k


@pytest.mark.parametrize("block", [1, 7, 50, 200])
def test_blocks_give_the_dense_top_k(block):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 123, generator=g)
    rng = np.random.default_rng(0)
    skip = [rng.choice(123, size=s, replace=False) for s in (0, 3, 40, 122, 10)]
    allowed = rng.choice(123, size=60, replace=False)
    blocks = [(start, scores[:, start:start + block]) for start in range(0, 123, block)]
    for allow in (None, allowed):
        masked = scores.clone()
        for row, items in enumerate(skip):
            masked[row, items] = -torch.inf
        if allow is not None:
            keep = torch.zeros(123, dtype=torch.bool)
            keep[allow] = True
            masked[:, ~keep] = -torch.inf
        values, items = masked.topk(10, dim=1)
        got = top_k(iter(blocks), 10, skip, allow)
        for row, (found, found_scores) in enumerate(got):
            finite = torch.isfinite(values[row])
            assert found.tolist() == items[row][finite].tolist()
            np.testing.assert_array_equal(found_scores, values[row][finite].numpy())
        assert len(got[3][0]) == (1 if allow is None else int(np.isin(np.setdiff1d(np.arange(123), skip[3]), allow).sum()))
    assert scores.equal(torch.randn(5, 123, generator=torch.Generator().manual_seed(0)))  # blocks left untouched
