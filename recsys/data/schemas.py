"""Explicit schemas of the two dataset kinds, raw (as read) and prepared (indexed).

Interactions: one row per (user, item) event.
    raw:      user_id, item_id (int64 or string), optional rating (float32), optional timestamp (int64)
    prepared: user, item (int64 indices from the vocabularies; 0 is the OOV index),
              optional rating, optional timestamp

CTR rows: one row per impression.
    raw:      label (int8 in {0, 1}), dense float32 columns, sparse columns whose cells are an id
              (single-valued) or a list of ids (multi-valued)
    prepared: the same columns with sparse ids replaced by int64 vocabulary indices
              (multi-valued columns become list<int64>)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

USER, ITEM, RATING, TIMESTAMP = "user", "item", "rating", "timestamp"
RAW_USER, RAW_ITEM = "user_id", "item_id"
LABEL = "label"


@dataclass(frozen=True)
class InteractionSchema:
    """Columns of an interactions table.

    Args:
        has_rating: whether a ``rating`` (or weight) column is present.
        has_timestamp: whether a ``timestamp`` column is present.

    Example:
        >>> InteractionSchema(has_rating=True).prepared().names
        ['user', 'item', 'rating']
    """

    has_rating: bool = False
    has_timestamp: bool = False

    def prepared(self) -> pa.Schema:
        fields = [pa.field(USER, pa.int64()), pa.field(ITEM, pa.int64())]
        if self.has_rating:
            fields.append(pa.field(RATING, pa.float32()))
        if self.has_timestamp:
            fields.append(pa.field(TIMESTAMP, pa.int64()))
        return pa.schema(fields)


@dataclass(frozen=True)
class CTRSchema:
    """Columns of a CTR table: a 0/1 label, dense floats and sparse categorical features.

    Args:
        dense: names of the dense float columns.
        sparse: names of the single-valued categorical columns.
        multi_valued: names of the categorical columns holding a list of ids per row.

    Example:
        >>> CTRSchema(dense=("d0",), sparse=("s0",), multi_valued=("tags",)).sparse_features
        ('s0', 'tags')
    """

    dense: tuple[str, ...] = ()
    sparse: tuple[str, ...] = ()
    multi_valued: tuple[str, ...] = field(default=())

    @property
    def sparse_features(self) -> tuple[str, ...]:
        """All categorical features, single- then multi-valued (the KeyedJaggedTensor key order)."""
        return tuple(self.sparse) + tuple(self.multi_valued)

    def prepared(self) -> pa.Schema:
        fields = [pa.field(LABEL, pa.int8())]
        fields += [pa.field(name, pa.float32()) for name in self.dense]
        fields += [pa.field(name, pa.int64()) for name in self.sparse]
        fields += [pa.field(name, pa.list_(pa.int64())) for name in self.multi_valued]
        return pa.schema(fields)

    def to_dict(self) -> dict:
        return {"dense": list(self.dense), "sparse": list(self.sparse), "multi_valued": list(self.multi_valued)}
