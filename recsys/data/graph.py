"""Modularity clustering of the user-item interaction graph (Leiden, via igraph)."""

from __future__ import annotations

import math

import igraph
import numpy as np

from recsys.embeddings.spec import InteractionGraph
from recsys.errors import ConfigError


def leiden_clusters(graph: InteractionGraph, resolution: float = 1.0, seed: int = 0,
                    iterations: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Clusters users and items together by maximising modularity on the bipartite graph.

    Nodes without edges (e.g. OOV index 0) form singleton clusters.

    Args:
        graph: the training interactions.
        resolution: modularity resolution; larger gives more, smaller clusters.
        seed: seed of Leiden's randomness (igraph uses Python's ``random``; it is reseeded here).
        iterations: Leiden refinement iterations.

    Returns:
        (user_clusters (n_users,), item_clusters (n_items,)), cluster ids 0..C-1 in one space.

    Example:
        >>> g = InteractionGraph(np.array([1, 1, 2]), np.array([1, 2, 3]), 3, 4)
        >>> users, items = leiden_clusters(g)
        >>> users.shape, items.shape
        ((3,), (4,))
    """
    if resolution <= 0:
        raise ConfigError(f"graph clustering resolution must be > 0, got {resolution}")
    edges = np.stack([graph.users, graph.n_users + graph.items], axis=1)
    g = igraph.Graph(n=graph.n_users + graph.n_items, edges=edges.tolist())
    igraph.set_random_number_generator(__import__("random").Random(seed))
    membership = np.asarray(g.community_leiden(objective_function="modularity", resolution=resolution,
                                               n_iterations=iterations).membership)
    return membership[: graph.n_users], membership[graph.n_users:]


def clusters_near(graph: InteractionGraph, side: str, target: int, seed: int = 0, steps: int = 12) -> np.ndarray:
    """Cluster ids of one side with about ``target`` distinct clusters (never more).

    Bisects the resolution in log space. Ids of ``side`` are then renumbered 0..C-1 by
    decreasing cluster size; when even the coarsest clustering has more than ``target``
    clusters (disconnected parts), the smallest share the last row.
    """
    if side not in ("user", "item"):
        raise ConfigError(f"side must be 'user' or 'item', got {side!r}")
    pick = 0 if side == "user" else 1
    low, high, best = math.log(1e-3), math.log(1e4), None
    for _ in range(steps):
        middle = (low + high) / 2
        labels = leiden_clusters(graph, math.exp(middle), seed)[pick]
        count = len(np.unique(labels))
        if count <= target:
            best, low = labels, middle
            if count == target:
                break
        else:
            high = middle
    if best is None:  # disconnected parts never merge: fold the smallest clusters together
        best = leiden_clusters(graph, math.exp(low), seed)[pick]
    return fold_clusters(best, target)


def fold_clusters(labels: np.ndarray, target: int) -> np.ndarray:
    """Renumbers clusters 0..C-1 by decreasing size; beyond ``target`` the smallest share the last id.

    Example:
        >>> fold_clusters(np.array([5, 5, 5, 2, 2, 9]), 2).tolist()
        [0, 0, 0, 1, 1, 1]
    """
    labels, sizes = np.unique(labels, return_inverse=True, return_counts=True)[1:]
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(sizes))
    return np.minimum(rank[labels], target - 1)
