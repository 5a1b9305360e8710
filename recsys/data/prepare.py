"""Prepare: raw files -> validated, indexed parquet splits + vocabularies + a JSON manifest.

Layout of a prepared directory::

    train.parquet  test.parquet  [valid.parquet]   indexed rows (schemas in recsys.data.schemas)
    vocab/<feature>.parquet                         raw_id, index, count (index 0 = OOV)
    quarantine.jsonl                                unparseable rows: source, line, reason, text
    manifest.json                                   counts, vocab sizes, schema, sources, hashes, settings
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.quarantine import Quarantine
from recsys.data.readers import open_reader, read_all
from recsys.data.schemas import ITEM, LABEL, RATING, RAW_ITEM, RAW_USER, TIMESTAMP, USER, CTRSchema, InteractionSchema
from recsys.data.splits import SplitConfig, split
from recsys.data.vocab import OOV, Vocabulary
from recsys.errors import ConfigError, DataError

MANIFEST = "manifest.json"


@dataclass
class SourceConfig:
    """Where raw data comes from.

    Args:
        format: a reader name (movielens, libfm, criteo, sequences, parquet) or ``synthetic``.
        path: the raw file (for ``synthetic``: where the generated parquet is written).
        options: keyword options of the reader (e.g. ``layout: atomic``).
        generator: for ``synthetic``, a ``SyntheticInteractions`` or ``SyntheticCTR`` config.
    """

    format: str
    path: str
    options: dict = field(default_factory=dict)
    generator: Any = None


@dataclass
class InteractionFilters:
    """Row filters applied before indexing.

    Args:
        min_rating: keep rows with rating >= this (e.g. 4 for "liked" on MovieLens); None keeps all.
        min_item_count: vocabulary threshold for items; rarer items are dropped (counted).
        min_user_count: vocabulary threshold for users.
        min_user_interactions: drop users with fewer rows after the other filters.
        dedupe: keep one row per (user, item): the latest.
    """

    min_rating: float | None = None
    min_item_count: int = 1
    min_user_count: int = 1
    min_user_interactions: int = 1
    dedupe: bool = True


@dataclass
class CTRSettings:
    """CTR preparation settings.

    Args:
        dense: dense column names; sparse / multi_valued: categorical column names. All three
            None infers them from the data (floats dense, integers sparse, lists multi-valued).
        min_count: vocabulary threshold per sparse feature; rarer ids map to OOV (index 0).
        dense_transform: ``log1p`` (log(1 + max(x, 0)), missing -> 0) or ``none`` (missing -> 0).
        valid_fraction, test_fraction: random row split shares (seeded, streaming).
        seed: seed of the split.
    """

    dense: list[str] | None = None
    sparse: list[str] | None = None
    multi_valued: list[str] | None = None
    min_count: int = 1
    dense_transform: str = "log1p"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


def materialize(source: SourceConfig) -> tuple[str, Path]:
    """Returns the (reader format, path) to read, generating synthetic data first if needed."""
    path = Path(source.path)
    if source.format != "synthetic":
        return source.format, path
    stamp = path.with_suffix(".settings.json")
    settings = json.dumps(asdict(source.generator), sort_keys=True, default=str)
    if not (path.is_file() and stamp.is_file() and stamp.read_text() == settings):
        path.parent.mkdir(parents=True, exist_ok=True)
        from recsys.data import synthetic
        kind = "ctr" if isinstance(source.generator, getattr(synthetic, "SyntheticCTR", ())) else "interactions"
        getattr(synthetic, f"generate_{kind}")(source.generator, path)
        stamp.write_text(settings)
    return "parquet", path


def file_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_prepared(out_dir: str | Path, settings: dict) -> bool:
    """True when ``out_dir`` holds a manifest written with the same settings."""
    manifest = Path(out_dir) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("settings_hash") == settings_hash(settings)


def _reader(source: SourceConfig) -> tuple[Path, Iterator]:
    fmt, path = materialize(source)
    return path, open_reader(fmt, path, **dict(source.options))


def prepare_interactions(source: SourceConfig, out_dir: str | Path, filters: InteractionFilters,
                         split_cfg: SplitConfig, max_bad_fraction: float = 0.01,
                         settings: dict | None = None, graph_clusters: float | None = None) -> dict:
    """Reads, validates, filters, indexes and splits interactions; returns the manifest.

    With ``graph_clusters`` (a modularity resolution), users and items are also clustered by
    Leiden on the training interaction graph, into ``clusters/user.parquet`` and ``clusters/item.parquet``
    (one cluster id per index), for GraphHash.

    Example:
        >>> prepare_interactions(SourceConfig("movielens", "u.data"), "prepared/ml",
        ...                      InteractionFilters(min_rating=4), SplitConfig())  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, chunks = _reader(source)
    quarantine = Quarantine(out / "quarantine.jsonl")
    frame = read_all(chunks, quarantine)
    quarantine.close()
    quarantine.check(max_bad_fraction)
    counts: dict[str, int] = {"read": quarantine.n_total, "bad": quarantine.n_bad}
    missing = {RAW_USER, RAW_ITEM} - set(frame.columns)
    if missing:
        raise DataError(f"{path}: interactions need columns {sorted(missing)}; found {list(frame.columns)}")

    if filters.min_rating is not None:
        if RATING not in frame:
            raise DataError(f"{path}: data.filters.min_rating is set but the data has no '{RATING}' column")
        keep = frame[RATING] >= filters.min_rating
        counts["below_min_rating"] = int((~keep).sum())
        frame = frame[keep]
    if filters.dedupe:
        before = len(frame)
        if TIMESTAMP in frame:
            frame = frame.sort_values(TIMESTAMP, kind="stable")
        frame = frame.drop_duplicates([RAW_USER, RAW_ITEM], keep="last")
        counts["duplicates"] = before - len(frame)

    users = Vocabulary.build(frame[RAW_USER], filters.min_user_count, name=USER)
    items = Vocabulary.build(frame[RAW_ITEM], filters.min_item_count, name=ITEM)
    indexed = pd.DataFrame({USER: users.lookup(frame[RAW_USER]), ITEM: items.lookup(frame[RAW_ITEM])})
    for column, dtype in ((RATING, np.float32), (TIMESTAMP, np.int64)):
        if column in frame:
            indexed[column] = frame[column].to_numpy().astype(dtype)
    rare = (indexed[USER] == OOV) | (indexed[ITEM] == OOV)
    counts["below_min_count"] = int(rare.sum())
    indexed = indexed[~rare]
    user_rows = indexed.groupby(USER)[USER].transform("size")
    small = user_rows < filters.min_user_interactions
    counts["below_min_user_interactions"] = int(small.sum())
    indexed = indexed[~small].reset_index(drop=True)
    if indexed.empty:
        raise DataError(f"{path}: no interactions left after filtering ({counts}); relax data.filters")

    schema = InteractionSchema(has_rating=RATING in indexed, has_timestamp=TIMESTAMP in indexed)
    parts = split(indexed, split_cfg)
    for name, part in parts.items():
        pq.write_table(pa.Table.from_pandas(part, schema=schema.prepared(), preserve_index=False), out / f"{name}.parquet")
        counts[name] = len(part)
    (out / "vocab").mkdir(exist_ok=True)
    users.save(out / "vocab" / f"{USER}.parquet")
    items.save(out / "vocab" / f"{ITEM}.parquet")
    clusters = None
    if graph_clusters is not None:
        from recsys.data.graph import leiden_clusters
        from recsys.embeddings.spec import InteractionGraph
        train = parts["train"]
        graph = InteractionGraph(train[USER].to_numpy(), train[ITEM].to_numpy(), len(users), len(items))
        (out / "clusters").mkdir(exist_ok=True)
        labels = dict(zip((USER, ITEM), leiden_clusters(graph, graph_clusters, split_cfg.seed)))
        for side, values in labels.items():
            pq.write_table(pa.table({"cluster": values.astype(np.int64)}), out / "clusters" / f"{side}.parquet")
        clusters = {"resolution": graph_clusters, **{s: int(len(np.unique(v))) for s, v in labels.items()}}
    manifest = {
        "kind": "interactions",
        "schema": {"columns": schema.prepared().names},
        "rows": counts,
        "vocab_sizes": {USER: len(users), ITEM: len(items)},
        "split": asdict(split_cfg),
        "filters": asdict(filters),
        "graph_clusters": clusters,
    }
    return _finish(out, manifest, [path], quarantine, settings)


def _finish(out: Path, manifest: dict, sources: list[Path], quarantine: Quarantine, settings: dict | None) -> dict:
    manifest |= {
        "sources": [str(p.resolve()) for p in sources],
        "input_hash": file_hash(sources),
        "quarantine": quarantine.summary(),
        "settings_hash": settings_hash(settings or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def _infer_ctr_schema(frame: pd.DataFrame, settings: CTRSettings, path: Path) -> CTRSchema:
    if LABEL not in frame:
        raise DataError(f"{path}: CTR data needs a '{LABEL}' column; found {list(frame.columns)}")
    if settings.dense is not None or settings.sparse is not None or settings.multi_valued is not None:
        schema = CTRSchema(tuple(settings.dense or ()), tuple(settings.sparse or ()), tuple(settings.multi_valued or ()))
        absent = [c for c in (*schema.dense, *schema.sparse_features) if c not in frame]
        if absent:
            raise DataError(f"{path}: configured columns {absent} are not in the data; found {list(frame.columns)}")
        return schema
    columns = [c for c in frame.columns if c != LABEL]
    is_list = lambda c: frame[c].map(lambda v: isinstance(v, (list, np.ndarray))).any()  # noqa: E731
    multi = tuple(c for c in columns if frame[c].dtype == object and is_list(c))
    dense = tuple(c for c in columns if c not in multi and pd.api.types.is_float_dtype(frame[c]))
    sparse = tuple(c for c in columns if c not in multi and c not in dense)
    return CTRSchema(dense, sparse, multi)


def prepare_ctr(source: SourceConfig, out_dir: str | Path, settings_ctr: CTRSettings,
                max_bad_fraction: float = 0.01, settings: dict | None = None) -> dict:
    """Streams CTR rows in two passes (count ids, then index and split); returns the manifest.

    Memory is bounded by one reader chunk plus the vocabularies, whatever the file size.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings_ctr.dense_transform not in ("log1p", "none"):
        raise ConfigError(f"data.ctr.dense_transform must be 'log1p' or 'none', got {settings_ctr.dense_transform!r}")
    path, chunks = _reader(source)
    quarantine = Quarantine(out / "quarantine.jsonl")
    staged = out / "_staged.parquet"
    schema, writer, id_counts = None, None, {}
    try:
        for chunk in chunks:  # pass 1: validate, count ids, stage good rows as parquet
            quarantine.add(path, chunk)
            if chunk.frame.empty:
                continue
            schema = schema or _infer_ctr_schema(chunk.frame, settings_ctr, path)
            frame = chunk.frame[[LABEL, *schema.dense, *schema.sparse_features]]
            for name in schema.sparse_features:
                values = frame[name].explode() if name in schema.multi_valued else frame[name]
                counted = values.dropna().value_counts(sort=False)
                id_counts[name] = counted if name not in id_counts else id_counts[name].add(counted, fill_value=0)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(staged, table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer:
            writer.close()
        quarantine.close()
    quarantine.check(max_bad_fraction)
    if schema is None:
        raise DataError(f"{path}: no valid CTR rows")
    vocabs = {n: Vocabulary.from_counts(c.astype(np.int64), settings_ctr.min_count, name=n) for n, c in id_counts.items()}

    rows = _index_and_split(staged, out, schema, vocabs, settings_ctr)
    staged.unlink()
    (out / "vocab").mkdir(exist_ok=True)
    for name, vocab in vocabs.items():
        vocab.save(out / "vocab" / f"{name}.parquet")
    manifest = {
        "kind": "ctr",
        "schema": schema.to_dict(),
        "rows": {"read": quarantine.n_total, "bad": quarantine.n_bad, **rows},
        "vocab_sizes": {n: len(v) for n, v in vocabs.items()},
        "split": {"valid_fraction": settings_ctr.valid_fraction, "test_fraction": settings_ctr.test_fraction,
                  "seed": settings_ctr.seed, "method": "random_rows"},
        "ctr": asdict(settings_ctr),
    }
    return _finish(out, manifest, [path], quarantine, settings)


def _index_and_split(staged: Path, out: Path, schema: CTRSchema, vocabs: dict[str, Vocabulary],
                     s: CTRSettings) -> dict[str, int]:
    """Pass 2: map ids through the vocabularies, transform dense columns, split rows at random."""
    target = schema.prepared()
    names = ["train", "valid", "test"]
    writers = {n: pq.ParquetWriter(out / f"{n}.parquet", target) for n in names}
    rows = dict.fromkeys(names, 0)
    edges = np.cumsum([1 - s.valid_fraction - s.test_fraction, s.valid_fraction])
    file = pq.ParquetFile(staged)
    for group in range(file.num_row_groups):
        table = file.read_row_group(group)
        columns = {LABEL: pc.cast(table[LABEL], pa.int8())}
        for name in schema.dense:
            x = np.nan_to_num(table[name].to_numpy(zero_copy_only=False).astype(np.float32), nan=0.0)
            columns[name] = pa.array(np.log1p(np.maximum(x, 0)) if s.dense_transform == "log1p" else x)
        for name in schema.sparse:
            columns[name] = pa.array(vocabs[name].lookup(table[name].to_numpy(zero_copy_only=False)))
        for name in schema.multi_valued:
            lists = table[name].combine_chunks()
            flat = vocabs[name].lookup(pc.list_flatten(lists).to_numpy(zero_copy_only=False))
            columns[name] = pa.ListArray.from_arrays(pc.fill_null(lists.offsets, 0), pa.array(flat))
        indexed = pa.table(columns, schema=target)
        draw = np.random.default_rng([s.seed, group]).random(indexed.num_rows)
        assignment = np.searchsorted(edges, draw, side="right")
        for code, name in enumerate(names):
            part = indexed.filter(pa.array(assignment == code))
            writers[name].write_table(part)
            rows[name] += part.num_rows
    for writer in writers.values():
        writer.close()
    return rows
