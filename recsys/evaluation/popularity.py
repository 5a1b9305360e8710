"""Most-popular baseline: every user gets the same scores, the items' training counts."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recsys.errors import ConfigError


class PopularityScorer:
    """Scores each item by its number of training interactions, identically for every user.

    Plugs into :func:`recsys.evaluation.evaluate_ranking` as ``score_users`` (which removes each
    user's own training items). Values of ``train`` are ignored: a count is the number of users
    with a nonzero cell in the item's column, i.e. the column sum of a binary matrix.

    Args:
        train: users x items scipy sparse matrix; nonzero = interaction.

    Attributes:
        counts: ``(N,)`` float32 interaction count per item.

    Example:
        >>> scorer = PopularityScorer(sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 1]])))
        >>> scorer(torch.tensor([0, 1]))
        tensor([[1., 0., 2.],
                [1., 0., 2.]])
    """

    def __init__(self, train: sp.spmatrix | sp.sparray) -> None:
        if not sp.issparse(train) or train.ndim != 2:
            raise ConfigError(f"PopularityScorer needs a 2-D scipy sparse matrix (users x items), "
                              f"found {type(train).__name__}")
        m = sp.csr_matrix(train, copy=True)
        m.sum_duplicates()
        m.eliminate_zeros()
        self.counts = torch.from_numpy(m.getnnz(axis=0).astype(np.float32))

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, N)`` for user indices ``(B,)``: a read-only broadcast view of ``counts``."""
        if users.dim() != 1:
            raise ConfigError(f"users must be 1-D (B,), found shape {tuple(users.shape)}")
        return self.counts.to(users.device).unsqueeze(0).expand(users.shape[0], -1)
