"""The hashing trick and its variants: ids hashed into fewer rows than the vocabulary.

Every method here maps an id to rows with ``hash_ids``, a seeded 64-bit integer hash (the
splitmix64 finaliser) computed with int64 tensor operations whose intermediate values never
leave [0, 2**63): the result is the same on every process, machine, platform and device.

Methods (each a ``Compression`` config and a ``Method`` module):

- ``Hashing``: ``h(id) mod M`` into one table of M rows (Weinberger et al. 2009).
- ``DoubleHashing``: ``E[h_0(id)] + E[h_1(id)]``, two hashes into one shared table.
- ``MultiHash``: ``sum_j E_j[h_j(id)]``, k hashes into k tables; with ``importance=True`` the
  Hash Embeddings of Svenstrup et al. 2017 (per-id learned weights of the k components).
- ``FrequencyHashing``: the F most frequent ids keep private rows, the others are hashed into
  a shared table.

Budgets: ``budget`` is a fraction of the full float32 table's bytes (``TableSpec.full_bytes``);
the rows are chosen so that the plain tables plus the method's buffers fit in it, as closely
as the row size allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable
from fractions import Fraction

import numpy as np
import torch

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.memory import narrowest_int_dtype
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
STREAM_STRIDE = 1 << 32
"""Seed offset between the hash streams of one method: stream j of seed s uses seed s + j * 2**32."""


def _mix64_int(z: int) -> int:
    """The splitmix64 finaliser on a Python int (used for seed keys)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def _seed_key(seed: int) -> int:
    """64-bit key added to every id before mixing; distinct seeds give unrelated keys."""
    return _mix64_int(seed + _GOLDEN)


# 64-bit words are held as two int64 tensors (hi, lo) of 32-bit limbs, so that no product or
# shift ever exceeds 2**63 (signed int64 overflow is undefined in C++ and so in torch kernels).

def _add64(hi: torch.Tensor, lo: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = lo + (c & _M32)
    hi = (hi + (c >> 32) + (lo >> 32)) & _M32
    return hi, lo & _M32


def _xorshift64(hi: torch.Tensor, lo: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z ^ (z >> s) for 0 < s < 32."""
    shifted_lo = (lo >> s) | ((hi & ((1 << s) - 1)) << (32 - s))
    return hi ^ (hi >> s), lo ^ shifted_lo


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """a * c mod 2**32 for 32-bit a and c (partial products stay below 2**49)."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mul64(hi: torch.Tensor, lo: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z * c mod 2**64: the full 64-bit lo * c_lo from 16-bit pieces plus the 32-bit cross terms."""
    c_hi, c_lo = c >> 32, c & _M32
    a0, a1 = lo & 0xFFFF, lo >> 16
    b0, b1 = c_lo & 0xFFFF, c_lo >> 16
    middle = a1 * b0 + a0 * b1                       # < 2**33
    low = a0 * b0 + ((middle & 0xFFFF) << 16)        # < 2**33
    high = a1 * b1 + (middle >> 16) + (low >> 32)    # lo * c_lo // 2**32, < 2**32
    high = (high + _mul32(hi, c_lo) + _mul32(lo, c_hi)) & _M32
    return high, low & _M32


def hash_ids(ids: torch.Tensor, seed: int, modulus: int) -> torch.Tensor:
    """Seeded integer hash of each id, reduced to [0, modulus).

    ``h(id) = (splitmix64_mix((id + key(seed)) mod 2**64) mod 2**63) mod modulus`` where
    ``key(seed) = splitmix64_mix(seed + 0x9E3779B97F4A7C15)`` and ``splitmix64_mix`` is the
    finaliser of Steele et al.'s SplitMix64 (Stafford's Mix13). Ids are read as their 64-bit
    two's-complement pattern. Only exact int64 tensor arithmetic is used, so the values are
    identical on every process, machine and device (never Python's ``hash()``).

    Args:
        ids: (n,) integer ids (any integer dtype; any device).
        seed: any Python int; different seeds give independent-looking hashes.
        modulus: number of buckets M (>= 1).

    Returns:
        (n,) int64 bucket of each id, on the device of ``ids``.

    Example:
        >>> hash_ids(torch.tensor([0, 1, 2]), seed=0, modulus=1000).tolist()
        [871, 483, 603]
    """
    if isinstance(modulus, bool) or not isinstance(modulus, int) or modulus < 1:
        raise ConfigError(f"hash_ids: modulus must be an int >= 1, got {modulus!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"hash_ids: seed must be an int, got {seed!r}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigError(f"hash_ids: ids must be an integer tensor, got dtype {ids.dtype}")
    x = ids.to(torch.int64)
    if x.device.type == "cpu":
        return torch.from_numpy(_hash_uint64(x.numpy(), seed, modulus))
    return _hash_limbs(x, seed, modulus)


def _hash_limbs(x: torch.Tensor, seed: int, modulus: int) -> torch.Tensor:
    """``hash_ids`` of int64 ``x`` in exact int64 tensor arithmetic on 32-bit limbs (any device)."""
    hi, lo = (x >> 32) & _M32, x & _M32
    hi, lo = _add64(hi, lo, _seed_key(seed))
    hi, lo = _xorshift64(hi, lo, 30)
    hi, lo = _mul64(hi, lo, _MIX1)
    hi, lo = _xorshift64(hi, lo, 27)
    hi, lo = _mul64(hi, lo, _MIX2)
    hi, lo = _xorshift64(hi, lo, 31)
    return (((hi & 0x7FFFFFFF) << 32) | lo) % modulus


def _hash_uint64(ids: np.ndarray, seed: int, modulus: int) -> np.ndarray:
    """``hash_ids`` on the CPU in numpy's uint64 arithmetic, which wraps mod 2**64 by definition: the same values as
    the 32-bit limbs, about 10x faster."""
    z = ids.view(np.uint64) + np.uint64(_seed_key(seed))
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    return ((z & np.uint64(0x7FFFFFFFFFFFFFFF)) % np.uint64(modulus)).astype(np.int64)


def stream_seed(seed: int, stream: int) -> int:
    """The seed of hash stream ``stream`` of a method seeded with ``seed`` (stream 0 = ``seed``)."""
    return seed + stream * STREAM_STRIDE


# ----------------------------------------------------------------------------- budgets

def _allowed_bytes(budget: float, spec: TableSpec) -> int:
    """floor(budget * full_bytes), computed exactly."""
    return math.floor(Fraction(budget) * spec.full_bytes)


def _rows_for(method: str, spec: TableSpec, budget: float, cost: Callable[[int], int]) -> int:
    """Largest M >= 1 with ``cost(M) <= budget * full_bytes`` (``cost``: bytes of the method at M rows)."""
    allowed = _allowed_bytes(budget, spec)
    low, high = 0, allowed + 1  # a row costs at least one byte, so cost(high) > allowed
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= allowed else (low, middle)
    if low < 1:
        raise ConfigError(
            f"{method}.budget={budget} is too small for table '{spec.name}' ({spec.num_embeddings} x {spec.dim}, "
            f"{spec.full_bytes} bytes in full): {allowed} bytes do not hold one row of each plain table "
            f"({cost(1)} bytes); raise the budget")
    return low


def _check_common(method: str, rows: int | None, budget: float | None, seed: int, need_size: bool = True) -> None:
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ConfigError(f"{method}.rows must be an int >= 1, got {rows!r}")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ConfigError(f"{method}.budget must be a fraction of the full table's bytes in (0, 1], "
                              f"got {budget!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{method}.seed must be an int, got {seed!r}")
    if need_size:
        if rows is None and budget is None:
            raise ConfigError(f"{method} needs rows or budget (a fraction of the full table's bytes); both are None")
        if rows is not None and budget is not None:
            raise ConfigError(f"{method} takes rows or budget, not both; got rows={rows}, budget={budget}")


# ----------------------------------------------------------------------------- modules

class HashedTables(Method):
    """k seeded hashes of each id, one lookup each, summed: ``sum_j E_{t(j)}[h_j(id) mod M]``.

    With ``shared=True`` every hash reads one table of ``rows`` rows (hashing for k = 1,
    double hashing for k = 2); otherwise hash j reads its own table ``hash<j>`` of ``rows`` rows.
    The sum commutes with pooling, so lookups are pooled inside FBGEMM's kernels.

    Args:
        spec: the logical table.
        rows: rows M of each plain table.
        k: number of hashes (streams).
        shared: all hashes read one table.
        seed: hash j uses ``stream_seed(seed, j)``.

    Example:
        >>> m = HashedTables(TableSpec("item", 1000, 8, ("item",)), rows=100, k=2, shared=True)
        >>> [(t.suffix, t.rows) for t in m.plain_tables()], m.stream_tables()
        ([('hashed', 100)], [0, 0])
    """

    additive = True

    def __init__(self, spec: TableSpec, rows: int, k: int = 1, shared: bool = True, seed: int = 0):
        super().__init__(spec)
        self.rows, self.k, self.shared, self.seed = rows, k, shared, seed

    def plain_tables(self) -> list[PlainTable]:
        if self.shared:
            return [PlainTable("hashed", self.rows, self.spec.dim)]
        return [PlainTable(f"hash{j}", self.rows, self.spec.dim) for j in range(self.k)]

    def stream_tables(self) -> list[int]:
        return [0] * self.k if self.shared else list(range(self.k))

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [hash_ids(ids, stream_seed(self.seed, j), self.rows) for j in range(self.k)]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor] | None:
        return [queries] * self.k


class HashEmbeddingTables(HashedTables):
    """Hash Embeddings (Svenstrup et al. 2017): ``sum_j p_id[j] * E_j[h_j(id)]``.

    Besides the k component tables (``hash<j>``, ``rows`` x D each), the importance weights
    of ``rows`` hashed buckets (k weights each, read at ``h_k(id)``, their own hash) live in a
    plain table ``importance`` of ceil(rows / g) x D, packed g = D // k buckets per row: TorchRec's
    EmbeddingCollection holds tables of one dimension only, and packing keeps the weights at
    about rows x k floats. The weights are parametrised as ``p_id = 1 + w_id``: the plain rows
    start near 0 (the collection's uniform init), so training starts from plain multi-hashing.
    The weighted sum does not commute with pooling: ids are looked up one by one, combined,
    then pooled.

    Args:
        spec: the logical table.
        rows: rows of each component table; importance buckets (at least ``rows``, a multiple of g).
        k: number of components (1..D).
        seed: hash j uses ``stream_seed(seed, j)``; the importance buckets ``stream_seed(seed, k)``.

    Example:
        >>> m = HashEmbeddingTables(TableSpec("item", 1000, 8, ("item",)), rows=50, k=2)
        >>> [(t.suffix, t.rows, t.dim) for t in m.plain_tables()]
        [('hash0', 50, 8), ('hash1', 50, 8), ('importance', 13, 8)]
    """

    additive = False

    def __init__(self, spec: TableSpec, rows: int, k: int = 2, seed: int = 0):
        super().__init__(spec, rows, k, shared=False, seed=seed)
        self.per_row = self.weights_per_row(spec, k)
        self.weight_rows = -(-rows // self.per_row)

    @staticmethod
    def weights_per_row(spec: TableSpec, k: int) -> int:
        """g = D // k: buckets of k importance weights packed in one D-wide row."""
        if k > spec.dim:
            raise ConfigError(f"MultiHash(importance=True) packs an id's k weights into one row of the D-wide "
                              f"importance table, so k must be <= dim; got k={k}, dim={spec.dim} for table "
                              f"'{spec.name}'")
        return spec.dim // k

    def plain_tables(self) -> list[PlainTable]:
        return [*super().plain_tables(), PlainTable("importance", self.weight_rows, self.spec.dim)]

    def stream_tables(self) -> list[int]:
        return list(range(self.k + 1))

    def _bucket(self, ids: torch.Tensor) -> torch.Tensor:
        return hash_ids(ids, stream_seed(self.seed, self.k), self.weight_rows * self.per_row)

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [*super().transform(ids), self._bucket(ids) // self.per_row]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        slot = self._bucket(ids) % self.per_row                                      # (n,)
        columns = slot.unsqueeze(1) * self.k + torch.arange(self.k, device=slot.device)  # (n, k)
        weights = 1 + parts[self.k].gather(1, columns)                               # (n, k)
        components = torch.stack(parts[:self.k], dim=1)                              # (n, k, D)
        return (weights.unsqueeze(2) * components).sum(1)

    def stream_queries(self, queries: torch.Tensor) -> None:
        return None  # the importance weights multiply the components: decoded per id


class FrequencyHashedTables(Method):
    """The ``private`` most frequent ids keep their own rows; all others share hashed rows.

    Stream 0 reads table ``private`` (F rows) at the id's private row, or nothing (-1);
    stream 1 reads table ``shared`` (M rows) at ``hash_ids(id, seed, M)`` for the other ids,
    or nothing. Private rows follow id order among the private ids, so with F = N every id
    reads its own row, exactly as the full table. The id -> private row map (F = hashed) is a
    buffer of the narrowest integer dtype holding 0..F (omitted when F = 0 or F = N).

    Args:
        spec: the logical table.
        counts: (N,) training frequency of each id (ties broken by smaller id).
        private: F, number of ids with private rows (0..N).
        rows: M, rows of the shared table (ignored when F = N).
        seed: seed of the shared hash.

    Example:
        >>> counts = np.array([0, 5, 50, 1, 7, 2])
        >>> m = FrequencyHashedTables(TableSpec("item", 6, 4, ("item",)), counts, private=2, rows=3)
        >>> [t.tolist() for t in m.transform(torch.tensor([2, 4, 1]))][0]
        [0, 1, -1]
    """

    additive = True
    partial_streams = True  # ids outside a stream read nothing there

    def __init__(self, spec: TableSpec, counts: np.ndarray, private: int, rows: int, seed: int = 0):
        super().__init__(spec)
        n = spec.num_embeddings
        self.private, self.rows, self.seed = min(private, n), rows, seed
        id_map = None
        if 0 < self.private < n:
            order = np.lexsort((np.arange(n), -np.asarray(counts, dtype=np.float64)))
            chosen = torch.from_numpy(np.sort(order[:self.private]))
            id_map = torch.full((n,), self.private, dtype=torch.int64)
            id_map[chosen] = torch.arange(self.private)
            id_map = id_map.to(narrowest_int_dtype(self.private + 1))
        self.register_buffer("map", id_map)

    def plain_tables(self) -> list[PlainTable]:
        tables = [PlainTable("private", self.private, self.spec.dim)] if self.private else []
        if self.private < self.spec.num_embeddings:
            tables.append(PlainTable("shared", self.rows, self.spec.dim))
        return tables

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        if self.private == self.spec.num_embeddings:
            return [ids.to(torch.int64)]
        hashed = hash_ids(ids, self.seed, self.rows)
        if self.map is None:
            return [hashed]
        row = self.map[ids].to(torch.int64)
        hashed_here = row == self.private
        return [torch.where(hashed_here, -1, row), torch.where(hashed_here, hashed, -1)]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        return parts[0] + parts[1] if len(parts) > 1 else parts[0]

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor]:
        return [queries] * len(self.stream_tables())


# ----------------------------------------------------------------------------- configs

@dataclass
class Hashing(Compression):
    """The hashing trick: id -> ``hash_ids(id, seed, M)``, one table of M rows.

    Collisions happen for any M (even M >= N), so there is no no-compression setting.

    Args:
        rows: M; or None to derive it from ``budget``.
        budget: fraction (0, 1] of the full table's bytes; M = floor(budget * N).
        seed: hash seed.

    Example:
        >>> Hashing(budget=0.25).build(TableSpec("item", 1000, 8, ("item",))).rows
        250
    """

    rows: int | None = None
    budget: float | None = None
    seed: int = 0

    def __post_init__(self):
        _check_common("Hashing", self.rows, self.budget, self.seed)

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> HashedTables:
        rows = self.rows or _rows_for("Hashing", spec, self.budget, lambda m: m * spec.dim * 4)
        return HashedTables(spec, rows, k=1, shared=True, seed=self.seed)


@dataclass
class DoubleHashing(Compression):
    """Double hashing: ``E[h_0(id)] + E[h_1(id)]``, two seeded hashes into one shared table.

    Two ids share both rows only if both hashes collide, so far fewer ids are confused than
    with one hash of the same table.

    Args:
        rows: M, rows of the shared table; or None to derive it from ``budget``.
        budget: fraction (0, 1] of the full table's bytes; M = floor(budget * N).
        seed: hash j uses ``stream_seed(seed, j)``.

    Example:
        >>> DoubleHashing(rows=64).build(TableSpec("item", 1000, 8, ("item",))).stream_tables()
        [0, 0]
    """

    rows: int | None = None
    budget: float | None = None
    seed: int = 0

    def __post_init__(self):
        _check_common("DoubleHashing", self.rows, self.budget, self.seed)

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> HashedTables:
        rows = self.rows or _rows_for("DoubleHashing", spec, self.budget, lambda m: m * spec.dim * 4)
        return HashedTables(spec, rows, k=2, shared=True, seed=self.seed)


@dataclass
class MultiHash(Compression):
    """k seeded hashes into k separate tables of M rows, summed; or Hash Embeddings.

    Separate tables (rather than one shared pool) keep the k components of an id from landing
    on the same row. With ``importance=True`` each id also reads k learned importance weights
    from M hashed buckets (about M x k floats, packed into a D-wide plain table) and the
    components are weighted by them (Svenstrup et al. 2017, see ``HashEmbeddingTables``).

    Args:
        k: number of hashes and component tables (>= 1).
        rows: M, rows of each table; or None to derive it from ``budget``.
        budget: fraction (0, 1] of the full table's bytes; M = floor(budget * N / k), or with
            importance the largest M whose k tables and packed importance table fit.
        seed: hash j uses ``stream_seed(seed, j)``.
        importance: learn per-id importance weights (not additive: ids are combined one by one).

    Example:
        >>> m = MultiHash(k=4, budget=0.5).build(TableSpec("item", 1000, 8, ("item",)))
        >>> len(m.plain_tables()), m.rows
        (4, 125)
    """

    k: int = 2
    rows: int | None = None
    budget: float | None = None
    seed: int = 0
    importance: bool = False

    def __post_init__(self):
        _check_common("MultiHash", self.rows, self.budget, self.seed)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"MultiHash.k must be an int >= 1, got {self.k!r}")
        if not isinstance(self.importance, bool):
            raise ConfigError(f"MultiHash.importance must be true or false, got {self.importance!r}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> HashedTables:
        if self.importance:
            per_row = HashEmbeddingTables.weights_per_row(spec, self.k)

            def cost(m: int) -> int:  # k component tables of m rows + ceil(m / per_row) packed rows
                return (self.k * m + -(-m // per_row)) * spec.dim * 4

            rows = self.rows or _rows_for("MultiHash", spec, self.budget, cost)
            return HashEmbeddingTables(spec, rows, self.k, self.seed)
        rows = self.rows or _rows_for("MultiHash", spec, self.budget, lambda m: self.k * m * spec.dim * 4)
        return HashedTables(spec, rows, self.k, shared=False, seed=self.seed)


@dataclass
class FrequencyHashing(Compression):
    """Private rows for the F most frequent ids, a hashed shared table of M rows for the rest.

    Needs the ids' training counts (``TableStats.counts`` from prepare). With a budget, the
    unset sizes are solved from it after the id map's bytes: by default half of the rest buys
    private rows and the other half shared rows; if ``private`` (or ``rows``) is set, the
    other one takes all that is left. (Where the private rows would just overflow a narrower
    map dtype, they stop at its limit when that keeps more of them.) When the id map alone
    leaves no room for a private row, the method falls back to plain hashing (no map, all
    bytes for shared rows). ``private >= N`` keeps every id private: the full table.

    Args:
        private: F, ids with private rows (>= 0; values above N mean N).
        rows: M, rows of the shared table.
        budget: fraction (0, 1] of the full table's bytes.
        seed: seed of the shared hash.

    Example:
        >>> spec = TableSpec("item", 1000, 8, ("item",))
        >>> counts = np.arange(1000)
        >>> m = FrequencyHashing(budget=0.25).build(spec, TableStats(counts=counts))
        >>> m.private, m.rows, m.map.dtype
        (109, 109, torch.uint8)
    """

    private: int | None = None
    rows: int | None = None
    budget: float | None = None
    seed: int = 0

    def __post_init__(self):
        _check_common("FrequencyHashing", self.rows, self.budget, self.seed, need_size=False)
        if self.private is not None and (isinstance(self.private, bool) or not isinstance(self.private, int)
                                         or self.private < 0):
            raise ConfigError(f"FrequencyHashing.private must be an int >= 0, got {self.private!r}")
        if self.budget is None:
            if self.private is None:
                raise ConfigError("FrequencyHashing needs private (and rows) or budget; private and budget are None")
        elif self.private is not None and self.rows is not None:
            raise ConfigError(f"FrequencyHashing with a budget solves private or rows from it: set at most one, "
                              f"got private={self.private}, rows={self.rows}, budget={self.budget}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> FrequencyHashedTables:
        counts = None if stats is None else stats.counts
        if counts is None:
            raise ConfigError(f"FrequencyHashing of table '{spec.name}' needs vocabulary counts from prepare "
                              f"(TableStats.counts); none were given")
        n = spec.num_embeddings
        if np.shape(counts) != (n,):
            raise ConfigError(f"FrequencyHashing of table '{spec.name}': counts must have shape ({n},), "
                              f"got {np.shape(counts)}")
        private, rows = self._sizes(spec)
        return FrequencyHashedTables(spec, counts, private, rows, self.seed)

    def _sizes(self, spec: TableSpec) -> tuple[int, int]:
        n, row_bytes = spec.num_embeddings, spec.dim * 4
        if self.budget is None:
            private = min(self.private, n)
            if private < n and self.rows is None:
                raise ConfigError(f"FrequencyHashing of table '{spec.name}': private={self.private} < N={n} leaves "
                                  f"ids to hash, so rows (or budget) must be set")
            return private, self.rows or 1
        allowed = _allowed_bytes(self.budget, spec)
        if self.private is not None and self.private >= n:  # every id private: no map, no shared table
            if n * row_bytes > allowed:
                raise ConfigError(f"FrequencyHashing.budget={self.budget} of table '{spec.name}' cannot hold "
                                  f"private={self.private} (>= N={n}) rows of {row_bytes} bytes; lower private")
            return n, 1
        # Each map dtype leaves its own bytes and caps F (rows 0..F-1 must fit); take the most
        # private rows over the dtypes (the narrowest on ties), so the map built matches it.
        best = None
        for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
            left = allowed - n * dtype.itemsize
            if self.private is not None:
                wanted = self.private
            elif self.rows is not None:
                wanted = (left - self.rows * row_bytes) // row_bytes
            else:
                wanted = left // 2 // row_bytes
            candidate = min(wanted, torch.iinfo(dtype).max, n - 1)  # the map holds 0..F
            if best is None or candidate > best[0]:
                best = (candidate, dtype, left)
        private, dtype, left = best
        if private <= 0 and not self.private:  # the id map does not pay for itself: plain hashing
            private, left = 0, allowed
            rows = self.rows if self.rows is not None else allowed // row_bytes
        else:
            rows = self.rows if self.rows is not None else (left - private * row_bytes) // row_bytes
        if rows < 1 or (private + rows) * row_bytes > left:
            raise ConfigError(
                f"FrequencyHashing.budget={self.budget} is too small for table '{spec.name}' ({n} x {spec.dim}): "
                f"{allowed} bytes must hold private={private} and rows={max(rows, 1)} rows of {row_bytes} bytes, "
                f"plus an id map of {n} x {dtype.itemsize} bytes when private > 0; raise the budget")
        return private, rows
