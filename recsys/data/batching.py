"""The one batch type, and streaming from parquet into it.

A ``Batch`` holds the sparse features of B rows as a TorchRec ``KeyedJaggedTensor``, the
dense features as a (B, n_dense) tensor and the labels as (B,). For B = 2 rows with a
single-valued ``user`` feature and a multi-valued ``tags`` feature::

                 row 0        row 1
    user         [7]          [3]
    tags         [1, 4]       []
    dense        [0.5, 1.0]   [0.0, 2.0]
    label        1            0

    sparse.keys()    = ["user", "tags"]
    sparse.values()  = [7, 3, 1, 4]
    sparse.lengths() = [1, 1, 2, 0]        (feature-major: user rows, then tags rows)
    sparse.offsets() = [0, 1, 2, 4, 4]
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.schemas import ITEM, LABEL, RATING, USER, CTRSchema
from recsys.errors import ConfigError, DataError


@dataclass
class Batch:
    """Sparse KJT + dense features + labels for B rows (see the module docstring).

    Args:
        sparse: KeyedJaggedTensor with one key per sparse feature, stride B.
        dense: (B, n_dense) float32; n_dense may be 0.
        labels: (B,) float32.

    Example:
        >>> b = interactions_to_batch(pa.record_batch({"user": [1, 2], "item": [5, 6]}))
        >>> b.sparse.keys(), b.labels.tolist()
        (['user', 'item'], [1.0, 1.0])
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(self.sparse.to(device, non_blocking=non_blocking),
                     self.dense.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return Batch(self.sparse.pin_memory(), self.dense.pin_memory(), self.labels.pin_memory())


def jagged(keys: Sequence[str], columns: Sequence[np.ndarray | pa.Array]) -> KeyedJaggedTensor:
    """Builds a KJT from one column per key: int arrays (one id per row) or arrow list arrays."""
    values, lengths = [], []
    for column in columns:
        if isinstance(column, (pa.ListArray, pa.LargeListArray, pa.ChunkedArray)) and pa.types.is_list(column.type):
            lengths.append(pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False))
            values.append(pc.list_flatten(column).to_numpy(zero_copy_only=False))
        else:
            column = np.asarray(column)
            lengths.append(np.ones(len(column), dtype=np.int32))
            values.append(column)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
    )


def interactions_to_batch(rows: pa.RecordBatch | pa.Table) -> Batch:
    """Prepared interactions -> Batch with keys [user, item]; labels are ratings or 1."""
    user, item = rows.column(USER).to_numpy(), rows.column(ITEM).to_numpy()
    names = rows.schema.names
    labels = rows.column(RATING).to_numpy() if RATING in names else np.ones(len(user), dtype=np.float32)
    return Batch(jagged([USER, ITEM], [user, item]), torch.empty(len(user), 0),
                 torch.tensor(labels, dtype=torch.float32))


class CTRBatcher:
    """Prepared CTR rows -> Batch, with keys in ``schema.sparse_features`` order.

    Args:
        schema: the CTR schema (dense, sparse and multi-valued column names).

    Example:
        >>> to_batch = CTRBatcher(CTRSchema(dense=("d0",), sparse=("s0",)))
        >>> len(to_batch(pa.record_batch({"label": [1], "d0": [0.5], "s0": [3]})))
        1
    """

    def __init__(self, schema: CTRSchema):
        self.schema = schema

    def __call__(self, rows: pa.RecordBatch | pa.Table) -> Batch:
        s = self.schema
        dense = np.stack([rows.column(n).to_numpy(zero_copy_only=False) for n in s.dense], axis=1) \
            if s.dense else np.empty((rows.num_rows, 0))
        columns = [rows.column(n).to_numpy() for n in s.sparse] + [rows.column(n) for n in s.multi_valued]
        labels = rows.column(LABEL).to_numpy(zero_copy_only=False)
        return Batch(jagged(s.sparse_features, columns), torch.from_numpy(dense.astype(np.float32)),
                     torch.from_numpy(labels.astype(np.float32)))


class ParquetBatches:
    """Streams a parquet file as Batches: shuffle buffer, background prefetch, bounded memory.

    Row groups are visited in a seeded random order; rows are pooled in a buffer of
    ``shuffle_buffer`` rows, shuffled, and emitted as batches, so memory stays bounded by the
    buffer whatever the file size (a buffer as large as the file gives a full shuffle).

    Args:
        path: the parquet file.
        to_batch: converts an arrow table of rows to a Batch (e.g. ``interactions_to_batch``).
        batch_size: rows per batch (B).
        shuffle_buffer: rows pooled before shuffling; 0 keeps the file order.
        seed: seed of the shuffle; pass ``seed + epoch`` for a new order each epoch.
        prefetch: batches prepared ahead in a background thread (0 = none).
        drop_last: drop the final partial batch.

    Example:
        >>> for batch in ParquetBatches("train.parquet", interactions_to_batch, 1024):  # doctest: +SKIP
        ...     loss = step(batch)
    """

    def __init__(self, path: str | Path, to_batch: Callable[[pa.Table], Batch], batch_size: int,
                 shuffle_buffer: int = 0, seed: int = 0, prefetch: int = 2, drop_last: bool = False):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found (expected a prepared parquet file)")
        self.path, self.to_batch, self.batch_size = Path(path), to_batch, batch_size
        self.shuffle_buffer, self.seed, self.prefetch, self.drop_last = shuffle_buffer, seed, prefetch, drop_last
        self.num_rows = pq.ParquetFile(self.path).metadata.num_rows

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[Batch]:
        return _prefetched(self._batches(), self.prefetch) if self.prefetch > 0 else self._batches()

    def _tables(self) -> Iterator[pa.Table]:
        file = pq.ParquetFile(self.path)
        rng = np.random.default_rng(self.seed)
        groups = rng.permutation(file.num_row_groups) if self.shuffle_buffer else range(file.num_row_groups)
        pending, pending_rows = [], 0
        for group in groups:
            pending.append(file.read_row_group(int(group)))
            pending_rows += pending[-1].num_rows
            if pending_rows >= max(self.shuffle_buffer, self.batch_size):
                yield from self._emit(pa.concat_tables(pending), rng, final=False, out=pending)
                pending_rows = sum(t.num_rows for t in pending)
        if pending:
            yield from self._emit(pa.concat_tables(pending), rng, final=True, out=pending)

    def _emit(self, table: pa.Table, rng: np.random.Generator, final: bool, out: list) -> Iterator[pa.Table]:
        """Yields full batches of ``table`` (shuffled if asked) and leaves the remainder in ``out``."""
        if self.shuffle_buffer:
            table = table.take(rng.permutation(table.num_rows))
        n_full = table.num_rows // self.batch_size * self.batch_size
        out.clear()
        for start in range(0, n_full, self.batch_size):
            yield table.slice(start, self.batch_size)
        rest = table.slice(n_full)
        if rest.num_rows and final and not self.drop_last:
            yield rest
        elif rest.num_rows and not final:
            out.append(rest)

    def _batches(self) -> Iterator[Batch]:
        for table in self._tables():
            yield self.to_batch(table)


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Runs ``items`` in a background thread, ``depth`` items ahead; re-raises its errors."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            buffer.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
