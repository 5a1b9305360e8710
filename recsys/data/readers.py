"""Chunked readers of the raw input formats: MovieLens, user-item sequences, LightGCN, libFM, Criteo, Parquet.

Every reader checks the file up front (exists, is text, looks like the format), then returns a
generator of :class:`~recsys.data.quarantine.ReadChunk`: ``chunksize`` lines at a time, split and
converted with vectorized pandas/pyarrow operations. A malformed line does not stop the read: it is
returned in the chunk's ``bad`` table with its 1-based line number and the reason, for a
:class:`~recsys.data.quarantine.Quarantine` to save and count. Blank lines are skipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.quarantine import Quarantine, ReadChunk, empty_bad
from recsys.data.schemas import LABEL, RATING, RAW_ITEM, RAW_USER, TIMESTAMP
from recsys.errors import ConfigError, DataError

DEFAULT_CHUNKSIZE = 1_000_000
BINARY_NUL_SHARE = 0.1  # a text file's first 4 KiB with more NUL bytes than this share is taken for binary

FRAPPE_FIELDS = ("user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather",
                 "country", "city")
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))

UDATA = "MovieLens u.data: user<TAB>item<TAB>rating<TAB>timestamp, no header"
RATINGS_CSV = "MovieLens ratings.csv: header userId,movieId,rating,timestamp"
ATOMIC = ("RecBole atomic file: tab-separated, header like "
          "user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float")
SEQUENCES = "user-item sequence file: one 'user item' pair per line in time order, no header"
LIGHTGCN = "LightGCN text file: one line per user, 'user item item ...', whitespace-separated integer ids"
LIBFM = "libFM file: 'label idx:val idx:val ...' per line, label in {-1, 0, 1}"
CRITEO = "Criteo TSV: label<TAB>13 integer columns<TAB>26 hex categorical columns, no header"
CRITEO_UNLABELED = "Criteo TSV without labels: 13 integer columns<TAB>26 hex categorical columns, no header"

_LAYOUTS = {"udata": UDATA, "ratings_csv": RATINGS_CSV, "atomic": ATOMIC}
_RATINGS_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
_INTERACTION_COLUMNS = (RAW_USER, RAW_ITEM, RATING, TIMESTAMP)
_INT = r"[+-]?\d{1,18}(?:\.0*)?"
_ID_DIGITS = 18  # a LightGCN id: a non-negative integer of at most this many digits, kept as written
LIGHTGCN_CHUNKSIZE = 50_000  # user lines per chunk: a line holds a whole user's list
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_HEX_DIGITS = np.zeros(256, dtype=np.int64)
_HEX_DIGITS[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_DIGITS[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_DIGITS[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_MAX_SHOWN = 60  # characters of an offending value quoted in a reason


# --------------------------------------------------------------------------------------------
# Lines and rows: the parsing machinery shared by the text readers.
# --------------------------------------------------------------------------------------------


class _Rows:
    """One chunk of text lines being parsed: the lines (indexed by line number) and the first
    reason each line is bad."""

    def __init__(self, text: pd.Series) -> None:
        self.text = text
        self.reason = pd.Series(None, index=text.index, dtype=object)

    def flag(self, bad: pd.Series, template: str, found: pd.Series | None = None) -> None:
        """Marks lines bad, keeping an earlier reason; ``{}`` in ``template`` is the found value."""
        if not bad.any():
            return
        bad = bad & self.reason.reindex(bad.index).isna().to_numpy()
        where = bad.index[bad.to_numpy()]
        if found is None:
            self.reason.loc[where] = template
            return
        head, tail = template.split("{}")
        self.reason.loc[where] = head + found.loc[where].astype("str").str.slice(0, _MAX_SHOWN) + tail

    def split(self, sep: str | None, n_fields: int) -> pd.DataFrame:
        """Splits the lines into ``n_fields`` str columns (0..n-1) of the lines with that many fields.

        ``sep=None`` splits on runs of whitespace; other field counts are flagged.
        """
        lines = pa.array(self.text, pa.large_string())
        if sep is None:
            lists = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines))
        else:
            lists = pc.split_pattern(lines, sep)
        counts = pd.Series(pc.list_value_length(lists).to_numpy(), index=self.text.index)
        ok = (counts == n_fields).to_numpy()
        self.flag(pd.Series(~ok, index=counts.index), f"expected {n_fields} fields, found {{}}", counts)
        flat = pc.list_flatten(lists.filter(pa.array(ok)))
        index = self.text.index[ok]
        return pd.DataFrame({j: pd.Series(flat.take(np.arange(j, len(flat), n_fields)), index=index, dtype="str")
                             for j in range(n_fields)}, index=index)

    def chunk(self, frame: pd.DataFrame, source: Path) -> ReadChunk:
        """The chunk of the good rows of ``frame`` (indexed by line number) and the flagged lines."""
        bad = self.reason.notna().to_numpy()
        good = frame[self.reason.reindex(frame.index).isna().to_numpy()]
        rejected = pd.DataFrame({"line": self.text.index[bad].astype("int64"),
                                 "reason": self.reason[bad].astype("str").to_numpy(),
                                 "text": self.text[bad].to_numpy()})
        return ReadChunk(good.reset_index(drop=True), rejected if len(rejected) else empty_bad(),
                         n_lines=len(self.text), source=str(source))


Parser = Callable[[pd.Series, str, _Rows], pd.Series]
Field = tuple[int, str, Parser]  # (position in the line, output column, parser)


def _iter_lines(path: Path, chunksize: int, skip: int = 0) -> Iterator[pd.Series]:
    """Yields the non-blank lines of a text file, ``chunksize`` lines at a time, as str Series
    indexed by 1-based line number (always at least one, possibly empty, Series)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for _ in range(skip):
            handle.readline()
        first, yielded = skip + 1, False
        while (block := list(islice(handle, chunksize))) or not yielded:
            lines = pc.utf8_rtrim(pa.array(block, pa.large_string()), characters="\r\n")
            keep = pc.not_equal(pc.utf8_trim_whitespace(lines), "").to_numpy(zero_copy_only=False)
            numbers = np.arange(first, first + len(block), dtype=np.int64)[keep]
            yield pd.Series(lines.filter(pa.array(keep)), index=numbers, dtype="str")
            first, yielded = first + len(block), True


def _read_delimited(path: Path, sep: str | None, n_fields: int, fields: Sequence[Field], chunksize: int,
                    skip: int = 0) -> Iterator[ReadChunk]:
    """Reads a delimited text file chunk by chunk: splits each line and converts the fields."""
    for text in _iter_lines(path, chunksize, skip):
        rows = _Rows(text)
        parts = rows.split(sep, n_fields)
        frame = pd.DataFrame({name: parse(parts[pos], name, rows) for pos, name, parse in fields},
                             index=parts.index)
        yield rows.chunk(frame, path)


def _checked(chunks: Iterator[ReadChunk], path: Path, expected: str) -> Iterator[ReadChunk]:
    """Passes the chunks on after checking the first one looks like the expected format."""
    first = next(chunks)
    if first.n_lines == 0:
        raise DataError(f"{path}: no data lines (expected {expected})")
    if len(first.bad) > first.n_lines / 2:
        line, reason = first.bad["line"].iloc[0], first.bad["reason"].iloc[0]
        raise DataError(f"{path}: does not look like a {expected}; {len(first.bad)} of the first "
                        f"{first.n_lines} lines are bad (line {line}: {reason})")
    yield first
    yield from chunks


def _text_file(path: str | Path, expected: str) -> Path:
    """The path, after checking it is an existing, uncompressed text file."""
    path = _existing(path, expected)
    with path.open("rb") as handle:
        head = handle.read(4096)
    nul = head.count(b"\x00")  # a few NULs are a damaged line (quarantined like anywhere else), not a binary file
    kind = ("a Parquet file" if head.startswith(b"PAR1") else
            "gzip-compressed (decompress it first)" if head.startswith(b"\x1f\x8b") else
            f"a binary file ({nul} of its first {len(head)} bytes are NUL)" if nul > BINARY_NUL_SHARE * len(head)
            else None)
    if kind:
        raise DataError(f"{path}: is {kind}, expected a text file ({expected})")
    return path


def _existing(path: str | Path, expected: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found (expected {expected})")
    if not path.is_file():
        raise DataError(f"{path}: is not a regular file (expected {expected})")
    return path


def _first_line(path: Path) -> tuple[int, str] | None:
    """The 1-based number and text of the first non-blank line, or None for a blank file."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                return number, line.rstrip("\r\n")
    return None


def _check_chunksize(chunksize: int) -> int:
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ConfigError(f"chunksize must be a positive integer, found {chunksize!r}")
    return chunksize


# --------------------------------------------------------------------------------------------
# Field parsers: (str column indexed by line number, column name, rows) -> converted column.
# Values of flagged rows are placeholders; those rows are dropped from the chunk.
# --------------------------------------------------------------------------------------------


def _parse_str(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
    rows.flag(col == "", f"{name} is empty")
    return col


def _parse_int(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
    ok = col.str.fullmatch(_INT)
    rows.flag(~ok, f"{name} is not an integer: '{{}}'", col)
    clean = col.where(ok, "0")
    if clean.str.contains(".", regex=False).any():
        clean = clean.str.replace(r"\.0*$", "", regex=True)
    return clean.astype("int64")


def _parse_optional_int(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
    """An integer as float32, NaN where the field is empty."""
    missing = col == ""
    return _parse_int(col.where(~missing, "0"), name, rows).astype("float32").where(~missing)


def _parse_float(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
    values = pd.to_numeric(col, errors="coerce")
    ok = np.isfinite(values)
    rows.flag(~ok, f"{name} is not a number: '{{}}'", col)
    return values.where(ok, 0.0).astype("float32")


def _parse_hex(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
    """A hex id as int64, -1 where the field is empty."""
    ok = col.str.fullmatch(r"[0-9a-fA-F]{1,15}")
    rows.flag(~ok & (col != ""), f"{name} is not a hex id of 1-15 digits: '{{}}'", col)
    return pd.Series(_hex_to_int64(col.where(ok, "0")), index=col.index).where(ok, -1)


def _hex_to_int64(col: pd.Series) -> np.ndarray:
    """Decodes valid hex strings of at most 15 digits: left-pads to 16 and weighs the digit bytes."""
    if col.empty:
        return np.zeros(0, dtype=np.int64)
    padded = pc.utf8_lpad(pa.array(col, pa.large_string()), width=16, padding="0")
    offsets = np.frombuffer(padded.buffers()[1], np.int64)[padded.offset:padded.offset + len(padded) + 1]
    digits = np.frombuffer(padded.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 16)
    return _HEX_DIGITS[digits] @ (np.int64(16) ** np.arange(15, -1, -1, dtype=np.int64))


def _label_parser(mapping: dict[int, int]) -> Parser:
    """A parser of a numeric label that must be one of ``mapping``'s keys, mapped to int8."""
    allowed = ", ".join(map(str, sorted(mapping)))

    def parse(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
        values = pd.to_numeric(col, errors="coerce")
        rows.flag(values.isna(), f"{name} is not a number: '{{}}'", col)
        rows.flag(~values.isin(list(mapping)), f"{name} out of range: {{}} (expected one of {allowed})", col)
        return values.map(mapping).fillna(0).astype("int8")

    return parse


def _parse_libfm_token(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
    """The global feature index of an ``idx:val`` token (the value is checked, then ignored)."""
    ok = col.str.fullmatch(rf"\d{{1,18}}:{_NUMBER}")
    rows.flag(~ok, f"{name} is not idx:val: '{{}}'", col)
    return col.where(ok, "0:1").str.replace(r":.*$", "", regex=True).astype("int64")


def _line_position(col: pd.Series, name: str, rows: _Rows) -> pd.Series:
    """The 0-based line index in the file (the file's event order)."""
    return pd.Series(col.index.to_numpy(dtype=np.int64) - 1, index=col.index)


# --------------------------------------------------------------------------------------------
# Readers.
# --------------------------------------------------------------------------------------------


def read_movielens(path: str | Path, layout: str = "auto",
                   chunksize: int = DEFAULT_CHUNKSIZE) -> Iterator[ReadChunk]:
    """Reads MovieLens-style ratings: GroupLens u.data, ml-latest ratings.csv or RecBole atomic.

    Output columns: user_id, item_id (int64), then rating (float32) and timestamp (int64) when the
    file has them. Non-integer ids, non-numeric ratings and wrong field counts are bad rows; the
    rating range is not checked here.

    Args:
        path: the ratings file.
        layout: "udata" (tab-separated user item rating timestamp, no header), "ratings_csv"
            (header userId,movieId,rating,timestamp), "atomic" (RecBole ``name:type`` header; columns
            user_id, item_id and optional rating, timestamp are found by name) or "auto" (detected
            from the first line).
        chunksize: lines per chunk.

    Returns:
        A generator of ReadChunk.

    Raises:
        DataError: the file is missing, binary, has the wrong header or its first chunk is mostly bad.
        ConfigError: unknown layout or bad chunksize.

    Example:
        >>> frame = read_all(read_movielens("ml-100k.inter"), Quarantine(None))  # doctest: +SKIP
        >>> list(frame.columns)  # doctest: +SKIP
        ['user_id', 'item_id', 'rating', 'timestamp']
    """
    if layout != "auto" and layout not in _LAYOUTS:
        raise ConfigError(f"unknown MovieLens layout {layout!r}; expected one of auto, {', '.join(_LAYOUTS)}")
    path = _text_file(path, _LAYOUTS.get(layout, " or ".join(_LAYOUTS.values())))
    first = _first_line(path)
    if layout == "auto":
        layout = _detect_layout(path, first)
    skip, sep, columns = 0, "\t", list(_INTERACTION_COLUMNS)
    if layout == "ratings_csv":
        skip, sep = _check_ratings_csv_header(path, first), ","
    elif layout == "atomic":
        skip, columns = _atomic_columns(path, first)
    parsers = {RAW_USER: _parse_int, RAW_ITEM: _parse_int, RATING: _parse_float, TIMESTAMP: _parse_int}
    fields = sorted(((pos, name, parsers[name]) for pos, name in enumerate(columns) if name in parsers),
                    key=lambda f: _INTERACTION_COLUMNS.index(f[1]))
    chunks = _read_delimited(path, sep, len(columns), fields, _check_chunksize(chunksize), skip)
    return _checked(chunks, path, _LAYOUTS[layout])


def _detect_layout(path: Path, first: tuple[int, str] | None) -> str:
    if first is None:
        return "udata"  # an empty file; reported as "no data lines"
    text = first[1]
    fields = text.split("\t")
    if len(fields) > 1 and all(":" in f for f in fields):
        return "atomic"
    if text.strip().lower().startswith("userid,"):
        return "ratings_csv"
    if len(fields) == 4:
        return "udata"
    raise DataError(f"{path} line {first[0]}: cannot tell the MovieLens layout from {text[:80]!r}; "
                    f"expected one of: {UDATA}; {RATINGS_CSV}; {ATOMIC}")


def _check_ratings_csv_header(path: Path, first: tuple[int, str] | None) -> int:
    """The number of lines to skip (through the header), after checking the header."""
    if first is None:
        return 0
    found = [name.strip() for name in first[1].split(",")]
    if found != _RATINGS_CSV_HEADER:
        raise DataError(f"{path} line {first[0]}: expected header {','.join(_RATINGS_CSV_HEADER)!r} "
                        f"({RATINGS_CSV}), found {first[1][:80]!r}")
    return first[0]


def _atomic_columns(path: Path, first: tuple[int, str] | None) -> tuple[int, list[str]]:
    """The lines to skip and the output column of each field, from a RecBole ``name:type`` header."""
    if first is None:
        return 0, list(_INTERACTION_COLUMNS)
    names = [field.split(":", 1)[0].strip() for field in first[1].split("\t")]
    missing = [name for name in (RAW_USER, RAW_ITEM) if name not in names]
    if missing:
        raise DataError(f"{path} line {first[0]}: header has no {' or '.join(missing)} column, found "
                        f"{first[1][:80]!r} (expected {ATOMIC})")
    return first[0], names


def read_sequences(path: str | Path, sep: str | None = None,
                   chunksize: int = DEFAULT_CHUNKSIZE) -> Iterator[ReadChunk]:
    """Reads ``user item`` lines listed in time order.

    Output columns: user_id, item_id (str, as written) and timestamp (int64): the 0-based line
    index in the file, so sorting by it restores the file's event order.

    Args:
        path: the sequence file.
        sep: the field separator; None splits on runs of whitespace.
        chunksize: lines per chunk.

    Returns:
        A generator of ReadChunk.

    Example:
        >>> frame = read_all(read_sequences("train.txt"), Quarantine(None))  # doctest: +SKIP
        >>> list(frame.columns)  # doctest: +SKIP
        ['user_id', 'item_id', 'timestamp']
    """
    path = _text_file(path, SEQUENCES)
    fields = [(0, RAW_USER, _parse_str), (1, RAW_ITEM, _parse_str), (0, TIMESTAMP, _line_position)]
    return _checked(_read_delimited(path, sep or None, 2, fields, _check_chunksize(chunksize)), path, SEQUENCES)


def read_lightgcn(path: str | Path, chunksize: int = LIGHTGCN_CHUNKSIZE) -> Iterator[ReadChunk]:
    """Reads the LightGCN text layout (Gowalla, Yelp2018, Amazon-Book splits): ``user item item ...``.

    One line per user; every item on it is one (user, item) row, in the line's order. A line with
    a user and no items yields no rows. Ids are non-negative integers of at most 18 digits, kept
    as written (str, like :func:`read_sequences`; ``07`` and ``7`` are two ids). Here a row is one
    (user, item) pair, so ``n_lines`` counts pairs: a token that is not an id rejects its own pair
    (a bad item) or every pair of its line (a bad user; one row if the line has no items), with
    the 1-based line number, the reason, and ``user item`` as the text.

    Output columns: user_id, item_id (str).

    Args:
        path: the file, e.g. LightGCN's ``train.txt``.
        chunksize: lines (users) per chunk.

    Returns:
        A generator of ReadChunk.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "train.txt"
        >>> _ = path.write_text("0 5 6\\n1\\n2 x 7\\n")
        >>> quarantine = Quarantine(None)
        >>> read_all(read_lightgcn(path), quarantine).to_dict("list")
        {'user_id': ['0', '0', '2'], 'item_id': ['5', '6', '7']}
        >>> quarantine.reasons
        {'item_id is not an integer id': 1}
    """
    path = _text_file(path, LIGHTGCN)
    chunksize = _check_chunksize(chunksize)
    return _checked((_explode_lines(text, path) for text in _iter_lines(path, chunksize)), path, LIGHTGCN)


def _explode_lines(text: pd.Series, path: Path) -> ReadChunk:
    """One (user, item) row per item token of each ``user item item ...`` line, bad tokens set aside."""
    lists = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(pa.array(text, pa.large_string())))
    tokens = pc.list_flatten(lists)  # every line has >= 1 token (blank lines are skipped)
    offsets = lists.offsets.to_numpy()
    first = offsets[:-1] - offsets[0]  # position of each line's user token in ``tokens``
    line_of = np.repeat(np.arange(len(first)), np.diff(offsets))
    is_item = np.ones(len(tokens), dtype=bool)
    is_item[first] = False
    valid = pc.and_(pc.ascii_is_decimal(tokens), pc.less_equal(pc.binary_length(tokens), _ID_DIGITS))
    valid = valid.to_numpy(zero_copy_only=False)
    user_ok = valid[first]
    pair_line, item_ok = line_of[is_item], valid[is_item]
    users, items = tokens.take(first[pair_line]), tokens.filter(pa.array(is_item))
    numbers = text.index.to_numpy(dtype=np.int64)
    lonely = ~user_ok & (np.diff(offsets) == 1)  # a bad user on a line without items: one bad row
    parts = []
    for mask, side, values in ((~user_ok[pair_line], RAW_USER, users), (user_ok[pair_line] & ~item_ok, RAW_ITEM, items)):
        if mask.any():
            pick = pa.array(mask)
            pair = pc.binary_join_element_wise(users.filter(pick), items.filter(pick), pa.scalar(" ", pa.large_string()))
            parts.append(pd.DataFrame({"line": numbers[pair_line[mask]], "reason": _not_an_id(side, values.filter(pick)),
                                       "text": pd.Series(pair, dtype="str").to_numpy()}))
    if lonely.any():
        line = text[lonely].str.strip()
        parts.append(pd.DataFrame({"line": numbers[lonely], "reason": _not_an_id(RAW_USER, line),
                                   "text": text[lonely].to_numpy()}))
    bad = (pd.concat(parts, ignore_index=True).sort_values("line", kind="stable", ignore_index=True) if parts
           else empty_bad())
    good = pa.array(user_ok[pair_line] & item_ok)
    frame = pd.DataFrame({RAW_USER: pd.Series(users.filter(good), dtype="str"),
                          RAW_ITEM: pd.Series(items.filter(good), dtype="str")})
    return ReadChunk(frame, bad, n_lines=len(items) + int(lonely.sum()), source=str(path))


def _not_an_id(name: str, values: pa.Array | pd.Series) -> np.ndarray:
    """The reason of each bad id token: ``"<name> is not an integer id: '<token>'"``."""
    values = pd.Series(values, dtype="str").str.slice(0, _MAX_SHOWN)
    return (f"{name} is not an integer id: '" + values + "'").to_numpy()


def read_libfm(path: str | Path, field_names: Sequence[str] | None = None,
               chunksize: int = DEFAULT_CHUNKSIZE) -> Iterator[ReadChunk]:
    """Reads a libFM file of one-hot categorical rows, ``label idx:val idx:val ...``.

    The i-th token after the label is field i. Output columns: label (int8; -1 and 0 -> 0, 1 -> 1)
    and one int64 column per field holding the token's global index. Values other than 1 are
    accepted and ignored.

    Args:
        path: the libFM file.
        field_names: names of the fields in token order, e.g. FRAPPE_FIELDS; None names them
            f0..f{n-1} from the first line's token count.
        chunksize: lines per chunk.

    Returns:
        A generator of ReadChunk.

    Example:
        >>> chunks = read_libfm("frappe.validation.libfm", FRAPPE_FIELDS)  # doctest: +SKIP
        >>> list(read_all(chunks, Quarantine(None)).columns)[:3]  # doctest: +SKIP
        ['label', 'user', 'item']
    """
    path = _text_file(path, LIBFM)
    if field_names is None:
        first = _first_line(path)
        field_names = [f"f{i}" for i in range(len(first[1].split()) - 1)] if first else []
    names = list(field_names)
    if len(set(names)) != len(names) or LABEL in names:
        raise ConfigError(f"libFM field names must be unique and not {LABEL!r}, found {names}")
    fields = [(0, LABEL, _label_parser({-1: 0, 0: 0, 1: 1}))]
    fields += [(i, name, _parse_libfm_token) for i, name in enumerate(names, start=1)]
    chunks = _read_delimited(path, None, len(names) + 1, fields, _check_chunksize(chunksize))
    return _checked(chunks, path, f"{LIBFM} and {len(names)} fields")


def read_criteo(path: str | Path, has_label: bool = True, chunksize: int = DEFAULT_CHUNKSIZE) -> Iterator[ReadChunk]:
    """Reads a Criteo click-log TSV: label, I1..I13 integers, C1..C26 hex ids; empty = missing.

    The Kaggle Display Advertising Challenge ``train.txt`` and the Terabyte ``day_N`` files share
    this 40-column layout; the Kaggle ``test.txt`` has no label (39 columns): read it with
    ``has_label=False`` (for scoring; it has no ``label`` column, so it cannot be prepared).

    Output columns: label (int8 in {0, 1}; only with ``has_label``), I1..I13 (float32, NaN when
    missing), C1..C26 (int64 decoded from hex, -1 when missing).

    Args:
        path: the TSV file (e.g. a day file, uncompressed).
        has_label: whether each line starts with the label.
        chunksize: lines per chunk.

    Returns:
        A generator of ReadChunk.

    Raises:
        DataError: the file is missing or binary, or its first chunk is mostly bad (e.g. the other
            layout: the message names the first bad line, the expected and found field counts).

    Example:
        >>> frame = read_all(read_criteo("day_0", chunksize=100_000), Quarantine(None))  # doctest: +SKIP
        >>> frame["C1"].dtype  # doctest: +SKIP
        dtype('int64')
    """
    expected = CRITEO if has_label else CRITEO_UNLABELED
    path = _text_file(path, expected)
    fields = [(0, LABEL, _label_parser({0: 0, 1: 1}))] if has_label else []
    fields += [(i, name, _parse_optional_int) for i, name in enumerate(CRITEO_DENSE, start=len(fields))]
    fields += [(i, name, _parse_hex) for i, name in enumerate(CRITEO_SPARSE, start=len(fields))]
    chunks = _read_delimited(path, "\t", len(fields), fields, _check_chunksize(chunksize))
    hint = ("; a file without labels (39 fields, like the Kaggle test.txt) needs has_label: false" if has_label
            else "; a file with labels (40 fields, like train.txt or day_N) needs has_label: true")
    return _checked(chunks, path, expected + hint)


def read_parquet(path: str | Path, columns: Sequence[str] | None = None,
                 batch_size: int = DEFAULT_CHUNKSIZE) -> Iterator[ReadChunk]:
    """Reads a Parquet file batch by batch (Parquet rows are typed, so there are no bad rows).

    Args:
        path: the Parquet file.
        columns: the columns to read (all must exist); None reads all.
        batch_size: rows per chunk.

    Returns:
        A generator of ReadChunk.

    Example:
        >>> frame = read_all(read_parquet("train.parquet", ["user", "item"]), Quarantine(None))  # doctest: +SKIP
    """
    path = _existing(path, "a Parquet file")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: is not a readable Parquet file ({error})") from error
    found = parquet.schema_arrow.names
    missing = [name for name in columns or () if name not in found]
    if missing:
        parquet.close()
        raise DataError(f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(found)}")
    return _parquet_chunks(parquet, list(columns) if columns else None, _check_chunksize(batch_size), path)


def _parquet_chunks(parquet: pq.ParquetFile, columns: list[str] | None, batch_size: int,
                    path: Path) -> Iterator[ReadChunk]:
    with parquet:
        yielded = False
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            yield ReadChunk(batch.to_pandas(), empty_bad(), n_lines=batch.num_rows, source=str(path))
            yielded = True
        if not yielded:
            schema = parquet.schema_arrow
            empty = schema.empty_table().select(columns or schema.names).to_pandas()
            yield ReadChunk(empty, empty_bad(), n_lines=0, source=str(path))


def read_all(chunks: Iterator[ReadChunk], quarantine: Quarantine | None = None) -> pd.DataFrame:
    """Concatenates the good rows of all chunks, feeding each chunk to the quarantine.

    Args:
        chunks: the chunks, e.g. from a reader.
        quarantine: collects the bad rows; None is strict: the first bad row raises DataError.

    Returns:
        The good rows, with a fresh RangeIndex.

    Example:
        >>> quarantine = Quarantine("out/bad_rows.jsonl")  # doctest: +SKIP
        >>> frame = read_all(read_movielens("u.data"), quarantine)  # doctest: +SKIP
        >>> quarantine.check(max_bad_fraction=0.01)  # doctest: +SKIP
    """
    frames = []
    for chunk in chunks:
        if quarantine is not None:
            quarantine.add(chunk.source, chunk)
        elif len(chunk.bad):
            line, reason = chunk.bad["line"].iloc[0], chunk.bad["reason"].iloc[0]
            raise DataError(f"{chunk.source} line {line}: {reason} (pass a Quarantine to set bad rows aside)")
        frames.append(chunk.frame)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


READERS: dict[str, Callable[..., Iterator[ReadChunk]]] = {
    "movielens": read_movielens,
    "sequences": read_sequences,
    "lightgcn": read_lightgcn,
    "libfm": read_libfm,
    "criteo": read_criteo,
    "parquet": read_parquet,
}


def open_reader(format: str, path: str | Path, **options: object) -> Iterator[ReadChunk]:
    """Opens a file with the reader registered for ``format``.

    Args:
        format: a key of READERS.
        path: the input file.
        **options: the reader's keyword options (e.g. ``layout`` for movielens).

    Returns:
        The reader's generator of ReadChunk.

    Raises:
        DataError: unknown format.
        ConfigError: an option the reader does not take.

    Example:
        >>> chunks = open_reader("movielens", "u.data", layout="udata")  # doctest: +SKIP
    """
    if format not in READERS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(READERS)}")
    reader = READERS[format]
    accepted = list(inspect.signature(reader).parameters)[1:]
    unknown = [name for name in options if name not in accepted]
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for format {format!r}; "
                          f"expected some of {', '.join(accepted)}")
    return reader(path, **options)
