"""Vocabularies: raw ids -> contiguous indices, with frequency counts and an OOV index."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.errors import ConfigError, DataError

OOV = 0
Missing = Literal["oov", "error", "negative"]


class Vocabulary:
    """Maps raw ids to indices ``1..n`` ordered by decreasing frequency; index 0 is OOV.

    Ids seen fewer than ``min_count`` times are left out and map to the OOV index. Ordering
    by frequency (ties by raw id) makes the indices deterministic and frequency ranks free
    for the compression methods that need them.

    Args:
        ids: raw ids of indices 1..n, most frequent first.
        counts: occurrence count of each id in ``ids`` (None: not known, e.g. a model package's vocabulary).
        oov_count: occurrences that fell below ``min_count`` (the count of index 0).
        name: what the vocabulary indexes (used in error messages).

    Example:
        >>> v = Vocabulary.build(pd.Series(["b", "a", "b", "c"]), min_count=1, name="item")
        >>> v.lookup(pd.Series(["b", "c", "zzz"])).tolist()
        [1, 3, 0]
    """

    def __init__(self, ids: np.ndarray, counts: np.ndarray | None, oov_count: int = 0, name: str = "id"):
        if counts is not None and len(ids) != len(counts):
            raise DataError(f"vocabulary '{name}': {len(ids)} ids but {len(counts)} counts")
        self.ids = np.asarray(ids)
        self.counts = None if counts is None else np.asarray(counts, dtype=np.int64)
        self.oov_count = int(oov_count)
        self.name = name
        self._index: pd.Index | None = None  # a hash index (string ids, or values of another type)
        self._sorted = self._order = None  # integer ids: sorted, and the index of each (12 bytes per id, no hash table)
        if self.ids.dtype.kind in "iu":
            order = np.argsort(self.ids, kind="stable")
            self._sorted = self.ids[order]
            self._order = order.astype(np.int32 if len(order) < 2**31 else np.int64)
            unique = len(self._sorted) < 2 or bool((self._sorted[1:] != self._sorted[:-1]).all())
        else:
            self._index = pd.Index(self.ids)
            unique = self._index.is_unique
        if not unique:
            raise DataError(f"vocabulary '{name}': raw ids are not unique")

    @classmethod
    def build(cls, values: pd.Series, min_count: int = 1, name: str = "id") -> Vocabulary:
        """Counts ``values`` and keeps the ids seen at least ``min_count`` times."""
        return cls.from_counts(values.value_counts(sort=False), min_count, name)

    @classmethod
    def from_counts(cls, counts: pd.Series, min_count: int = 1, name: str = "id") -> Vocabulary:
        """Builds from a Series of counts indexed by raw id (e.g. summed over streamed chunks)."""
        if min_count < 1:
            raise ConfigError(f"vocabulary '{name}': min_count must be >= 1, got {min_count}")
        frame = pd.DataFrame({"id": counts.index.to_numpy(), "count": counts.to_numpy(np.int64)})
        frame = frame.sort_values(["count", "id"], ascending=[False, True], kind="stable")
        kept = frame["count"] >= min_count
        return cls(frame["id"][kept].to_numpy(), frame["count"][kept].to_numpy(),
                   int(frame["count"][~kept].sum()), name)

    def __len__(self) -> int:
        """Number of indices including OOV (the number of rows a table needs)."""
        return len(self.ids) + 1

    def index_counts(self) -> np.ndarray:
        """Count per index, OOV first: shape (len(self),)."""
        return np.concatenate([[self.oov_count], self.counts])

    def lookup(self, values, missing: Missing = "oov") -> np.ndarray:
        """Maps raw ids to indices.

        Args:
            values: raw ids (array-like).
            missing: what an unknown id becomes: ``"oov"`` (index 0), ``"negative"`` (-1),
                or ``"error"`` (raise DataError naming the first unknown ids).
        """
        positions = self._positions(values)
        unknown = positions < 0
        if missing == "error" and unknown.any():
            examples = pd.Index(values)[unknown][:5].tolist()
            raise DataError(f"vocabulary '{self.name}': {int(unknown.sum())} unknown ids, e.g. {examples}")
        if missing not in ("oov", "error", "negative"):
            raise ConfigError(f"missing must be 'oov', 'error' or 'negative', got {missing!r}")
        if missing == "negative":
            return np.where(unknown, -1, positions + 1).astype(np.int64)
        return (positions + 1).astype(np.int64)

    def _positions(self, values) -> np.ndarray:
        """Position of each value in ``ids``, -1 where absent."""
        array = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else np.asarray(values)
        if self._sorted is not None and len(self._sorted) and array.dtype.kind in "iu" \
                and np.can_cast(array.dtype, self._sorted.dtype):  # no float round trip of mixed signedness
            where = np.searchsorted(self._sorted, array).clip(max=len(self._sorted) - 1)
            found = self._sorted[where] == array
            return np.where(found, self._order[where], -1).astype(np.int64)
        if self._index is None:  # values of another type than the integer ids (e.g. objects): hash them once
            self._index = pd.Index(self.ids)
        return self._index.get_indexer(pd.Index(values))

    def raw(self, indices) -> np.ndarray:
        """Maps indices back to raw ids (index 0 has no raw id and raises)."""
        indices = np.asarray(indices)
        if ((indices < 1) | (indices >= len(self))).any():
            raise DataError(f"vocabulary '{self.name}': indices must be in 1..{len(self) - 1}")
        return self.ids[indices - 1]

    def save(self, path: str | Path) -> None:
        table = pa.table({"raw_id": self.ids, "index": np.arange(1, len(self), dtype=np.int64),
                          "count": self.counts})
        pq.write_table(table.replace_schema_metadata({"oov_count": str(self.oov_count), "name": self.name}), path)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        return cls(table["raw_id"].to_numpy(), table["count"].to_numpy(), int(meta.get("oov_count", 0)),
                   meta.get("name", Path(path).stem))
