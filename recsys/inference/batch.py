"""Batch scoring: parquet rows in, partitioned parquet out; resumable, exactly-once, split over ranks.

A ranking model gives the top-``k`` items of every input row's ``user_id`` (long format: ``user_id``, ``rank``
1..k, ``item_id`` as raw ids, ``score``, ``source``); a CTR model gives the ``probability`` of every input row,
beside the row's ``key_columns``. The output directory (``pyarrow.dataset.dataset(out, partitioning="hive")``
reads it back, with an extra ``fragment`` column)::

    <out>/_job.json                           written first: the model, its settings and the input it scores
    <out>/fragment=00003/part-00012.parquet   rows [12 * batch_size, 13 * batch_size) of input file 3 (sorted)
    <out>/_manifest.json                      row counts of every part, once every part exists
    <out>/_SUCCESS                            written last

Exactly once: a part is the deterministic output of one (input file, chunk) pair. It is written under a hidden
temporary name in its directory and renamed into place (``os.replace``), so it exists complete or not at all,
and carries the job's id in its metadata. A re-run skips the parts that exist and writes the others; a killed
run leaves at most hidden temporary files, which the next run removes. ``_job.json`` keeps outputs of another
model, other settings or another input out of the directory (``overwrite=True`` replaces them).

Ranks (``torchrun`` sets ``RANK``/``WORLD_SIZE``): input file ``i`` belongs to rank ``i % WORLD_SIZE``. No
collectives: a rank that has written its parts checks whether every part of the job exists and, if so, writes
the manifest. The last rank to finish always sees every part; two ranks seeing them write the same manifest.

Example:
    >>> summary = score_parquet("models:/recsys@champion", "data/users", "out/top10",  # doctest: +SKIP
    ...                         BatchSettings(k=10), tracking_uri="sqlite:///mlflow.db")
    >>> summary["parts_written"], summary["rows_out"]  # doctest: +SKIP
    (12, 120000)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys.errors import ConfigError, DataError
from recsys.files import publish
from recsys.inference.predict import HISTORY_ID, USER_ID, predict_frame
from recsys.inference.scorers import CTRScorer, Recommender, load
from recsys.tracking.registry import fetched_package
from recsys.training.loop import progress_redraws

log = logging.getLogger(__name__)

JOB, MANIFEST, SUCCESS = "_job.json", "_manifest.json", "_SUCCESS"
JOB_KEY, ROWS_IN_KEY = b"recsys.batch.job", b"recsys.batch.rows_in"  # parquet key-value metadata of every part
PARTITION = re.compile(r"^fragment=(\d+)$")
TEMPORARY = ".*.tmp"  # glob of the hidden temporary files of unfinished writes
RANK_OF_TEMPORARY = re.compile(r"^\..*\.rank(\d+)\.[0-9a-f]+\.tmp$")
INFORMATIONAL = ("model", "job")  # _job.json entries that do not decide whether two runs make the same parts
PROBABILITY = "probability"
Tables = Literal["float", "int8", "int4", "fp16"]
TABLES = ("float", "int8", "int4", "fp16")


@dataclass(frozen=True)
class BatchSettings:
    """How a batch job scores (the ``conf/batch_score.yaml`` keys besides model, input and output).

    Args:
        k: items per user (ranking models).
        exclude_seen: leave out the items a known user interacted with in training and validation (ranking).
        batch_size: rows per chunk; one output part per (input file, chunk).
        key_columns: input columns copied beside a CTR model's ``probability`` (ranking outputs are keyed by
            ``user_id``).
        tables: ``float`` (as trained) or ``int8``/``int4``/``fp16`` (quantized embedding tables).
        index: FAISS ``index_factory`` string of vector models' item index (``Flat`` = exact).
        overwrite: replace the output of a different job in the output directory instead of refusing.
        progress: show a tqdm progress bar (rows); where stderr is not a terminal (a CI or nohup log), log one line
            per input file instead.
    """

    k: int = 10
    exclude_seen: bool = True
    batch_size: int = 10_000
    key_columns: tuple[str, ...] = ()
    tables: Tables = "float"
    index: str = "Flat"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "key_columns", tuple(self.key_columns))
        if self.k < 1:
            raise ConfigError(f"batch scoring: k must be >= 1, got {self.k}")
        if self.batch_size < 1:
            raise ConfigError(f"batch scoring: batch_size must be >= 1, got {self.batch_size}")
        if self.tables not in TABLES:
            raise ConfigError(f"batch scoring: tables must be one of {TABLES}, got {self.tables!r}")
        if PROBABILITY in self.key_columns or len(set(self.key_columns)) != len(self.key_columns):
            raise ConfigError(f"batch scoring: key_columns must be distinct and not '{PROBABILITY}', "
                              f"got {list(self.key_columns)}")


# ---------------------------------------------------------------------------------------------------- the model
def load_model(model: str | Path, tracking_uri: str | None = None, tables: str = "float", index: str = "Flat",
               quiet: bool = False) -> tuple[Recommender | CTRScorer, str]:
    """The scorer of a package directory or an MLflow model URI (``recsys.tracking.registry.fetched_package``) and
    the sha256 of its package files."""
    with fetched_package(model, tracking_uri, quiet) as fetched:
        return load(fetched.directory, tables, index), fetched.digest


# ---------------------------------------------------------------------------------------------------- the input
def input_fragments(source: str | Path) -> tuple[ds.Dataset, list[ds.Fragment]]:
    """The parquet dataset of a file or directory and its files sorted by path (their positions name the parts)."""
    if not Path(source).exists():
        raise DataError(f"batch input {source}: no such file or directory")
    try:
        dataset = ds.dataset(str(source), format="parquet")
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"batch input {source}: not readable as parquet: {error}") from error
    fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    if not fragments:
        raise DataError(f"batch input {source}: no parquet files found")
    return dataset, fragments


def _chunks(fragment: ds.Fragment, columns: list[str], size: int) -> Iterator[pa.Table]:
    """Consecutive tables of ``size`` rows (the last may be shorter) of a fragment, whatever its row groups."""
    pending, buffered, schema = [], 0, None
    for batch in fragment.to_batches(columns=columns, batch_size=size):
        schema = batch.schema
        pending.append(batch)
        buffered += batch.num_rows
        while buffered >= size:
            table = pa.Table.from_batches(pending, schema)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, buffered = rest.to_batches(), rest.num_rows
    if buffered:
        yield pa.Table.from_batches(pending, schema)


# ---------------------------------------------------------------------------------------------------- output rows
class _Ranking:
    """Chunks of ``user_id`` (+ optional ``history``) -> long-format top-k rows."""

    def __init__(self, model: Recommender, schema: pa.Schema, settings: BatchSettings):
        if settings.key_columns:
            raise ConfigError(f"key_columns {list(settings.key_columns)}: only CTR outputs carry key columns; a "
                              f"ranking model's rows are keyed by '{USER_ID}' (set key_columns=[])")
        self.model, self.required = model, [USER_ID]
        self.params = {"k": settings.k, "exclude_seen": settings.exclude_seen}
        self.item_type = pa.string() if model.items.ids.dtype.kind in "OUS" else pa.from_numpy_dtype(model.items.ids.dtype)
        self.schema = pa.schema([(USER_ID, schema.field(USER_ID).type), ("rank", pa.int32()), ("item_id", self.item_type),
                                 ("score", pa.float32()), ("source", pa.string())])

    def columns(self, names: list[str]) -> list[str]:
        return [USER_ID] + ([HISTORY_ID] if HISTORY_ID in names else [])

    def __call__(self, chunk: pa.Table) -> pa.Table:
        found = predict_frame(self.model, _frame(chunk), self.params)
        items = pa.array(found["items"].tolist(), type=pa.list_(self.item_type))
        scores = pa.array(found["scores"].tolist(), type=pa.list_(pa.float32()))
        offsets = items.offsets.to_numpy()
        lengths = np.diff(offsets)
        row = np.repeat(np.arange(len(lengths)), lengths)  # the input row of every output row
        rank = np.arange(len(row)) - np.repeat(offsets[:-1] - offsets[0], lengths) + 1
        source = pa.array(found["source"].to_numpy(dtype=object), type=pa.string())
        return pa.table([chunk[USER_ID].take(row).cast(self.schema.field(USER_ID).type), pa.array(rank, pa.int32()),
                         items.flatten(), scores.flatten(), source.take(row)], schema=self.schema)


def _frame(chunk: pa.Table):
    """A chunk as pandas with integer columns holding nulls as Python ints and None (not float64, which would
    round large ids)."""
    return chunk.to_pandas(integer_object_nulls=True)


class _Probabilities:
    """Chunks of raw CTR rows -> the key columns and ``probability``."""

    def __init__(self, model: CTRScorer, schema: pa.Schema, settings: BatchSettings):
        self.model, self.keys = model, list(settings.key_columns)
        self.required = list(dict.fromkeys([*model.columns, *self.keys]))
        self.schema = pa.schema([*(schema.field(c) for c in self.keys), (PROBABILITY, pa.float32())])

    def columns(self, names: list[str]) -> list[str]:
        return self.required

    def __call__(self, chunk: pa.Table) -> pa.Table:
        probability = predict_frame(self.model, _frame(chunk.select(self.model.columns)), {})[PROBABILITY]
        arrays = [chunk[c].cast(self.schema.field(c).type) for c in self.keys]
        return pa.table([*arrays, pa.array(probability.to_numpy(np.float32))], schema=self.schema)


# ---------------------------------------------------------------------------------------------------- the job
def job_record(model: str | Path, digest: str, scorer: Recommender | CTRScorer, source: str | Path,
               fragments: list[ds.Fragment], rows: list[int], settings: BatchSettings) -> dict:
    """What ``_job.json`` holds: everything that decides the parts' content and names, and the job's id."""
    root = Path(source).resolve()
    files = [os.path.relpath(f.path, root) if root.is_dir() else Path(f.path).name for f in fragments]
    listing = hashlib.sha256(json.dumps(list(zip(files, rows))).encode()).hexdigest()
    record = {"model": str(model), "package_sha256": digest, "family": scorer.family, "input": str(root),
              "input_files": len(files), "input_rows": sum(rows), "input_listing_sha256": listing,
              "batch_size": settings.batch_size, "tables": settings.tables}
    if isinstance(scorer, CTRScorer):
        record["key_columns"] = list(settings.key_columns)
    else:
        record |= {"k": settings.k, "exclude_seen": settings.exclude_seen, "index": settings.index}
    decisive = {k: v for k, v in record.items() if k not in INFORMATIONAL}
    return record | {"job": hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]}


def differences(found: dict, record: dict) -> list[str]:
    """The decisive entries in which a stored ``_job.json`` differs from this run's, as readable lines."""
    lines = []
    for key in sorted((set(found) | set(record)) - set(INFORMATIONAL)):
        if found.get(key) != record.get(key):
            line = f"{key}: {found.get(key)!r} in {JOB}, {record.get(key)!r} now"
            if key == "package_sha256":
                line += f" (model {found.get('model')} then, {record.get('model')} now)"
            lines.append(line)
    return lines


def part_path(out: Path, fragment: int, chunk: int) -> Path:
    """Where the output of chunk ``chunk`` of input file ``fragment`` goes."""
    return out / f"fragment={fragment:05d}" / f"part-{chunk:05d}.parquet"


def finished_rows(path: Path, job: str) -> int | None:
    """Rows of a finished part of job ``job``; None when it is missing, unreadable or another job's."""
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid):
        return None
    return metadata.num_rows if (metadata.metadata or {}).get(JOB_KEY) == job.encode() else None


def ranks(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torchrun's ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    try:
        rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    except ValueError as error:
        raise ConfigError(f"RANK/WORLD_SIZE must be integers: {error}") from error
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..world_size-1, got rank {rank} of world size {world_size}")
    return rank, world_size


def score_parquet(model: str | Path, source: str | Path, output: str | Path, settings: BatchSettings | None = None,
                  tracking_uri: str | None = None, rank: int | None = None, world_size: int | None = None) -> dict:
    """Scores the parquet rows of ``source`` with ``model`` into parts under ``output`` (see the module docstring).

    Args:
        model: a package directory or MLflow model URI (:func:`load_model`).
        source: a parquet file or a directory of parquet files.
        output: the output directory.
        settings: how to score (defaults of :class:`BatchSettings` when None).
        tracking_uri: the MLflow tracking URI of a model URI.
        rank: this process's rank (default: ``RANK``, else 0).
        world_size: the number of ranks (default: ``WORLD_SIZE``, else 1).

    Returns:
        This rank's ``rows_in`` and ``rows_out`` (its input files' rows and its parts' rows, skipped parts
        included), ``parts_written``, ``parts_skipped``, ``seconds``, ``rank``, ``world_size``, ``job`` (the
        job's id), ``output`` and ``complete`` (whether this rank saw every part and wrote the manifest).

    Raises:
        DataError: the input is missing, unreadable or lacks the columns the model reads (naming the file).
        ConfigError: bad settings, an unloadable model, or an output directory holding another job's parts.
    """
    began = time.perf_counter()
    settings = settings or BatchSettings()
    rank, world_size = ranks(rank, world_size)
    dataset, fragments = input_fragments(source)
    live = settings.progress and progress_redraws()  # elsewhere a bar prints a line per redraw
    scorer, digest = load_model(model, tracking_uri, settings.tables, settings.index, quiet=not live)
    kind = "CTR" if isinstance(scorer, CTRScorer) else "ranking"
    to_rows = (_Probabilities if kind == "CTR" else _Ranking)(scorer, _checked_schema(dataset, fragments, scorer, settings),
                                                             settings)
    rows = [f.count_rows() for f in fragments]
    chunks = [math.ceil(n / settings.batch_size) for n in rows]
    record = job_record(model, digest, scorer, source, fragments, rows, settings)
    out = Path(output)
    mine = [i for i in range(len(fragments)) if i % world_size == rank]
    _claim(out, record, mine, len(fragments), rank, world_size, settings.overwrite)

    job = record["job"]
    done = {(i, j): finished_rows(part_path(out, i, j), job) for i in mine for j in range(chunks[i])}
    for i in mine:  # hidden leftovers of a killed run in this rank's partitions
        for leftover in part_path(out, i, 0).parent.glob(TEMPORARY):
            leftover.unlink(missing_ok=True)
    if any(n is None for n in done.values()):
        for marker in (SUCCESS, MANIFEST):  # no stale "complete" while parts are missing
            (out / marker).unlink(missing_ok=True)
    written = skipped = rows_out = 0
    desc = "batch score" if world_size == 1 else f"batch score (rank {rank}/{world_size})"

    def file_done(n: int, i: int) -> None:
        if settings.progress and not live:  # the bar's place in a log file: one line per input file
            log.info("%s: %d/%d files done (%s, %d rows)", desc, n, len(mine), fragments[i].path, rows[i])

    with tqdm(total=sum(rows[i] for i in mine), unit="rows", desc=desc, disable=not live,
              position=rank if world_size > 1 else None) as bar:
        for n, i in enumerate(mine, 1):
            if all(done[i, j] is not None for j in range(chunks[i])):
                skipped += chunks[i]
                rows_out += sum(done[i, j] for j in range(chunks[i]))
                bar.update(rows[i])
                file_done(n, i)
                continue
            names = fragments[i].physical_schema.names
            for j, chunk in enumerate(_chunks(fragments[i], to_rows.columns(names), settings.batch_size)):
                if j >= chunks[i]:
                    raise DataError(f"{fragments[i].path}: the file changed while it was scored (more than {rows[i]} rows)")
                if done[i, j] is not None:
                    skipped += 1
                    rows_out += done[i, j]
                else:
                    table = _score(to_rows, chunk, fragments[i].path)
                    _write_part(table, part_path(out, i, j), job, chunk.num_rows, rank)
                    written += 1
                    rows_out += table.num_rows
                bar.update(chunk.num_rows)
            file_done(n, i)
    complete = _finish(out, record, chunks, rank)
    summary = {"rows_in": sum(rows[i] for i in mine), "rows_out": rows_out, "parts_written": written,
               "parts_skipped": skipped, "seconds": round(time.perf_counter() - began, 3), "rank": rank,
               "world_size": world_size, "job": job, "output": str(out), "complete": complete}
    log.info("batch score %s: %s", kind, json.dumps(summary))
    return summary


def _checked_schema(dataset: ds.Dataset, fragments: list[ds.Fragment], scorer, settings: BatchSettings) -> pa.Schema:
    """The dataset's schema, after checking that every file has the columns the model and settings read."""
    if isinstance(scorer, CTRScorer):
        needed, what = list(dict.fromkeys([*scorer.columns, *settings.key_columns])), "a CTR model (with its key_columns)"
    else:
        needed, what = [USER_ID], "a ranking model"
    for fragment in fragments:
        names = fragment.physical_schema.names
        missing = [c for c in needed if c not in names]
        if missing:
            raise DataError(f"{fragment.path}: batch scoring with {what} needs columns {missing}, which the file "
                            f"lacks; it has {names}")
    return dataset.schema  # one file's (every file has the needed columns); parts are cast to its types


def _score(to_rows, chunk: pa.Table, path: str) -> pa.Table:
    try:
        return to_rows(chunk)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"{path}: cannot score its rows: {error}") from error


def _claim(out: Path, record: dict, mine: list[int], n_fragments: int, rank: int, world_size: int,
           overwrite: bool) -> None:
    """Makes ``out`` this job's: writes ``_job.json``, or checks the one there (with ``overwrite``, replaces it and
    removes this rank's partitions; rank 0 also removes the partitions of no current file). Removes the temporary
    files a killed run of this rank left in ``out`` (rank 0: also those of ranks beyond ``world_size``)."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(TEMPORARY):
        owner = RANK_OF_TEMPORARY.match(leftover.name)
        if owner and (int(owner[1]) == rank or (rank == 0 and int(owner[1]) >= world_size)):
            leftover.unlink(missing_ok=True)
    path = out / JOB
    if overwrite:
        for marker in (SUCCESS, MANIFEST):
            (out / marker).unlink(missing_ok=True)
        for partition in out.iterdir():
            match = PARTITION.match(partition.name)
            if partition.is_dir() and match and (int(match[1]) in mine or (rank == 0 and int(match[1]) >= n_fragments)):
                shutil.rmtree(partition, ignore_errors=True)
        publish(path, lambda t: t.write_bytes(_json(record)), tag=f"rank{rank}.")
        return
    found = _read_job(path)
    if found is None:
        if publish(path, lambda t: t.write_bytes(_json(record)), tag=f"rank{rank}.", exclusive=True):
            return
        found = _read_job(path)  # another rank created it first
    lines = differences(found, record)
    if lines:
        raise ConfigError(f"{out} holds the output of a different batch job: " + "; ".join(lines)
                          + ". Score into another directory, or pass overwrite=true to replace it")


def _read_job(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error}); pass overwrite=true to replace the output") from error


def _finish(out: Path, record: dict, chunks: list[int], rank: int) -> bool:
    """Writes the manifest and ``_SUCCESS`` when every part of the job exists; returns whether it did."""
    parts = {}
    for i, n in enumerate(chunks):
        for j in range(n):
            path = part_path(out, i, j)
            found = finished_rows(path, record["job"])
            if found is None:
                return False
            parts[path.relative_to(out).as_posix()] = found
    counts = {"rows_in": record["input_rows"], "rows_out": sum(parts.values()), "parts": len(parts)}
    manifest = {k: record[k] for k in ("job", "model", "package_sha256", "family", "input")} | counts | {"files": parts}
    publish(out / MANIFEST, lambda t: t.write_bytes(_json(manifest)), tag=f"rank{rank}.")
    publish(out / SUCCESS, lambda t: t.write_bytes(_json({"job": record["job"]} | counts)), tag=f"rank{rank}.")
    return True


# ---------------------------------------------------------------------------------------------------- atomic files
def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def _write_part(table: pa.Table, path: Path, job: str, rows_in: int, rank: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({JOB_KEY: job.encode(), ROWS_IN_KEY: str(rows_in).encode()})
    publish(path, lambda temporary: pq.write_table(table, temporary), tag=f"rank{rank}.")
