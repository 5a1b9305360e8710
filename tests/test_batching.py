import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.batching import CTRBatcher, ParquetBatches, interactions_to_batch
from recsys.data.schemas import CTRSchema
from recsys.errors import DataError


@pytest.fixture
def interactions(tmp_path):
    path = tmp_path / "train.parquet"
    n = 1000
    pq.write_table(pa.table({"user": np.arange(n), "item": np.arange(n) * 3, "rating": np.full(n, 4.0, np.float32)}),
                   path, row_group_size=64)
    return path


def _users(batches):
    return torch.cat([b.sparse["user"].values() for b in batches]).tolist()


@pytest.mark.parametrize("shuffle_buffer", [0, 100, 10_000])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_row_exactly_once_and_items_stay_with_users(interactions, shuffle_buffer, prefetch):
    loader = ParquetBatches(interactions, interactions_to_batch, 128, shuffle_buffer, seed=5, prefetch=prefetch)
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    assert sorted(_users(batches)) == list(range(1000))
    for b in batches:
        assert torch.equal(b.sparse["item"].values(), b.sparse["user"].values() * 3)
        assert b.labels.eq(4.0).all() and b.dense.shape == (len(b), 0)
    assert all(len(b) == 128 for b in batches[:-1]) and len(batches[-1]) == 1000 - 7 * 128


def test_shuffle_is_seeded(interactions):
    def order(seed):
        return _users(ParquetBatches(interactions, interactions_to_batch, 100, 500, seed=seed))
    assert order(1) == order(1)
    assert order(1) != order(2)
    assert _users(ParquetBatches(interactions, interactions_to_batch, 100)) == list(range(1000))


def test_drop_last(interactions):
    loader = ParquetBatches(interactions, interactions_to_batch, 300, drop_last=True)
    assert [len(b) for b in loader] == [300, 300, 300] and len(loader) == 3


def test_prefetch_reraises_errors_from_the_background_thread(interactions):
    def broken(rows):
        raise ValueError("boom in converter")
    with pytest.raises(ValueError, match="boom in converter"):
        list(ParquetBatches(interactions, broken, 100, prefetch=2))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothing.parquet: file not found"):
        ParquetBatches(tmp_path / "nothing.parquet", interactions_to_batch, 10)


def test_ctr_batch_has_dense_sparse_and_multi_valued_features():
    rows = pa.table({"label": pa.array([1, 0, 1], pa.int8()), "d0": pa.array([0.5, 1.0, 2.0], pa.float32()),
                     "s0": [7, 3, 2], "tags": pa.array([[1, 4], [], [5]], pa.list_(pa.int64()))})
    batch = CTRBatcher(CTRSchema(dense=("d0",), sparse=("s0",), multi_valued=("tags",)))(rows)
    assert batch.sparse.keys() == ["s0", "tags"]
    assert batch.sparse.values().tolist() == [7, 3, 2, 1, 4, 5]
    assert batch.sparse.lengths().tolist() == [1, 1, 1, 2, 0, 1]
    assert batch.dense.tolist() == [[0.5], [1.0], [2.0]] and batch.labels.tolist() == [1.0, 0.0, 1.0]
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.sparse.values(), batch.sparse.values())
