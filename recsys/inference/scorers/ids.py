"""Raw ids -> vocabulary indices, compared in the vocabulary's own type (no float round trip)."""

from __future__ import annotations

import re

import numpy as np

from recsys.data.vocab import Vocabulary

_INTEGER = re.compile(r"-?[0-9]{1,19}")
_INT64 = 2**63


def comparable(values, ids: np.ndarray) -> list:
    """Raw ids in the type of a vocabulary's ``ids``; ids that cannot be in it become None (unknown, so OOV).

    Integer vocabularies take ints, integral floats and decimal strings within int64; string vocabularies take
    strings and ints.

    Example:
        >>> comparable([5, "7", "x", "²", True, 2.0], np.array([1, 2]))
        [5, 7, None, None, None, 2]
    """
    integer = ids.dtype.kind in "iu"
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or v is None:
            out.append(None)
        elif integer and isinstance(v, (int, np.integer)):
            out.append(int(v) if -_INT64 <= v < _INT64 else None)
        elif integer and isinstance(v, (float, np.floating)):
            out.append(int(v) if float(v).is_integer() and -_INT64 <= v < _INT64 else None)
        elif integer and isinstance(v, str):
            out.append(int(v) if _INTEGER.fullmatch(v) and -_INT64 <= int(v) < _INT64 else None)
        elif not integer and isinstance(v, (str, int, np.integer)):
            out.append(str(v))
        else:
            out.append(None)
    return out


def lookup(vocab: Vocabulary, raw, missing: str = "oov") -> np.ndarray:
    """Raw ids -> indices of ``vocab`` (unknown ids: OOV 0, or -1 with ``missing="negative"``), ids compared in
    the vocabulary's own type (no float round trip for large integer ids)."""
    values = comparable(raw, vocab.ids)
    out = np.full(len(values), -1 if missing == "negative" else 0, dtype=np.int64)
    known = [i for i, v in enumerate(values) if v is not None]
    if known:
        picked = [values[i] for i in known]
        out[known] = vocab.lookup(np.array(picked, dtype=vocab.ids.dtype if vocab.ids.dtype.kind in "iu" else object),
                                  missing=missing)
    return out
