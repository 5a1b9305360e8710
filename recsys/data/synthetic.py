"""Synthetic datasets with planted structure, written to Parquet in bounded memory.

Two generators:

* :func:`generate_interactions` writes an implicit-feedback table (``user_id``, ``item_id``,
  ``timestamp``). Items have Zipf popularity; users and items have low-rank latent factors around
  shared cluster centres; user ``u`` picks distinct items ``i`` with probability proportional to
  ``exp(affinity * u.v_i + log popularity_i)``. :func:`planted_interactions` returns the planted
  factors, so the true ("oracle") scores can be used as an upper reference in evaluations.
* :func:`generate_ctr` writes a CTR table (``label``, dense ``d*``, sparse ``s*``, multi-valued
  ``tags``) whose labels come from a planted logit with linear, dense, tag and FM-style pairwise
  cross terms; it reports the AUC of the true probabilities.

Both are deterministic for a given config: planted parameters come from ``seed`` alone and chunk
``c`` uses its own generator seeded by ``(seed, c)``, so the same config (including the chunk size)
always writes the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.schemas import RAW_ITEM, RAW_USER, TIMESTAMP, CTRSchema
from recsys.errors import ConfigError

_CELL_BUDGET = 50_000_000  # user x item cells per chunk (~200 MB of float32)
_ROUNDS = 6  # rejection-sampling rounds before the dense Gumbel-top-k fallback
_DRAWS_PER_ROUND = 1_000_000  # proposals per round (~200 MB of temporaries)
_DENSE_DRAWS = 0.1  # a user needing more than this many draws per item goes dense
_ID_OFFSET = 1000  # raw ids are offset + a seeded permutation: never the 0..n-1 indices
_T0 = 1_600_000_000  # earliest timestamp (2020-09-13), seconds
_CTR_ID_EXPONENT = 1.0  # Zipf exponent of the CTR sparse ids
_CTR_LINEAR_STD, _CTR_EMB_STD, _CTR_DENSE_STD, _CTR_TAG_STD = 0.4, 0.9, 0.3, 0.6
_CALIBRATION_ROWS = 200_000
_AUC_BINS, _AUC_RANGE = 1 << 20, 30.0  # logit histogram of the planted AUC: bins over [-30, 30]


def _require(ok: bool, owner: str, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{field}={value!r} is invalid: expected {expected}")


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


def _check_ints(owner: str, cfg: object, minimums: dict[str, int]) -> None:
    for name, lo in minimums.items():
        v = getattr(cfg, name)
        _require(_is_int(v) and v >= lo, owner, name, v, f"an integer >= {lo}")


def _zipf_log_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Normalised log-probabilities of a Zipf law over a random permutation of ``n`` ids."""
    logw = -exponent * np.log1p(rng.permutation(n).astype(np.float64))
    return logw - np.logaddexp.reduce(logw)


# --------------------------------------------------------------------------------------------
# Interactions
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticInteractions:
    """Settings of the synthetic implicit-feedback generator.

    Args:
        n_users: number of users (every user gets at least ``min(5, n_items // 2)`` interactions).
        n_items: number of items.
        n_interactions: approximate total number of rows (per-user counts are heavy-tailed).
        n_clusters: number of taste clusters; users belong to one, items are aligned with one.
        dim: latent dimension of the planted user and item factors.
        popularity_exponent: Zipf exponent of item popularity (0 = uniform).
        affinity: weight of the personal taste ``u.v`` against log popularity (0 = popularity only).
        user_noise: spread of user factors around their cluster centre (centres have norm ~1);
            small values keep the user factors close to rank ``n_clusters`` and sampling fast.
        item_noise: spread of item factors around their cluster centre.
        seed: seed of everything; the same config always writes the same file.
        chunk_users: users generated per chunk (one Parquet row group each); None picks it so
            that ``chunk_users * n_items`` float32 values stay under ~200 MB.

    Example:
        >>> cfg = SyntheticInteractions(n_users=100, n_items=50, n_interactions=2000)
        >>> generate_interactions(cfg, "/tmp/interactions.parquet")["users"]
        100
    """

    n_users: int = 2000
    n_items: int = 1000
    n_interactions: int = 100_000
    n_clusters: int = 10
    dim: int = 16
    popularity_exponent: float = 1.2
    affinity: float = 5.0
    user_noise: float = 0.1
    item_noise: float = 1.0
    seed: int = 0
    chunk_users: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        owner = type(self).__name__
        _check_ints(owner, self, {"n_users": 1, "n_items": 1, "n_interactions": 1, "n_clusters": 1,
                                  "dim": 1, "seed": 0})
        for name in ("popularity_exponent", "affinity", "user_noise", "item_noise"):
            v = getattr(self, name)
            _require(_is_num(v) and v >= 0, owner, name, v, "a finite number >= 0")
        c = self.chunk_users
        _require(c is None or (_is_int(c) and c >= 1), owner, "chunk_users", c, "None or an integer >= 1")

    @property
    def resolved_chunk_users(self) -> int:
        """Users per chunk: ``chunk_users`` or the memory-budget default."""
        return self.chunk_users or max(1, min(self.n_users, _CELL_BUDGET // self.n_items))


@dataclass(frozen=True)
class PlantedInteractions:
    """The planted model behind :func:`generate_interactions` (row ``u`` = user index ``u``).

    Args:
        user_ids: raw id of each user index, shape (n_users,).
        item_ids: raw id of each item index, shape (n_items,).
        user_factors: (n_users, dim) float64 latent factors.
        item_factors: (n_items, dim) float64 latent factors.
        user_clusters: cluster of each user, shape (n_users,).
        item_clusters: cluster each item is aligned with, shape (n_items,).
        centres: (n_clusters, dim) cluster centres.
        log_popularity: normalised log-probabilities of the item popularity law, shape (n_items,).
        counts: number of interactions of each user, shape (n_users,).
        affinity: weight of ``u.v`` in the logits.

    Example:
        >>> p = planted_interactions(SyntheticInteractions(n_users=10, n_items=20))
        >>> p.scores(p.user_index(p.user_ids[:3])).shape
        (3, 20)
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_clusters: np.ndarray
    item_clusters: np.ndarray
    centres: np.ndarray
    log_popularity: np.ndarray
    counts: np.ndarray
    affinity: float

    def scores(self, users: np.ndarray | None = None) -> np.ndarray:
        """True logits ``affinity * u.v + log popularity`` of users (indices) x all items.

        Args:
            users: user indices (not raw ids); None means all users.

        Returns:
            (len(users), n_items) float64 array; a user's items are sampled in proportion to exp().
        """
        u = self.user_factors if users is None else self.user_factors[np.asarray(users)]
        return self.affinity * (u @ self.item_factors.T) + self.log_popularity

    def user_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """User indices of raw ``user_id`` values."""
        return self._inverse(self.user_ids)[np.asarray(raw_ids) - _ID_OFFSET]

    def item_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Item indices of raw ``item_id`` values."""
        return self._inverse(self.item_ids)[np.asarray(raw_ids) - _ID_OFFSET]

    @staticmethod
    def _inverse(ids: np.ndarray) -> np.ndarray:
        inv = np.empty(len(ids), dtype=np.int64)
        inv[ids - _ID_OFFSET] = np.arange(len(ids))
        return inv


def _user_counts(cfg: SyntheticInteractions, rng: np.random.Generator) -> np.ndarray:
    """Lognormal per-user counts in [min(5, cap), cap], cap = n_items // 2, summing to ~n_interactions."""
    cap = max(1, cfg.n_items // 2)
    lo = min(5, cap)
    raw = rng.lognormal(0.0, 1.0, cfg.n_users)
    a, b = 0.0, cap / raw.min()  # totals at the ends of the bracket: n_users * lo, n_users * cap
    for _ in range(64):  # bisection on the scale; the total is monotone in it
        mid = 0.5 * (a + b)
        a, b = (mid, b) if np.clip(np.rint(mid * raw), lo, cap).sum() < cfg.n_interactions else (a, mid)
    return np.clip(np.rint(b * raw), lo, cap).astype(np.int64)


def planted_interactions(cfg: SyntheticInteractions) -> PlantedInteractions:
    """The planted factors, popularity and per-user counts that :func:`generate_interactions` uses.

    Args:
        cfg: generator settings; only ``seed`` and the sizes matter, not ``chunk_users``.

    Returns:
        The :class:`PlantedInteractions` of ``cfg`` (deterministic for ``cfg.seed``).

    Example:
        >>> p = planted_interactions(SyntheticInteractions(n_users=10, n_items=20, n_interactions=60))
        >>> p.user_factors.shape, int(p.counts.sum())
        ((10, 16), 60)
    """
    cfg.validate()
    rng = np.random.default_rng([cfg.seed, 0])
    centres = rng.normal(0.0, 1.0 / np.sqrt(cfg.dim), (cfg.n_clusters, cfg.dim))
    user_clusters = rng.integers(0, cfg.n_clusters, cfg.n_users)
    item_clusters = rng.integers(0, cfg.n_clusters, cfg.n_items)
    users = centres[user_clusters] + rng.normal(0.0, cfg.user_noise / np.sqrt(cfg.dim), (cfg.n_users, cfg.dim))
    items = centres[item_clusters] + rng.normal(0.0, cfg.item_noise / np.sqrt(cfg.dim), (cfg.n_items, cfg.dim))
    return PlantedInteractions(
        user_ids=_ID_OFFSET + rng.permutation(cfg.n_users).astype(np.int64),
        item_ids=_ID_OFFSET + rng.permutation(cfg.n_items).astype(np.int64),
        user_factors=users,
        item_factors=items,
        user_clusters=user_clusters,
        item_clusters=item_clusters,
        centres=centres,
        log_popularity=_zipf_log_weights(cfg.n_items, cfg.popularity_exponent, rng),
        counts=_user_counts(cfg, rng),
        affinity=float(cfg.affinity),
    )


class _ItemSampler:
    """Draws each user's distinct items from the planted Plackett-Luce law.

    Taking the top-k of ``logits + Gumbel noise`` (the Gumbel-top-k trick) and keeping the first
    k distinct items of i.i.d. draws from ``softmax(logits)`` give the same distribution
    (successive sampling without replacement). Dense Gumbel-top-k costs O(n_items) random numbers
    per user, too slow for 10^5 x 10^5, so i.i.d. draws come from rejection sampling: propose from
    the user's cluster-level law ``q_g(i) ∝ pop_i exp(a c_g.v_i)`` and accept with probability
    ``exp(a d_u.v_i - bound_u)``, ``d_u = u - c_g``, ``bound_u >= max_i a d_u.v_i``. Users whose
    remaining items would need too many draws (heavy users, small catalogues) or still short after
    ``_ROUNDS`` rounds finish with dense Gumbel-top-k over their remaining items, which is exact:
    the rest of a Plackett-Luce sample is Plackett-Luce over the items not yet taken.
    """

    def __init__(self, p: PlantedInteractions, chunk_users: int) -> None:
        self.p, self.n_items = p, len(p.item_ids)
        logq = p.affinity * (p.centres @ p.item_factors.T) + p.log_popularity  # (n_clusters, n_items)
        q = np.exp(logq - logq.max(axis=1, keepdims=True))
        cdf = np.cumsum(q, axis=1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        self.cdf = (cdf + np.arange(len(cdf))[:, None]).ravel()  # block g holds g + cdf_g: one search
        self.delta = p.user_factors - p.centres[p.user_clusters]
        # d.v_i = d.c_h + d.eps_i <= d.c_h + |d| max_{j in h} |eps_j|, h the cluster of item i
        eps_max = np.zeros(len(p.centres))
        np.maximum.at(eps_max, p.item_clusters, np.linalg.norm(p.item_factors - p.centres[p.item_clusters], axis=1))
        self.bound = p.affinity * (self.delta @ p.centres.T
                                   + np.linalg.norm(self.delta, axis=1)[:, None] * eps_max).max(axis=1)
        self.delta32 = (p.affinity * self.delta).astype(np.float32)  # float32: faster gathers
        self.items32 = p.item_factors.astype(np.float32)
        self.taken = np.zeros((chunk_users, self.n_items), dtype=bool)  # reset after every chunk

    def sample(self, users: np.ndarray, rng: np.random.Generator, rounds: int = _ROUNDS
               ) -> tuple[np.ndarray, np.ndarray]:
        """Distinct items of ``users`` (consecutive user indices), ``counts[u]`` each.

        Returns:
            (local user position, item index) int64 arrays, grouped by user in sampling order.
        """
        p, n, taken = self.p, self.n_items, self.taken
        need = p.counts[users].copy()
        rate = np.exp(-self.bound[users])  # estimated yield of distinct new items per draw
        dense = np.zeros(len(users), dtype=bool)  # users left to the dense fallback
        out_u, out_i = [], []
        for _ in range(rounds):
            active = np.flatnonzero((need > 0) & ~dense)
            m = np.ceil(1.5 * need[active] / rate[active]) + 8
            costly = m > _DENSE_DRAWS * n  # a draw costs ~10x a dense cell: go dense instead
            dense[active[costly]] = True
            active, m = active[~costly], m[~costly]
            if not len(active):
                break
            m = np.maximum(1, m * min(1.0, _DRAWS_PER_ROUND / m.sum())).astype(np.int64)
            du = np.repeat(active, m)  # draws of a user are contiguous, in draw order
            gu = users[du]
            g = p.user_clusters[gu]
            u = g + rng.random(len(du))
            order = np.argsort(u)  # sorted queries are cache friendly: ~4x faster than random ones
            it = np.empty_like(du)
            it[order] = np.searchsorted(self.cdf, u[order], side="right")
            it = np.minimum(it - g * n, n - 1)
            x = np.einsum("ij,ij->i", self.delta32[gu], self.items32[it]) - self.bound[gu]
            keep = (np.log(rng.random(len(du))) < x) & ~taken[du, it]
            du, it = du[keep], it[keep]
            first = np.sort(np.unique(du * n + it, return_index=True)[1])  # first occurrences
            du, it = du[first], it[first]
            distinct = np.bincount(du, minlength=len(users))
            rank = np.arange(len(du)) - np.searchsorted(du, du)
            keep = rank < need[du]
            du, it = du[keep], it[keep]
            taken[du, it] = True
            out_u.append(du)
            out_i.append(it)
            need -= np.bincount(du, minlength=len(users))
            rate[active] = np.maximum(distinct[active] / m, 1e-4)
        rest, step = np.flatnonzero(need > 0), max(1, _CELL_BUDGET // (4 * n))  # 3 arrays of 8 bytes
        for lo in range(0, len(rest), step):  # dense Gumbel-top-k over the items not taken yet
            r = rest[lo: lo + step]
            s = p.scores(users[r])
            s -= np.log(rng.standard_exponential(s.shape))  # + Gumbel(0, 1) noise
            s[taken[r]] = -np.inf
            k = int(need[r].max())
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, axis=1), axis=1), axis=1)
            mask = np.arange(k) < need[r][:, None]
            out_u.append(np.broadcast_to(r[:, None], top.shape)[mask])
            out_i.append(top[mask])
            taken[out_u[-1], out_i[-1]] = True
        du, it = np.concatenate(out_u), np.concatenate(out_i)
        taken[du, it] = False
        return du, it


def generate_interactions(cfg: SyntheticInteractions, path: str | Path) -> dict:
    """Write a synthetic interactions table to Parquet, one row group per chunk of users.

    Rows are grouped by user, in time order within a user; ``user_id`` and ``item_id`` are raw ids
    (``1000 +`` a seeded permutation of the indices), ``timestamp`` is int64 seconds, strictly
    increasing per user and independent of the item order (the order of a user's items is random).

    Args:
        cfg: generator settings.
        path: output Parquet file (parent directories are created).

    Returns:
        ``{"path", "rows", "users", "items", "row_groups"}``; users and items count distinct ids
        present in the file.

    Example:
        >>> stats = generate_interactions(SyntheticInteractions(n_users=200, n_items=100,
        ...                                                     n_interactions=5000), "/tmp/i.parquet")
        >>> sorted(stats)
        ['items', 'path', 'row_groups', 'rows', 'users']
    """
    cfg.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = planted_interactions(cfg)
    chunk = cfg.resolved_chunk_users
    sampler = _ItemSampler(p, chunk)
    schema = pa.schema([(RAW_USER, pa.int64()), (RAW_ITEM, pa.int64()), (TIMESTAMP, pa.int64())])
    seen = np.zeros(cfg.n_items, dtype=bool)
    rows = groups = 0
    with pq.ParquetWriter(path, schema) as writer:
        for c, lo in enumerate(range(0, cfg.n_users, chunk)):
            rng = np.random.default_rng([cfg.seed, 1, c])
            users = np.arange(lo, min(lo + chunk, cfg.n_users))
            du, it = sampler.sample(users, rng)
            order = np.lexsort((rng.random(len(du)), du))  # by user, random order within a user
            du, it = du[order], it[order]
            gaps = np.cumsum(1 + rng.exponential(43_200.0, len(du)).astype(np.int64))
            starts = np.searchsorted(du, np.arange(len(users)))
            before = np.concatenate([[0], gaps])[starts]  # cumulative gap before each user's block
            start = _T0 + rng.integers(0, 365 * 86_400, len(users))
            ts = start[du] + gaps - before[du]
            seen[it] = True
            writer.write_table(pa.table([p.user_ids[users[du]], p.item_ids[it], ts], schema=schema))
            rows += len(du)
            groups += 1
    return {"path": str(path), "rows": rows, "users": cfg.n_users, "items": int(seen.sum()),
            "row_groups": groups}


# --------------------------------------------------------------------------------------------
# CTR
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticCTR:
    """Settings of the synthetic click-through-rate generator.

    Args:
        n_rows: number of rows (impressions).
        n_dense: number of dense float32 columns ``d0..`` (non-negative lognormal counts).
        cardinalities: vocabulary size of each single-valued sparse column ``s0..``.
        multi_valued_cardinality: vocabulary size of the multi-valued ``tags`` column (0 = none).
        max_tags: maximum number of ids in a ``tags`` cell (each cell holds 1..max_tags).
        dim: dimension of the planted embeddings of the crossed fields.
        n_crosses: number of planted pairwise crosses ``<e_a(id_a), e_b(id_b)>`` between sparse
            fields (at most ``k (k - 1) / 2`` for ``k`` fields).
        base_rate: approximate click rate (the planted bias is calibrated to it).
        seed: seed of everything; the same config always writes the same file.
        chunk_rows: rows generated per chunk (one Parquet row group each).
        zipf_exponents: Zipf exponent of each sparse field's ids; empty = 1.0 for all.
        dense_sigma: log-scale spread of the dense counts (lognormal sigma): larger = heavier tails.
        dense_missing: share of missing values (NaN) of each dense column; empty = none.
        sparse_missing: share of missing ids (raw id -1, as the Criteo reader writes them) of each
            sparse field; empty = none. Missing values carry no planted weight.
        cardinality_rows: the row count ``cardinalities`` are meant for; when set, fields of more
            than 100 ids are scaled by ``n_rows / cardinality_rows`` (never below 100), smaller
            ones are fixed vocabularies. None uses ``cardinalities`` as given.
        logit_scale: multiplies the planted logit before the bias is calibrated: below 1 makes
            noisier labels (a lower planted AUC).

    Example:
        >>> stats = generate_ctr(SyntheticCTR(n_rows=10_000), "/tmp/ctr.parquet")
        >>> stats["schema"]["sparse"]
        ['s0', 's1', 's2', 's3', 's4', 's5']
    """

    n_rows: int = 200_000
    n_dense: int = 4
    cardinalities: tuple[int, ...] = (1000, 500, 100, 50, 20, 10)
    multi_valued_cardinality: int = 200
    max_tags: int = 5
    dim: int = 8
    n_crosses: int = 3
    base_rate: float = 0.2
    seed: int = 0
    chunk_rows: int = 200_000
    zipf_exponents: tuple[float, ...] = ()
    dense_sigma: float = 1.0
    dense_missing: tuple[float, ...] = ()
    sparse_missing: tuple[float, ...] = ()
    cardinality_rows: int | None = None
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("cardinalities", "zipf_exponents", "dense_missing", "sparse_missing"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                setattr(self, name, tuple(value))  # lists from YAML / Hydra
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        owner = type(self).__name__
        _check_ints(owner, self, {"n_rows": 1, "n_dense": 0, "multi_valued_cardinality": 0, "max_tags": 1,
                                  "dim": 1, "n_crosses": 0, "seed": 0, "chunk_rows": 1})
        cards = self.cardinalities
        _require(isinstance(cards, tuple) and all(_is_int(c) and c >= 1 for c in cards), owner,
                 "cardinalities", cards, "a tuple of integers >= 1")
        pairs = len(cards) * (len(cards) - 1) // 2
        _require(self.n_crosses <= pairs, owner, "n_crosses", self.n_crosses,
                 f"at most {pairs} (the number of pairs of the {len(cards)} sparse fields)")
        b = self.base_rate
        _require(_is_num(b) and 0 < b < 1, owner, "base_rate", b, "a number strictly between 0 and 1")
        _require(_is_num(self.dense_sigma) and self.dense_sigma > 0, owner, "dense_sigma", self.dense_sigma,
                 "a finite number > 0")
        for name, size, ok, expected in (
                ("zipf_exponents", len(cards), lambda v: _is_num(v) and v >= 0, "numbers >= 0"),
                ("dense_missing", self.n_dense, lambda v: _is_num(v) and 0 <= v < 1, "shares in [0, 1)"),
                ("sparse_missing", len(cards), lambda v: _is_num(v) and 0 <= v < 1, "shares in [0, 1)")):
            v = getattr(self, name)
            _require(isinstance(v, tuple) and len(v) in (0, size) and all(map(ok, v)), owner, name, v,
                     f"an empty tuple or {size} {expected} (one per column)")
        _require(_is_num(self.logit_scale) and self.logit_scale > 0, owner, "logit_scale", self.logit_scale,
                 "a finite number > 0")
        r = self.cardinality_rows
        _require(r is None or (_is_int(r) and r >= 1), owner, "cardinality_rows", r, "None or an integer >= 1")

    @property
    def resolved_cardinalities(self) -> tuple[int, ...]:
        """The cardinalities used: ``cardinalities``, scaled to ``n_rows`` if ``cardinality_rows`` is set."""
        if self.cardinality_rows is None:
            return self.cardinalities
        factor = self.n_rows / self.cardinality_rows
        return tuple(c if c <= 100 else max(100, round(c * factor)) for c in self.cardinalities)

    @property
    def schema(self) -> CTRSchema:
        """The columns written: ``label``, ``d*``, ``s*`` and ``tags`` (if enabled)."""
        return CTRSchema(dense=tuple(f"d{j}" for j in range(self.n_dense)),
                         sparse=tuple(f"s{j}" for j in range(len(self.cardinalities))),
                         multi_valued=("tags",) if self.multi_valued_cardinality else ())


def _hash_ids(n: int, salt: int) -> np.ndarray:
    """Distinct non-negative int64 raw ids for indices 0..n-1 (odd multiplier mod 2^62, xor salt)."""
    x = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(2**62 - 1)
    return (x ^ np.uint64(salt & (2**62 - 1))).astype(np.int64)


def _zipf_cdf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(np.exp(_zipf_log_weights(n, exponent, rng)))
    cdf[-1] = 1.0
    return cdf


def _draw(cdf: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(size)
    order = np.argsort(u)  # sorted queries are cache friendly: several times faster on large cdfs
    out = np.empty(size, dtype=np.int64)
    out[order] = np.searchsorted(cdf, u[order], side="right")
    return np.minimum(out, len(cdf) - 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class _PlantedCTR:
    """Planted parameters of :func:`generate_ctr`, drawn once from ``cfg.seed``.

    Index ``cardinality`` of a sparse field is its missing value: raw id -1, zero weights.
    """

    def __init__(self, cfg: SyntheticCTR) -> None:
        rng = np.random.default_rng([cfg.seed, 0])
        self.cfg = cfg
        cards = cfg.resolved_cardinalities
        exponents = cfg.zipf_exponents or (_CTR_ID_EXPONENT,) * len(cards)
        self.ids = [np.append(_hash_ids(c, int(rng.integers(2**62))), -1) for c in cards]
        self.cdfs = [_zipf_cdf(c, e, rng) for c, e in zip(cards, exponents)]
        self.linear = [np.append(rng.normal(0.0, _CTR_LINEAR_STD, c), 0.0) for c in cards]
        pairs = list(combinations(range(len(cards)), 2))
        self.crosses = [pairs[j] for j in np.sort(rng.choice(len(pairs), cfg.n_crosses, replace=False))]
        crossed = sorted({f for pair in self.crosses for f in pair})
        self.emb = {f: np.vstack([rng.normal(0.0, _CTR_EMB_STD / np.sqrt(np.sqrt(cfg.dim)), (cards[f], cfg.dim)),
                                  np.zeros((1, cfg.dim))]) for f in crossed}
        self.dense_mu = rng.uniform(0.0, 3.0, cfg.n_dense)
        self.dense_w = rng.normal(0.0, _CTR_DENSE_STD, cfg.n_dense)
        t = cfg.multi_valued_cardinality
        self.tag_ids = _hash_ids(t, int(rng.integers(2**62)))
        self.tag_cdf = _zipf_cdf(t, _CTR_ID_EXPONENT, rng) if t else None
        self.tag_w = rng.normal(0.0, _CTR_TAG_STD, t)
        z = self.rows(_CALIBRATION_ROWS, np.random.default_rng([cfg.seed, 2]))[1]
        lo, hi = -30.0, 30.0
        for _ in range(60):  # bisection: mean sigmoid(bias + z) is increasing in the bias
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _sigmoid(mid + z).mean() < cfg.base_rate else (lo, mid)
        self.bias = 0.5 * (lo + hi)

    def rows(self, n: int, rng: np.random.Generator) -> tuple[list[pa.Array], np.ndarray]:
        """``n`` rows of features (Arrow columns after ``label``) and their logits without the bias."""
        cfg, cols = self.cfg, []
        logit = np.zeros(n)
        for j in range(cfg.n_dense):
            d = np.floor(rng.lognormal(self.dense_mu[j], cfg.dense_sigma, n))
            effect = self.dense_w[j] * (np.log1p(d) - self.dense_mu[j]) / cfg.dense_sigma
            if cfg.dense_missing and cfg.dense_missing[j] > 0:
                missing = rng.random(n) < cfg.dense_missing[j]
                d[missing], effect[missing] = np.nan, 0.0
            logit += effect
            cols.append(pa.array(d.astype(np.float32)))
        idx = [_draw(cdf, n, rng) for cdf in self.cdfs]
        for f, i in enumerate(idx):
            if cfg.sparse_missing and cfg.sparse_missing[f] > 0:
                i[rng.random(n) < cfg.sparse_missing[f]] = len(self.cdfs[f])
            logit += self.linear[f][i]
            cols.append(pa.array(self.ids[f][i]))
        for a, b in self.crosses:
            logit += np.einsum("ij,ij->i", self.emb[a][idx[a]], self.emb[b][idx[b]])
        if self.tag_cdf is not None:
            lengths = rng.integers(1, cfg.max_tags + 1, n)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            tags = _draw(self.tag_cdf, int(offsets[-1]), rng)
            logit += np.add.reduceat(self.tag_w[tags], offsets[:-1]) / lengths
            cols.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(self.tag_ids[tags])))
        return cols, cfg.logit_scale * logit


def generate_ctr(cfg: SyntheticCTR, path: str | Path) -> dict:
    """Write a synthetic CTR table to Parquet, one row group per ``chunk_rows`` rows.

    Columns (see :class:`~recsys.data.schemas.CTRSchema`): ``label`` int8, ``d0..`` float32
    (non-negative lognormal counts, NaN when missing), ``s0..`` int64 raw ids (hashed, not
    contiguous, Zipf frequencies, -1 when missing), ``tags`` list<int64> of 1..max_tags Zipf ids
    (drawn with replacement). The label is Bernoulli(sigmoid(logit)), logit = bias + per-id linear
    weights + dense linear term (in log1p of the counts) + planted pairwise crosses + mean-pooled
    tag weights, all times ``logit_scale``.

    ``planted_auc`` is the AUC of the labels against the true probabilities over all rows, from
    per-chunk histograms of the logits (2^20 bins; ties within a bin count half, so it is within
    ~1e-5 of the exact value), so memory does not grow with ``n_rows``.

    Args:
        cfg: generator settings.
        path: output Parquet file (parent directories are created).

    Returns:
        ``{"path", "rows", "row_groups", "positive_rate", "planted_auc", "bias", "crosses",
        "cardinalities", "schema"}``; ``crosses`` lists the crossed column pairs, ``cardinalities``
        are the resolved ones, ``schema`` is ``CTRSchema.to_dict()``.

    Example:
        >>> stats = generate_ctr(SyntheticCTR(n_rows=20_000, seed=1), "/tmp/ctr.parquet")
        >>> 0.15 < stats["positive_rate"] < 0.25
        True
    """
    cfg.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    planted = _PlantedCTR(cfg)
    schema = cfg.schema
    positives, negatives, groups = np.zeros(_AUC_BINS), np.zeros(_AUC_BINS), 0
    with pq.ParquetWriter(path, schema.prepared()) as writer:
        for c, lo in enumerate(range(0, cfg.n_rows, cfg.chunk_rows)):
            rng = np.random.default_rng([cfg.seed, 1, c])
            cols, logit = planted.rows(min(cfg.chunk_rows, cfg.n_rows - lo), rng)
            logit += planted.bias
            label = (rng.random(len(logit)) < _sigmoid(logit)).astype(np.int8)
            writer.write_table(pa.Table.from_arrays([pa.array(label)] + cols, schema=schema.prepared()))
            bins = np.clip((logit + _AUC_RANGE) * (_AUC_BINS / (2 * _AUC_RANGE)), 0, _AUC_BINS - 1).astype(np.int64)
            positives += np.bincount(bins, weights=label, minlength=_AUC_BINS)
            negatives += np.bincount(bins, weights=1 - label, minlength=_AUC_BINS)
            groups += 1
    n_pos, n_neg = positives.sum(), negatives.sum()
    below = np.cumsum(negatives) - negatives  # negatives in lower bins
    auc = (positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg) if n_pos and n_neg else float("nan")
    return {"path": str(path), "rows": cfg.n_rows, "row_groups": groups, "positive_rate": float(n_pos / cfg.n_rows),
            "planted_auc": float(auc),
            "bias": planted.bias, "crosses": [(schema.sparse[a], schema.sparse[b]) for a, b in planted.crosses],
            "cardinalities": list(cfg.resolved_cardinalities), "schema": schema.to_dict()}
