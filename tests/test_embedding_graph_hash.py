import numpy as np
import pytest
import torch

from recsys.data.graph import clusters_near, leiden_clusters
from recsys.embeddings.graph_hash import GraphHash
from recsys.embeddings.spec import InteractionGraph, TableSpec, TableStats
from recsys.errors import ConfigError
from tests.embedding_contract import mf_one_epoch, EmbeddingContract, N


class TestGraphHash(EmbeddingContract):
    def compression(self, spec):
        return GraphHash()  # the contract's stats carry 8 precomputed clusters


def test_one_cluster_per_id_reproduces_the_full_table():
    spec = TableSpec("item", N, 4, ("item",))
    method = GraphHash(budget=None, rows=N).build(spec, TableStats(clusters=np.arange(N)[::-1].copy()))
    assert method.plain_tables()[0].rows == N
    ids = torch.arange(N)
    assert len(set(method.transform(ids)[0].tolist())) == N  # a bijection: no two ids share a row


def _planted(blocks=4, users_per=30, items_per=20, seed=0):
    """Users of block b interact only with items of block b."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for b in range(blocks):
        for u in range(users_per):
            chosen = rng.choice(items_per, 6, replace=False)
            users += [1 + b * users_per + u] * 6
            items += list(1 + b * items_per + chosen)
    return InteractionGraph(np.array(users), np.array(items), 1 + blocks * users_per, 1 + blocks * items_per)


def test_leiden_recovers_planted_blocks():
    graph = _planted()
    users, items = leiden_clusters(graph, resolution=1.0)
    for b in range(4):
        assert len(set(items[1 + b * 20: 1 + (b + 1) * 20])) == 1
        assert users[1 + b * 30] == items[1 + b * 20]
    assert len(set(items[1:])) == 4


@pytest.mark.parametrize("target", [3, 10, 40])
def test_cluster_count_never_exceeds_the_target(target):
    labels = clusters_near(_planted(), "item", target)
    assert 1 <= labels.max() + 1 <= target
    assert labels.min() == 0


def test_budget_sets_the_rows_and_memory_fits():
    graph = _planted()
    spec = TableSpec("item", graph.n_items, 8, ("item",))
    method = GraphHash(budget=0.25).build(spec, TableStats(graph=graph, side="item"))
    assert method.plain_tables()[0].rows * 8 * 4 + method.extra_memory() <= 0.25 * spec.full_bytes


def test_graph_hash_needs_the_graph():
    with pytest.raises(ConfigError, match="GraphHash on table 'item' needs the training graph"):
        GraphHash().build(TableSpec("item", 10, 4, ("item",)), TableStats())


def test_mf_trains_with_graph_hash(tiny_interactions, tmp_path):
    task, loss, full = mf_one_epoch(tiny_interactions, tmp_path, GraphHash(budget=0.25), dim=8)
    assert np.isfinite(loss)
    assert sum(task.memory().values()) <= 0.25 * sum(full.values())


def test_prepare_computes_clusters_and_graph_hash_folds_them_to_the_budget(tmp_path):
    from recsys.data.dataset import PreparedData
    from recsys.data.prepare import InteractionFilters, SourceConfig, prepare_interactions
    from recsys.data.splits import SplitConfig
    from tests.conftest import TINY

    manifest = prepare_interactions(SourceConfig("synthetic", str(tmp_path / "raw.parquet"), generator=TINY),
                                    tmp_path / "p", InteractionFilters(), SplitConfig(), graph_clusters=4.0)
    data = PreparedData.open(tmp_path / "p")
    items = data.clusters("item")
    assert items.shape == (data.n_items,) and len(set(items)) == manifest["graph_clusters"]["item"] > 1
    spec = TableSpec("item", data.n_items, 8, ("item",))
    for budget in (0.5, 0.05):
        method = GraphHash(budget=budget).build(spec, TableStats(clusters=items))
        assert method.plain_tables()[0].rows * 32 + method.extra_memory() <= budget * spec.full_bytes
        kept = method.transform(torch.arange(data.n_items))[0]
        assert len(kept.unique()) == min(len(set(items)), method.plain_tables()[0].rows)
