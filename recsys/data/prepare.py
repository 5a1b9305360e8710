"""Prepare: raw files -> validated, indexed parquet splits + vocabularies + a JSON manifest.

Layout of a prepared directory::

    train.parquet  test.parquet  [valid.parquet]   indexed rows (schemas in recsys.data.schemas)
    vocab/<feature>.parquet                         raw_id, index, count (index 0 = OOV)
    quarantine.jsonl                                unparseable rows: source, line, reason, text
    manifest.json                                   counts, vocab sizes, schema, sources, hashes, settings

The splits are drawn from one file (``data.split`` for interactions, ``data.ctr`` fractions for CTR rows) or
given as files (``data.source.splits``: a published split such as LightGCN's or the NFM paper's); see
:class:`SourceConfig`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.quarantine import Quarantine, ReadChunk
from recsys.data.readers import READERS, open_reader, read_all
from recsys.data.schemas import ITEM, LABEL, RATING, RAW_ITEM, RAW_USER, TIMESTAMP, USER, CTRSchema, InteractionSchema
from recsys.data.splits import SplitConfig, split
from recsys.data.vocab import OOV, Vocabulary
from recsys.errors import ConfigError, DataError

MANIFEST = "manifest.json"
DENSE_TRANSFORMS = ("log1p", "standard", "log1p_standard", "none")
SPLITS = ("train", "valid", "test")
RANKING_EXCLUDES = ("train", "valid")  # default: a test ranking leaves out the items of both earlier splits
_SPLIT = "_split"  # staged column: index of the row's split in SPLITS
_CONSTANT = 1e-6  # a std below this times max(1, |mean|) is a constant column: std 0


@dataclass
class SourceConfig:
    """Where raw data comes from: one file to split, or given split files.

    Args:
        format: a reader name (movielens, sequences, lightgcn, libfm, criteo, parquet) or ``synthetic``.
        path: the raw file (for ``synthetic``: where the generated parquet is written); ignored when
            ``splits`` is set.
        options: keyword options of the reader (e.g. ``layout: atomic``), applied to every file.
        generator: for ``synthetic``, a ``SyntheticInteractions`` or ``SyntheticCTR`` config.
        splits: given splits ``{train: PATH, valid: PATH, test: PATH}`` (valid optional: leave it out
            or null): each file's rows go to that split, read with ``format`` and ``options``, and
            ``data.split`` (or the CTR split fractions) is not used.

    Raises:
        ConfigError: neither path nor splits, a splits key other than train/valid/test, no train or
            test file, or splits with the synthetic format.

    Example:
        >>> SourceConfig("lightgcn", splits={"train": "train.txt", "test": "test.txt"}).given()
        {'train': 'train.txt', 'test': 'test.txt'}
        >>> SourceConfig("lightgcn")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        recsys.errors.ConfigError: set data.source.path (one file, split by data.split) or data.source.splits ...
    """

    format: str
    path: str | None = None
    options: dict = field(default_factory=dict)
    generator: Any = None
    splits: dict[str, str | None] | None = None

    def __post_init__(self) -> None:
        if self.splits is None:
            if not self.path:
                raise ConfigError("set data.source.path (one file, split by data.split) or data.source.splits "
                                  "({train: PATH, valid: PATH, test: PATH}, a given split)")
            return
        if not isinstance(self.splits, Mapping):
            raise ConfigError(f"data.source.splits must map train/valid/test to files, found {self.splits!r}")
        unknown = [str(key) for key in self.splits if key not in SPLITS]
        if unknown:
            raise ConfigError(f"data.source.splits: unknown split(s) {', '.join(unknown)}; expected train, test "
                              f"and optionally valid")
        missing = [name for name in ("train", "test") if not self.splits.get(name)]
        if missing:
            raise ConfigError(f"data.source.splits needs a {' and a '.join(missing)} file; found "
                              f"{dict(self.splits)}")
        if self.format == "synthetic":
            raise ConfigError("data.source.splits needs a reader format (e.g. lightgcn, libfm, parquet); "
                              "synthetic data is generated as one file and split by data.split")

    def given(self) -> dict[str, str] | None:
        """The given split files in SPLITS order (None when the data is one file to split)."""
        if self.splits is None:
            return None
        return {name: str(self.splits[name]) for name in SPLITS if self.splits.get(name)}


@dataclass
class InteractionFilters:
    """Row filters applied before indexing.

    Args:
        min_rating: keep rows with rating >= this (e.g. 4 for "liked" on MovieLens); None keeps all.
        min_item_count: vocabulary threshold for items; rarer items are dropped (counted).
        min_user_count: vocabulary threshold for users.
        min_user_interactions: drop users with fewer rows after the other filters.
        dedupe: keep one row per (user, item): the latest.

    With given splits (``data.source.splits``) the filters see the rows of all splits together: the
    vocabulary counts and ``min_user_interactions`` count a user's rows over all splits (a user is
    dropped from every split or from none), and dedupe works within each split (a pair in train and
    in test stays in both; it is counted as ``test_pairs_seen``). Every row a filter drops is counted
    per split in the manifest's ``rows.by_split``.
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
        dense_transform: ``log1p`` (log(1 + max(x, 0))), ``standard`` ((x - mean) / std),
            ``log1p_standard`` (log1p, then standardized) or ``none``. Missing values become 0 after
            the transform (the mean, for the standardized ones). The means and standard deviations
            (population, over the non-missing training values only) are in the manifest's
            ``dense_stats``; a constant column (std 0) is only centred (divided by 1).
        valid_fraction, test_fraction: random row split shares (seeded, streaming).
        seed: seed of the split.
    """

    dense: list[str] | None = None
    sparse: list[str] | None = None
    multi_valued: list[str] | None = None
    min_count: int = 1
    dense_transform: Literal["log1p", "standard", "log1p_standard", "none"] = "log1p"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


def materialize(source: SourceConfig) -> tuple[str, Path]:
    """Returns the (reader format, path) to read, generating synthetic data first if needed."""
    path = Path(source.path)
    if source.format != "synthetic":
        return source.format, path
    stamp, stats = path.with_suffix(".settings.json"), generator_stats_path(path)
    settings = json.dumps(asdict(source.generator), sort_keys=True, default=str)
    if not (path.is_file() and stats.is_file() and stamp.is_file() and stamp.read_text() == settings):
        path.parent.mkdir(parents=True, exist_ok=True)
        from recsys.data import synthetic
        kind = "ctr" if isinstance(source.generator, getattr(synthetic, "SyntheticCTR", ())) else "interactions"
        stats.write_text(json.dumps(getattr(synthetic, f"generate_{kind}")(source.generator, path), default=str))
        stamp.write_text(settings)
    return "parquet", path


def generator_stats_path(path: Path) -> Path:
    """Where :func:`materialize` keeps the generator's stats (e.g. ``planted_auc``) of a synthetic file."""
    return path.with_suffix(".stats.json")


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
                         settings: dict | None = None, graph_clusters: float | None = None,
                         ranking_excludes: tuple[str, ...] = RANKING_EXCLUDES) -> dict:
    """Reads, validates, filters, indexes and splits interactions; returns the manifest.

    ``ranking_excludes`` (kept in the manifest) names the splits whose items a user's test ranking leaves out:
    train and valid, or train only, as published LightGCN-style splits are scored.

    With given splits (``source.splits``) each file's rows form its split and ``split_cfg`` is not
    used (the manifest's ``split`` is ``{"method": "given", "files": {...}}``). One vocabulary spans
    all splits: users and items of valid/test that never occur in train get an index and are kept
    (evaluation ranks them like any other). The manifest's ``rows`` then also has ``by_split``
    (per split: read, bad, every filter's drops, kept), and for valid and test
    ``<split>_users_without_train`` and ``<split>_items_without_train`` (distinct ids with no
    training row) and ``<split>_pairs_seen`` (rows whose pair is in an earlier split: train, and
    valid for test; evaluation excludes those items from the user's ranking, so they cannot be
    hits). Each split's bad rows must stay within ``max_bad_fraction``.

    With ``graph_clusters`` (a modularity resolution), users and items are also clustered by
    Leiden on the training interaction graph, into ``clusters/user.parquet`` and ``clusters/item.parquet``
    (one cluster id per index), for GraphHash.

    Example:
        >>> prepare_interactions(SourceConfig("movielens", "u.data"), "prepared/ml",
        ...                      InteractionFilters(min_rating=4), SplitConfig())  # doctest: +SKIP
        >>> prepare_interactions(SourceConfig("lightgcn", splits={"train": "train.txt", "test": "test.txt"}),
        ...                      "prepared/gowalla", InteractionFilters(), SplitConfig())  # doctest: +SKIP
    """
    if "train" not in ranking_excludes or not set(ranking_excludes) <= set(RANKING_EXCLUDES):
        raise ConfigError(f"data.ranking_excludes must be [train] or [train, valid], got {list(ranking_excludes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _given_files(source)
    if files is None:
        path, chunks = _reader(source)
    else:
        path, readers = files["train"], _given_readers(source, files)
    quarantine = Quarantine(out / "quarantine.jsonl")
    with quarantine:
        if files is None:
            frame, by_split = read_all(chunks, quarantine), None
            _check_interaction_columns(frame, path)
        else:
            frame, by_split = _read_given(readers, files, quarantine)
    quarantine.check(max_bad_fraction)
    if by_split is not None:
        _check_split_quality(by_split, files, max_bad_fraction, quarantine)
    counts: dict[str, Any] = {"read": quarantine.n_total, "bad": quarantine.n_bad}

    if filters.min_rating is not None:
        if RATING not in frame:
            raise DataError(f"{path}: data.filters.min_rating is set but the data has no '{RATING}' column")
        frame = _drop(frame, (frame[RATING] < filters.min_rating).to_numpy(), "below_min_rating", counts, by_split)
    if filters.dedupe:
        if TIMESTAMP in frame:
            frame = frame.sort_values(TIMESTAMP, kind="stable")
        key = [RAW_USER, RAW_ITEM] + ([_SPLIT] if by_split is not None else [])
        frame = _drop(frame, frame.duplicated(key, keep="last").to_numpy(), "duplicates", counts, by_split)

    users = Vocabulary.build(frame[RAW_USER], filters.min_user_count, name=USER)
    items = Vocabulary.build(frame[RAW_ITEM], filters.min_item_count, name=ITEM)
    indexed = pd.DataFrame({USER: users.lookup(frame[RAW_USER]), ITEM: items.lookup(frame[RAW_ITEM])})
    for column, dtype in ((RATING, np.float32), (TIMESTAMP, np.int64), (_SPLIT, np.int8)):
        if column in frame:
            indexed[column] = frame[column].to_numpy().astype(dtype)
    indexed = _drop(indexed, ((indexed[USER] == OOV) | (indexed[ITEM] == OOV)).to_numpy(), "below_min_count",
                    counts, by_split)
    user_rows = indexed.groupby(USER)[USER].transform("size")
    indexed = _drop(indexed, (user_rows < filters.min_user_interactions).to_numpy(), "below_min_user_interactions",
                    counts, by_split).reset_index(drop=True)
    if indexed.empty:
        raise DataError(f"{path}: no interactions left after filtering ({counts}); relax data.filters")

    schema = InteractionSchema(has_rating=RATING in indexed, has_timestamp=TIMESTAMP in indexed)
    if files is None:
        parts, split_info = split(indexed, split_cfg), asdict(split_cfg)
    else:
        parts, split_info = _given_parts(indexed, files, by_split, counts), {"method": "given", "files": _resolved(files)}
    for name, part in parts.items():
        pq.write_table(pa.Table.from_pandas(part, schema=schema.prepared(), preserve_index=False), out / f"{name}.parquet")
        counts[name] = len(part)
    _remove_other_splits(out, parts)
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
    if by_split is not None:
        counts["by_split"] = by_split
    manifest = {
        "kind": "interactions",
        "schema": {"columns": schema.prepared().names},
        "rows": counts,
        "vocab_sizes": {USER: len(users), ITEM: len(items)},
        "split": split_info,
        "filters": asdict(filters),
        "graph_clusters": clusters,
        "ranking_excludes": list(ranking_excludes),
    }
    return _finish(out, manifest, [Path(p) for p in files.values()] if files else [path], quarantine, settings)


def _given_files(source: SourceConfig) -> dict[str, str] | None:
    """The given split files (None: one file to split), after checking each exists and the format is known."""
    files = source.given()
    if files is None:
        return None
    for name, path in files.items():
        if not Path(path).is_file():
            what = "is not a regular file" if Path(path).exists() else "file not found"
            raise DataError(f"data.source.splits.{name}: {path}: {what}")
    if source.format not in READERS:
        raise DataError(f"unknown format {source.format!r} for data.source.splits; expected one of {', '.join(READERS)}")
    return files


def _given_readers(source: SourceConfig, files: dict[str, str]) -> dict[str, Iterator[ReadChunk]]:
    """A reader of each given split file (each checks its file before anything is read)."""
    return {name: open_reader(source.format, path, **dict(source.options)) for name, path in files.items()}


def _read_given(readers: dict[str, Iterator[ReadChunk]], files: dict[str, str],
                quarantine: Quarantine) -> tuple[pd.DataFrame, dict]:
    """Reads every split file into one frame with a ``_SPLIT`` column; per-split read and bad counts."""
    frames, by_split, columns = [], {}, None
    for name, chunks in readers.items():
        total, bad = quarantine.n_total, quarantine.n_bad
        frame = read_all(chunks, quarantine)
        by_split[name] = {"read": quarantine.n_total - total, "bad": quarantine.n_bad - bad}
        _check_interaction_columns(frame, files[name], name)
        columns = columns or _columns(frame)
        if _columns(frame) != columns:
            raise DataError(f"data.source.splits.{name}: {files[name]}: columns {_columns(frame)} differ from the "
                            f"train file's {columns}")
        frames.append(frame.assign(**{_SPLIT: np.int8(SPLITS.index(name))}))
    return pd.concat(frames, ignore_index=True), by_split


def _resolved(files: dict[str, str]) -> dict[str, str]:
    return {name: str(Path(path).resolve()) for name, path in files.items()}


def _columns(frame: pd.DataFrame) -> dict[str, str]:
    return {name: str(dtype) for name, dtype in frame.dtypes.items()}


def _check_interaction_columns(frame: pd.DataFrame, path: str | Path, split_name: str | None = None) -> None:
    missing = {RAW_USER, RAW_ITEM} - set(frame.columns)
    if missing:
        where = f"data.source.splits.{split_name}: {path}" if split_name else str(path)
        raise DataError(f"{where}: interactions need columns {sorted(missing)}; found {list(frame.columns)}")


def _check_split_quality(by_split: dict, files: dict[str, str], max_bad_fraction: float,
                         quarantine: Quarantine) -> None:
    """Each given split's share of bad rows must stay within ``max_bad_fraction`` (not only their total)."""
    for name, rows in by_split.items():
        if rows["read"] and rows["bad"] / rows["read"] > max_bad_fraction + 1e-12:
            raise DataError(f"data.source.splits.{name}: {files[name]}: {rows['bad']} of {rows['read']} rows are bad "
                            f"(fraction {rows['bad'] / rows['read']:.4g}), above max_bad_fraction={max_bad_fraction:g}; "
                            f"the bad rows are in {quarantine.path}")


def _drop(frame: pd.DataFrame, drop: np.ndarray, key: str, counts: dict, by_split: dict | None) -> pd.DataFrame:
    """``frame`` without the ``drop`` rows, counted under ``key`` (and per given split)."""
    counts[key] = int(drop.sum())
    if by_split is not None:
        dropped = np.bincount(frame[_SPLIT].to_numpy()[drop], minlength=len(SPLITS))
        for name in by_split:
            by_split[name][key] = int(dropped[SPLITS.index(name)])
    return frame[~drop]


def _given_parts(indexed: pd.DataFrame, files: dict[str, str], by_split: dict, counts: dict) -> dict[str, pd.DataFrame]:
    """The indexed rows of each given split, and the counts of valid/test rows that training does not cover."""
    code = indexed[_SPLIT].to_numpy()
    parts = {}
    for name in files:
        part = indexed[code == SPLITS.index(name)].drop(columns=_SPLIT).reset_index(drop=True)
        by_split[name]["kept"] = len(part)
        if part.empty:
            raise DataError(f"data.source.splits.{name}: {files[name]}: no interactions left after filtering "
                            f"({by_split[name]}); relax data.filters")
        parts[name] = part
    n_items = int(indexed[ITEM].max()) + 1
    train = parts["train"]
    seen = train[USER].to_numpy() * n_items + train[ITEM].to_numpy()
    for name in ("valid", "test"):
        if name not in parts:
            continue
        part = parts[name]
        counts[f"{name}_users_without_train"] = int(np.setdiff1d(part[USER].unique(), train[USER].unique()).size)
        counts[f"{name}_items_without_train"] = int(np.setdiff1d(part[ITEM].unique(), train[ITEM].unique()).size)
        pairs = part[USER].to_numpy() * n_items + part[ITEM].to_numpy()
        counts[f"{name}_pairs_seen"] = int(np.isin(pairs, seen).sum())
        seen = np.concatenate([seen, pairs])
    return parts


def _remove_other_splits(out: Path, written) -> None:
    """Removes split files of an earlier prepare in ``out`` that this one did not write (e.g. a valid split)."""
    for name in SPLITS:
        if name not in written:
            (out / f"{name}.parquet").unlink(missing_ok=True)


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
    """Streams CTR rows in two passes; returns the manifest.

    Pass 1 validates the rows, draws each row's split (seeded per chunk), counts the ids and fits
    the dense statistics on the training rows; pass 2 indexes the ids, transforms the dense
    columns and writes the splits. Memory is bounded by one reader chunk plus the vocabularies,
    whatever the file size. For a synthetic source, the generator's stats (``planted_auc``, ...)
    are in the manifest's ``generator``.

    With given splits (``source.splits``), pass 1 reads each file in turn and its rows go to its
    split (the split fractions and seed are not used); the vocabularies count the ids of all splits,
    the dense statistics are fitted on the train file's rows only, and ``rows.by_split`` has each
    file's read, bad and kept rows. Each split's bad rows must stay within ``max_bad_fraction``.

    Example:
        >>> prepare_ctr(SourceConfig("criteo", "day_0"), "prepared/criteo",
        ...             CTRSettings(min_count=10, dense_transform="log1p_standard"))  # doctest: +SKIP
        >>> frappe = SourceConfig("libfm", options={"field_names": FRAPPE_FIELDS},  # doctest: +SKIP
        ...                       splits={"train": "train.libfm", "valid": "valid.libfm", "test": "test.libfm"})
        >>> prepare_ctr(frappe, "prepared/frappe", CTRSettings(dense_transform="none"))  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings_ctr.dense_transform not in DENSE_TRANSFORMS:
        raise ConfigError(f"data.ctr.dense_transform must be one of {', '.join(DENSE_TRANSFORMS)}, "
                          f"got {settings_ctr.dense_transform!r}")
    files = _given_files(source)
    if files is None:
        path, chunks = _reader(source)
        streams = [(None, path, chunks)]  # split code None: drawn per row
    else:
        path, readers = Path(files["train"]), _given_readers(source, files)
        streams = [(SPLITS.index(name), Path(files[name]), chunks) for name, chunks in readers.items()]
    quarantine = Quarantine(out / "quarantine.jsonl")
    staged = out / "_staged.parquet"
    schema, writer, id_counts, moments, n_chunks, by_split = None, None, {}, None, 0, {}
    try:
        for code, file, chunks in streams:  # pass 1: validate, split, count ids, fit dense stats, stage good rows
            total, bad = quarantine.n_total, quarantine.n_bad
            for chunk in chunks:
                quarantine.add(file, chunk)
                if chunk.frame.empty:
                    continue
                schema = schema or _infer_ctr_schema(chunk.frame, settings_ctr, file)
                frame = _ctr_columns(chunk.frame, schema, file)
                for name in schema.sparse_features:
                    values = frame[name].explode() if name in schema.multi_valued else frame[name]
                    counted = values.dropna().value_counts(sort=False)
                    id_counts[name] = counted if name not in id_counts else id_counts[name].add(counted, fill_value=0)
                if code is None:
                    assignment = _draw_splits(len(frame), settings_ctr, chunk_index=n_chunks)
                    n_chunks += 1
                else:
                    assignment = np.full(len(frame), code, dtype=np.int8)
                if settings_ctr.dense_transform.endswith("standard"):
                    train = frame[list(schema.dense)].to_numpy(np.float64)[assignment == 0]
                    moments = _merge_moments(moments, _base_transform(train, settings_ctr.dense_transform))
                table = pa.Table.from_pandas(frame, preserve_index=False).append_column(_SPLIT, pa.array(assignment))
                writer = writer or pq.ParquetWriter(staged, table.schema)
                writer.write_table(table.cast(writer.schema))
            if code is not None:
                by_split[SPLITS[code]] = {"read": quarantine.n_total - total, "bad": quarantine.n_bad - bad}
    finally:
        if writer:
            writer.close()
        quarantine.close()
    quarantine.check(max_bad_fraction)
    if files is not None:
        _check_split_quality(by_split, files, max_bad_fraction, quarantine)
    if schema is None:
        raise DataError(f"{path}: no valid CTR rows")
    vocabs = {n: Vocabulary.from_counts(c.astype(np.int64), settings_ctr.min_count, name=n) for n, c in id_counts.items()}
    dense_stats = _dense_stats(schema.dense, moments) if moments is not None else None

    rows = _index_and_split(staged, out, schema, vocabs, settings_ctr.dense_transform, dense_stats,
                            tuple(files) if files else SPLITS)
    staged.unlink()
    _remove_other_splits(out, rows)
    for name, counts in by_split.items():
        counts["kept"] = rows[name]
    (out / "vocab").mkdir(exist_ok=True)
    for name, vocab in vocabs.items():
        vocab.save(out / "vocab" / f"{name}.parquet")
    manifest = {
        "kind": "ctr",
        "schema": schema.to_dict(),
        "rows": {"read": quarantine.n_total, "bad": quarantine.n_bad, **rows, **({"by_split": by_split} if files else {})},
        "vocab_sizes": {n: len(v) for n, v in vocabs.items()},
        "split": ({"method": "given", "files": _resolved(files)} if files else
                  {"valid_fraction": settings_ctr.valid_fraction, "test_fraction": settings_ctr.test_fraction,
                   "seed": settings_ctr.seed, "method": "random_rows"}),
        "ctr": asdict(settings_ctr),
        "dense_stats": dense_stats,
    }
    if source.format == "synthetic":
        manifest["generator"] = json.loads(generator_stats_path(path).read_text())
    return _finish(out, manifest, [file for _, file, _ in streams], quarantine, settings)


def _ctr_columns(frame: pd.DataFrame, schema: CTRSchema, path: Path) -> pd.DataFrame:
    """The label and feature columns of a chunk, in schema order (a given split file must have them all)."""
    needed = [LABEL, *schema.dense, *schema.sparse_features]
    absent = [name for name in needed if name not in frame]
    if absent:
        raise DataError(f"{path}: missing column(s) {', '.join(absent)} that the first file's rows have; found "
                        f"{list(frame.columns)}")
    return frame[needed]


def _draw_splits(n: int, s: CTRSettings, chunk_index: int) -> np.ndarray:
    """Split index (into SPLITS) of each row of a chunk: uniform draws seeded by (seed, chunk index)."""
    edges = np.cumsum([1 - s.valid_fraction - s.test_fraction, s.valid_fraction])
    draw = np.random.default_rng([s.seed, chunk_index]).random(n)
    return np.searchsorted(edges, draw, side="right").astype(np.int8)


def _base_transform(x: np.ndarray, transform: str) -> np.ndarray:
    """log1p(max(x, 0)) for the log1p transforms, else x; NaN (missing) stays NaN."""
    return np.log1p(np.maximum(x, 0)) if transform.startswith("log1p") else x


Moments = tuple[np.ndarray, np.ndarray, np.ndarray]  # per column: count, mean, sum of squared deviations


def _merge_moments(acc: Moments | None, x: np.ndarray) -> Moments:
    """Adds the non-NaN values of ``x`` (rows, columns) to running moments (Chan et al.'s pairwise update)."""
    n_b = (~np.isnan(x)).sum(axis=0)
    mean_b = np.divide(np.nansum(x, axis=0), n_b, out=np.zeros(x.shape[1]), where=n_b > 0)
    m2_b = np.nansum((x - mean_b) ** 2, axis=0)
    if acc is None:
        return n_b, mean_b, m2_b
    n_a, mean_a, m2_a = acc
    n = n_a + n_b
    share = np.divide(n_b, n, out=np.zeros(len(n)), where=n > 0)
    delta = mean_b - mean_a
    return n, mean_a + delta * share, m2_a + m2_b + delta ** 2 * n_a * share


def _dense_stats(names: tuple[str, ...], moments: Moments) -> dict[str, dict]:
    """``{column: {mean, std, count}}`` from the moments; a near-constant column gets std 0."""
    n, mean, m2 = moments
    std = np.sqrt(np.divide(m2, n, out=np.zeros(len(n)), where=n > 0))
    std[std < _CONSTANT * np.maximum(1.0, np.abs(mean))] = 0.0
    return {name: {"mean": float(mean[j]), "std": float(std[j]), "count": int(n[j])} for j, name in enumerate(names)}


def transform_dense(x: np.ndarray, transform: str, stats: dict | None = None) -> np.ndarray:
    """Applies a dense transform of :class:`CTRSettings` to the raw values of one column.

    Args:
        x: raw values (NaN = missing).
        transform: one of DENSE_TRANSFORMS.
        stats: the column's ``{mean, std}`` from the manifest's ``dense_stats`` (standardized
            transforms only); std 0 divides by 1.

    Returns:
        float32 values, missing -> 0.

    Example:
        >>> transform_dense(np.array([1.0, np.nan, 3.0]), "standard", {"mean": 2.0, "std": 0.5}).tolist()
        [-2.0, 0.0, 2.0]
    """
    y = _base_transform(np.asarray(x, dtype=np.float64), transform)
    if transform.endswith("standard"):
        y = (y - stats["mean"]) / (stats["std"] or 1.0)
    return np.nan_to_num(y, nan=0.0).astype(np.float32)


def _index_and_split(staged: Path, out: Path, schema: CTRSchema, vocabs: dict[str, Vocabulary],
                     transform: str, dense_stats: dict[str, dict] | None,
                     names: tuple[str, ...] = SPLITS) -> dict[str, int]:
    """Pass 2: map ids through the vocabularies, transform dense columns, write each row to its split
    (one file per split of ``names``)."""
    target = schema.prepared()
    writers = {n: pq.ParquetWriter(out / f"{n}.parquet", target) for n in names}
    rows = dict.fromkeys(names, 0)
    file = pq.ParquetFile(staged)
    for group in range(file.num_row_groups):
        table = file.read_row_group(group)
        columns = {LABEL: pc.cast(table[LABEL], pa.int8())}
        for name in schema.dense:
            x = table[name].to_numpy(zero_copy_only=False)
            columns[name] = pa.array(transform_dense(x, transform, dense_stats and dense_stats[name]))
        for name in schema.sparse:
            columns[name] = pa.array(vocabs[name].lookup(table[name].to_numpy(zero_copy_only=False)))
        for name in schema.multi_valued:
            lists = table[name].combine_chunks()
            flat = vocabs[name].lookup(pc.list_flatten(lists).to_numpy(zero_copy_only=False))
            columns[name] = pa.ListArray.from_arrays(pc.fill_null(lists.offsets, 0), pa.array(flat))
        indexed = pa.table(columns, schema=target)
        assignment = table[_SPLIT].to_numpy()
        for name in names:
            part = indexed.filter(pa.array(assignment == SPLITS.index(name)))
            writers[name].write_table(part)
            rows[name] += part.num_rows
    for writer in writers.values():
        writer.close()
    return rows
