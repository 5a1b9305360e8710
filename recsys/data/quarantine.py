"""Bad input rows: the chunk type readers yield, and the quarantine that collects the bad rows.

Readers never drop a malformed line silently: each chunk carries its bad lines with a reason, and a
:class:`Quarantine` writes them to a side file, counts them per reason and fails the run when their
share is above a configured limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pandas as pd

from recsys.errors import ConfigError, DataError

BAD_COLUMNS = ("line", "reason", "text")


def empty_bad() -> pd.DataFrame:
    """An empty bad-rows table (columns ``line``, ``reason``, ``text``).

    Example:
        >>> list(empty_bad().columns)
        ['line', 'reason', 'text']
    """
    return pd.DataFrame({"line": pd.Series(dtype="int64"), "reason": pd.Series(dtype="str"),
                         "text": pd.Series(dtype="str")})


@dataclass
class ReadChunk:
    """One chunk of a file as read: the good rows and the rejected lines.

    Args:
        frame: the good rows, in the reader's raw schema.
        bad: the rejected lines, columns ``line`` (1-based line number in the file), ``reason``
            and ``text`` (the raw line).
        n_lines: data lines seen in this chunk (good + bad; blank lines are not counted).
        source: the file the chunk was read from.

    Example:
        >>> chunk = ReadChunk(pd.DataFrame({"user_id": [1]}), empty_bad(), n_lines=1, source="u.data")
        >>> len(chunk.frame), len(chunk.bad)
        (1, 0)
    """

    frame: pd.DataFrame
    bad: pd.DataFrame = field(default_factory=empty_bad)
    n_lines: int = 0
    source: str = ""


def reason_kind(reason: pd.Series) -> pd.Series:
    """The reason without the offending value (``"rating is not a number: 'x'"`` -> ``"rating is not a number"``)."""
    return reason.astype("str").str.split(": ", n=1).str[0]


class Quarantine:
    """Accumulates the bad rows of chunks, writes them to a side file and counts them per reason.

    The side file is JSON lines (one ``{"source", "line", "reason", "text"}`` object per bad row)
    unless its name ends in ``.csv``; it is truncated when the quarantine is created and appended
    to chunk by chunk.

    Args:
        path: the side file, or None to count bad rows without saving them.

    Example:
        >>> quarantine = Quarantine(None)
        >>> quarantine.add("u.data", ReadChunk(pd.DataFrame(), empty_bad(), n_lines=10))
        >>> quarantine.check(max_bad_fraction=0.01)
        >>> quarantine.summary()["n_total"]
        10
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.n_bad = 0
        self.n_total = 0
        self.reasons: dict[str, int] = {}
        self.sources: list[str] = []
        self._examples: dict[str, tuple[str, int]] = {}
        self._wrote_header = False
        self._handle: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w", encoding="utf-8")

    @property
    def bad_fraction(self) -> float:
        """Bad rows over all rows seen so far (0 when nothing was read)."""
        return self.n_bad / self.n_total if self.n_total else 0.0

    def add(self, source: str | Path, chunk: ReadChunk) -> None:
        """Counts a chunk's rows and saves its bad rows.

        Args:
            source: the file the chunk was read from.
            chunk: the chunk.

        Example:
            >>> Quarantine(None).add("u.data", ReadChunk(pd.DataFrame(), empty_bad(), n_lines=3))
        """
        source = str(source)
        if source not in self.sources:
            self.sources.append(source)
        self.n_total += chunk.n_lines
        bad = chunk.bad
        if bad.empty:
            return
        self.n_bad += len(bad)
        kinds = reason_kind(bad["reason"])
        first_lines = bad.groupby(kinds.to_numpy(), sort=False)["line"].agg(["size", "first"])
        for kind, (size, first) in first_lines.iterrows():
            self.reasons[kind] = self.reasons.get(kind, 0) + int(size)
            self._examples.setdefault(kind, (source, int(first)))
        self._write(bad.assign(source=source)[["source", *BAD_COLUMNS]])

    def _write(self, rows: pd.DataFrame) -> None:
        if self._handle is None:
            return
        if self.path.suffix.lower() == ".csv":
            rows.to_csv(self._handle, index=False, header=not self._wrote_header)
            self._wrote_header = True
        else:
            self._handle.write(rows.to_json(orient="records", lines=True, force_ascii=False))
        self._handle.flush()

    def check(self, max_bad_fraction: float) -> None:
        """Raises DataError when the share of bad rows is above ``max_bad_fraction``.

        Args:
            max_bad_fraction: the largest tolerated share of bad rows, in [0, 1].

        Example:
            >>> Quarantine(None).check(0.0)
        """
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], found {max_bad_fraction!r}")
        if self.bad_fraction <= max_bad_fraction + 1e-12:
            return
        where = (f"the bad rows are in {self.path}" if self.path is not None
                 else "the bad rows were not saved (no quarantine file configured)")
        raise DataError(
            f"{', '.join(self.sources)}: {self.n_bad} of {self.n_total} rows are bad "
            f"(fraction {self.bad_fraction:.4g}), above max_bad_fraction={max_bad_fraction:g}; "
            f"{where}; top reasons: {self._top_reasons()}"
        )

    def _top_reasons(self, n: int = 3) -> str:
        top = sorted(self.reasons.items(), key=lambda item: -item[1])[:n]
        return "; ".join(f"{kind} x{count} (e.g. {self._examples[kind][0]} line {self._examples[kind][1]})"
                         for kind, count in top)

    def summary(self) -> dict:
        """The counts as a JSON-able dict: n_bad, n_total, bad_fraction, reasons, path, sources.

        Example:
            >>> Quarantine(None).summary()["bad_fraction"]
            0.0
        """
        return {
            "n_bad": self.n_bad,
            "n_total": self.n_total,
            "bad_fraction": self.bad_fraction,
            "reasons": dict(self.reasons),
            "path": str(self.path) if self.path is not None else None,
            "sources": list(self.sources),
        }

    def close(self) -> None:
        """Closes the side file (counts stay available)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
