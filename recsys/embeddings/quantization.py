"""Vector and product quantization of embedding tables (codes + codebooks instead of rows).

Product quantization (PQ) splits the D dimensions into S subspaces of D/S dimensions. Subspace s
has a codebook of K codewords, and each id keeps S integer codes: its vector is the concatenation
of the S codewords its codes name. A table then costs ``N * S`` code bytes (uint8 while K <= 256)
plus ``K * D * 4`` codebook bytes instead of ``N * D * 4``. (This is not the int8 *serving*
quantization of table rows, which lives elsewhere.)

- ``ProductQuantization`` stores fixed codes; its S codebooks are plain TorchRec tables, so the
  lookups run pooled in FBGEMM. Post-training PQ fits codes and codebooks to a trained table with
  FAISS k-means (``ProductQuantization.from_table``). Without a source table the codes are drawn
  at random (seeded) and only the codebooks are learned: the *random codes* baseline.
- ``DifferentiableVQ`` learns codes and codebooks end to end, following DPQ-VQ (Chen et al., 2020,
  "Differentiable Product Quantization for End-to-End Embedding Compression") with the VQ-VAE
  losses (van den Oord et al., 2017). During training each id has a full-size *query* row; each
  subspace of the query is replaced by its nearest codeword and the straight-through estimator
  passes the gradient to the query. ``auxiliary_loss()`` adds the codebook loss
  ``||sg(q) - c||^2`` and the commitment loss ``beta * ||q - sg(c)||^2``. Dead codewords are
  re-seeded from random query vectors of the current batch (Lancucki et al., 2020). After
  training, ``export()`` returns a ``ProductQuantization`` with the learned codes and codebooks:
  the query table is dropped, so inference memory is codes + codebooks.

A ``budget`` (a fraction of the float32 table's bytes) picks K, and S too when ``subspaces`` is
None, so that codes + codebooks fit (see ``plan_codebooks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError

DEFAULT_CODEWORDS = 256
# (largest K the dtype can index, code dtype), narrowest first.
_CODE_DTYPES = ((256, torch.uint8), (32768, torch.int16), (2**31 - 1, torch.int32))


def code_dtype(codewords: int) -> torch.dtype:
    """The narrowest integer dtype that holds codes 0..codewords-1: uint8, int16 or int32.

    Example:
        >>> code_dtype(256), code_dtype(257), code_dtype(40000)
        (torch.uint8, torch.int16, torch.int32)
    """
    for limit, dtype in _CODE_DTYPES:
        if codewords <= limit:
            return dtype
    raise ConfigError(f"codewords={codewords} exceeds the int32 code range ({2**31 - 1})")


def pq_bytes(num_embeddings: int, dim: int, subspaces: int, codewords: int) -> int:
    """Bytes of a product-quantized table: N x S codes plus S codebooks of K x D/S float32.

    Example:
        >>> pq_bytes(1000, 32, 4, 256)  # 4000 uint8 codes + 256 * 32 * 4 codebook bytes
        36768
    """
    itemsize = torch.empty((), dtype=code_dtype(codewords)).element_size()
    return num_embeddings * subspaces * itemsize + codewords * dim * 4


def _largest_codewords(num_embeddings: int, dim: int, subspaces: int, limit: float) -> int:
    """The largest K (at most max(N, 2)) whose codes + codebooks fit ``limit`` bytes; 0 if none."""
    best = 0
    for cap, dtype in _CODE_DTYPES:
        itemsize = torch.empty((), dtype=dtype).element_size()
        k = min(cap, max(num_embeddings, 2), math.floor((limit - num_embeddings * subspaces * itemsize) / (4 * dim)))
        best = max(best, k)
    return best


def plan_codebooks(num_embeddings: int, dim: int, budget: float, subspaces: int | None = None,
                   table: str = "table") -> tuple[int, int]:
    """(S, K) whose codes + codebooks fit ``budget`` times the float32 table's bytes.

    With ``subspaces`` given only K is chosen (the largest that fits, at most N). With
    ``subspaces=None``, S is chosen among the divisors of D whose width D/S is a multiple of 4
    (what FBGEMM's kernels take; any divisor when none is), maximising the code bits
    ``S * log2(K)`` (ties go to fewer subspaces).

    Args:
        num_embeddings: rows N of the table.
        dim: dimension D.
        budget: memory budget as a fraction of ``N * D * 4`` bytes.
        subspaces: S, or None to choose it.
        table: table name, for error messages.

    Example:
        >>> plan_codebooks(1_000_000, 64, 0.05)
        (8, 256)
        >>> plan_codebooks(1_000_000, 64, 0.05, subspaces=4)
        (4, 18750)
    """
    if budget <= 0:
        raise ConfigError(f"table '{table}': budget must be > 0, got {budget}")
    full = num_embeddings * dim * 4
    limit = budget * full
    if subspaces is not None:
        _check_subspaces(table, dim, subspaces)
    # FBGEMM's fused kernels need table widths divisible by 4: prefer subspaces of such widths.
    divisors = [s for s in range(1, dim + 1) if dim % s == 0]
    options = [subspaces] if subspaces is not None else [s for s in divisors if (dim // s) % 4 == 0] or divisors
    best = None
    for s in options:
        k = _largest_codewords(num_embeddings, dim, s, limit)
        if k >= 2 and (best is None or s * math.log2(k) > best[0] * math.log2(best[1]) + 1e-9):
            best = (s, k)
    if best is None:
        s = subspaces or 1
        raise ConfigError(f"table '{table}': budget={budget} allows {int(limit)} bytes of the {full}-byte table "
                          f"({num_embeddings} x {dim} float32), but {s} subspace(s) with 2 codewords need "
                          f"{pq_bytes(num_embeddings, dim, s, 2)} bytes; raise budget or lower subspaces")
    return best


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_subspaces(table: str, dim: int, subspaces: int) -> None:
    if subspaces < 1 or dim % subspaces:
        raise ConfigError(f"table '{table}': subspaces={subspaces} must be >= 1 and divide dim={dim}")


def nearest_codes(vectors: torch.Tensor, codebooks: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """(n, D) vectors -> (n, S) int64 index of the nearest codeword in each subspace.

    Args:
        vectors: (n, D) rows, D = S * d.
        codebooks: (S, K, d) codewords.
        chunk_elements: rows are processed in chunks of about this many distances.

    Example:
        >>> books = torch.tensor([[[0.0], [1.0]], [[0.0], [5.0]]])  # S=2, K=2, d=1
        >>> nearest_codes(torch.tensor([[0.9, 0.2], [0.1, 4.0]]), books).tolist()
        [[1, 0], [0, 1]]
    """
    num_subspaces, num_codewords, sub_dim = codebooks.shape
    x = vectors.detach().reshape(len(vectors), num_subspaces, sub_dim).to(codebooks.dtype)
    books = codebooks.detach()
    if x.device.type == "cpu" and books.dtype == torch.float32:  # FAISS's blocked L2 search: no n x K matrix in memory
        codes = np.empty((len(x), num_subspaces), dtype=np.int64)
        for s in range(num_subspaces):
            codes[:, s] = faiss.knn(np.ascontiguousarray(x[:, s].numpy()), np.ascontiguousarray(books[s].numpy()), 1)[1][:, 0]
        return torch.from_numpy(codes)
    squared = books.pow(2).sum(-1)  # (S, K)
    step = max(1, chunk_elements // (num_subspaces * num_codewords))
    parts = []
    for start in range(0, len(x), step):
        part = x[start:start + step]
        distance = squared.unsqueeze(0) - 2 * torch.einsum("nsd,skd->nsk", part, books)
        parts.append(distance.argmin(-1))
    return torch.cat(parts) if parts else torch.empty(0, num_subspaces, dtype=torch.int64, device=vectors.device)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(n, S) codes and (S, K, d) codebooks -> (n, S * d) vectors (the concatenated codewords).

    Example:
        >>> books = torch.tensor([[[0.0], [1.0]], [[0.0], [5.0]]])
        >>> reconstruct(torch.tensor([[1, 1], [0, 1]], dtype=torch.uint8), books).tolist()
        [[1.0, 5.0], [0.0, 5.0]]
    """
    subspace = torch.arange(codebooks.shape[0], device=codebooks.device)
    return codebooks[subspace, codes.long()].reshape(len(codes), -1)


def fit_product_quantizer(weights: torch.Tensor, subspaces: int, codewords: int, seed: int = 0,
                          iterations: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """FAISS k-means in each subspace of a trained table: (N, D) rows -> codes and codebooks.

    A subspace with at most K distinct rows gets exactly those rows as codewords (exact
    reconstruction, the no-compression limit); the rest of its codebook is zeros.

    Args:
        weights: (N, D) trained rows (e.g. a full table's weight, or ``embed`` of every id).
        subspaces: S; must divide D.
        codewords: K codewords per subspace.
        seed: k-means seed (subspace s uses ``seed + s``).
        iterations: k-means iterations.

    Returns:
        (N, S) codes in the narrowest dtype (``code_dtype(K)``) and (S, K, D/S) float32 codebooks.

    Example:
        >>> codes, books = fit_product_quantizer(torch.randn(500, 8), subspaces=2, codewords=16)
        >>> codes.shape, codes.dtype, books.shape
        (torch.Size([500, 2]), torch.uint8, torch.Size([2, 16, 4]))
    """
    import faiss  # imported here: only post-training PQ needs it

    if weights.dim() != 2:
        raise ConfigError(f"weights must be a 2-D (N, D) table, got shape {tuple(weights.shape)}")
    n, dim = weights.shape
    _check_subspaces("weights", dim, subspaces)
    if codewords < 2:
        raise ConfigError(f"codewords must be >= 2, got {codewords}")
    sub_dim = dim // subspaces
    rows = np.ascontiguousarray(weights.detach().cpu().float().numpy())
    codes = np.zeros((n, subspaces), dtype=np.int64)
    books = np.zeros((subspaces, codewords, sub_dim), dtype=np.float32)
    for s in range(subspaces):
        x = np.ascontiguousarray(rows[:, s * sub_dim:(s + 1) * sub_dim])
        unique, inverse = np.unique(x, axis=0, return_inverse=True)
        if len(unique) <= codewords:
            books[s, :len(unique)], codes[:, s] = unique, inverse.reshape(-1)
            continue
        kmeans = faiss.Kmeans(sub_dim, codewords, niter=iterations, seed=seed + s, verbose=False,
                              min_points_per_centroid=1)
        kmeans.train(x)
        books[s] = kmeans.centroids
        codes[:, s] = kmeans.index.search(x, 1)[1][:, 0]
    return torch.from_numpy(codes).to(code_dtype(codewords)), torch.from_numpy(books)


class ProductQuantizedTable(Method):
    """Fixed codes (an N x S buffer) and S codebook tables of K x D/S rows; concat combiner.

    Args:
        spec: the logical table.
        codes: (N, S) codes in the narrowest dtype of ``codewords``.
        codewords: K, rows of each codebook table.
        codebooks: (S, K, D/S) starting codebook rows, or None for the collection's uniform init.

    Example:
        >>> codes = torch.tensor([[0, 1], [1, 1], [2, 0]], dtype=torch.uint8)
        >>> m = ProductQuantizedTable(TableSpec("item", 3, 4, ("item",)), codes, codewords=4)
        >>> [(t.suffix, t.rows, t.dim) for t in m.plain_tables()]
        [('codebook0', 4, 2), ('codebook1', 4, 2)]
        >>> [s.tolist() for s in m.transform(torch.tensor([2, 0]))]
        [[2, 0], [0, 1]]
    """

    additive = True

    def __init__(self, spec: TableSpec, codes: torch.Tensor, codewords: int,
                 codebooks: torch.Tensor | None = None):
        super().__init__(spec)
        self.codewords = codewords
        self.register_buffer("codes", codes)
        self._codebooks = codebooks

    @property
    def subspaces(self) -> int:
        return self.codes.shape[1]

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable(f"codebook{s}", self.codewords, self.spec.dim // self.subspaces)
                for s in range(self.subspaces)]

    def initial_weights(self) -> dict[str, torch.Tensor]:
        if self._codebooks is None:
            return {}
        return {f"codebook{s}": self._codebooks[s] for s in range(self.subspaces)}

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return list(self.codes[ids].T.long())  # each subspace's codes contiguous: fast gathers

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        return torch.cat(parts, dim=1)

    def stream_queries(self, queries: torch.Tensor) -> list[torch.Tensor]:
        """Each subspace's slice of the query scores its codebook (a lookup table of B x K inner products)."""
        return list(queries.split(self.spec.dim // self.subspaces, dim=1))

    def stream_rows(self, start: int, stop: int) -> torch.Tensor:
        """The codes of a range of ids, sliced from the codes buffer: the PQ scan over the codebooks' K x B tables."""
        return self.codes[start:stop]


def _as_codes(codes, field_name: str = "codes") -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ConfigError(f"{field_name} must be an integer (N, S) tensor, got dtype {codes.dtype} "
                          f"and shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.min()) < 0:
        raise ConfigError(f"{field_name} must be >= 0, found {int(codes.min())}")
    return codes


def _validate_k(subspaces: int | None, codewords: int | None, budget: float | None) -> None:
    if subspaces is not None and subspaces < 1:
        raise ConfigError(f"subspaces must be >= 1 (or null with a budget), got {subspaces}")
    if codewords is not None and not 2 <= codewords <= _CODE_DTYPES[-1][0]:
        raise ConfigError(f"codewords must be in [2, {_CODE_DTYPES[-1][0]}], got {codewords}")
    if budget is not None and budget <= 0:
        raise ConfigError(f"budget must be > 0 (a fraction of the float32 table's bytes), got {budget}")
    if codewords is not None and budget is not None:
        raise ConfigError(f"set either codewords ({codewords}) or budget ({budget}), not both: "
                          f"the budget chooses the codewords")
    if subspaces is None and budget is None:
        raise ConfigError("subspaces=null needs a budget to choose the number of subspaces")


def _resolve(spec: TableSpec, subspaces: int | None, codewords: int | None, budget: float | None,
             fallback: int = DEFAULT_CODEWORDS) -> tuple[int, int]:
    """(S, K) of a table from explicit values, a budget, or the default K."""
    if budget is not None:
        return plan_codebooks(spec.num_embeddings, spec.dim, budget, subspaces, spec.name)
    _check_subspaces(spec.name, spec.dim, subspaces)
    return subspaces, codewords or fallback


@dataclass
class ProductQuantization(Compression):
    """Product quantization with fixed codes (``embedding=product_quantization``).

    Args:
        subspaces: S; must divide D. None (with a budget) lets the budget choose it.
        codewords: K codewords per subspace; None = 256, or the largest that fits ``budget``.
        budget: memory budget as a fraction of the float32 table's bytes (chooses K, and S when
            ``subspaces`` is None); exclusive with ``codewords``.
        source: where the codes come from: ``random`` (seeded random codes, codebooks learned: the
            random-codes baseline), ``kmeans`` (``from_table``), ``vq`` (``DifferentiableVQ`` export) or
            ``stored`` (a model package's weights: ``build`` makes zero codes and codebooks to load them into).
        codes: (N, S) integer codes (required for ``kmeans`` and ``vq``).
        codebooks: (S, K, D/S) starting codebook rows (None: the collection's uniform init).
        seed: seed of the random codes.

    Example:
        >>> ProductQuantization(subspaces=2, codewords=16).build(TableSpec("item", 100, 8, ("item",))).codes.dtype
        torch.uint8
    """

    subspaces: int | None = 4
    codewords: int | None = None
    budget: float | None = None
    source: Literal["random", "kmeans", "vq", "stored"] = "random"
    codes: torch.Tensor | None = field(default=None, repr=False, compare=False)
    codebooks: torch.Tensor | None = field(default=None, repr=False, compare=False)
    seed: int = 0

    def __post_init__(self):
        _validate_k(self.subspaces, self.codewords, self.budget)
        if self.source not in ("random", "kmeans", "vq", "stored"):
            raise ConfigError(f"source must be random, kmeans, vq or stored, got {self.source!r}")
        if self.source in ("random", "stored") and self.codes is not None:
            raise ConfigError(f"source={self.source!r} takes no codes; pass source='kmeans' or 'vq' with codes")
        if self.source == "stored" and (self.subspaces is None or self.codewords is None):
            raise ConfigError("source='stored' needs subspaces and codewords: the shapes of the stored codes")
        if self.source in ("kmeans", "vq") and self.codes is None:
            raise ConfigError(f"source={self.source!r} needs codes: build it with ProductQuantization.from_table "
                              f"(kmeans) or DifferentiableVQTable.export (vq)")
        if self.codes is not None:
            self.codes = _as_codes(self.codes)
        if self.codebooks is not None:
            self.codebooks = torch.as_tensor(self.codebooks, dtype=torch.float32)
            if self.codebooks.dim() != 3:
                raise ConfigError(f"codebooks must be (S, K, D/S), got shape {tuple(self.codebooks.shape)}")

    @classmethod
    def from_table(cls, weights: torch.Tensor, subspaces: int | None = 4, codewords: int | None = None,
                   budget: float | None = None, seed: int = 0, iterations: int = 25) -> ProductQuantization:
        """Post-training PQ: fits codes and codebooks to a trained (N, D) table with FAISS k-means.

        Args:
            weights: (N, D) trained rows, e.g. ``task.embed(feature, torch.arange(N))`` of a full table.
            subspaces: S (None: chosen by ``budget``).
            codewords: K (None: 256, or chosen by ``budget``).
            budget: memory budget as a fraction of ``N * D * 4`` bytes.
            seed: k-means seed.
            iterations: k-means iterations.

        Example:
            >>> pq = ProductQuantization.from_table(torch.randn(300, 8), subspaces=2, codewords=16)
            >>> pq.source, pq.codes.shape, pq.codebooks.shape
            ('kmeans', torch.Size([300, 2]), torch.Size([2, 16, 4]))
        """
        _validate_k(subspaces, codewords, budget)
        if weights.dim() != 2:
            raise ConfigError(f"weights must be a 2-D (N, D) table, got shape {tuple(weights.shape)}")
        spec = TableSpec("weights", weights.shape[0], weights.shape[1], ("weights",))
        subspaces, codewords = _resolve(spec, subspaces, codewords, budget)
        codes, codebooks = fit_product_quantizer(weights, subspaces, codewords, seed, iterations)
        return cls(subspaces=subspaces, codewords=codewords, source="kmeans", codes=codes, codebooks=codebooks,
                   seed=seed)

    def stored(self) -> ProductQuantization:
        """Fitted codes and codebooks go into the package's weights; the config keeps their shapes."""
        if self.codes is None:
            return self
        codewords = self.codewords or (self.codebooks.shape[1] if self.codebooks is not None else None)
        if codewords is None:
            raise ConfigError("a ProductQuantization with codes needs codewords or codebooks to be stored")
        return ProductQuantization(subspaces=self.codes.shape[1], codewords=codewords, source="stored", seed=self.seed)

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> ProductQuantizedTable:
        subspaces, codewords = self.subspaces, self.codewords
        if self.codes is not None and subspaces is not None and self.codes.shape[1] != subspaces:
            raise ConfigError(f"table '{spec.name}': codes have {self.codes.shape[1]} columns, subspaces={subspaces}")
        if codewords is None and self.budget is None and self.codebooks is not None:
            codewords = self.codebooks.shape[1]
        subspaces, codewords = _resolve(spec, subspaces, codewords, self.budget)
        sub_dim = spec.dim // subspaces
        if self.source == "stored":
            codes = torch.zeros(spec.num_embeddings, subspaces, dtype=code_dtype(codewords))
        elif self.codes is None:
            generator = torch.Generator().manual_seed(self.seed)
            codes = torch.randint(0, codewords, (spec.num_embeddings, subspaces), generator=generator)
        else:
            codes = self.codes
            if tuple(codes.shape) != (spec.num_embeddings, subspaces):
                raise ConfigError(f"table '{spec.name}': codes have shape {tuple(codes.shape)}, expected "
                                  f"({spec.num_embeddings}, {subspaces})")
            if codes.numel() and int(codes.max()) >= codewords:
                raise ConfigError(f"table '{spec.name}': codes reach {int(codes.max())}, but codewords={codewords}")
        if self.codebooks is not None and tuple(self.codebooks.shape) != (subspaces, codewords, sub_dim):
            raise ConfigError(f"table '{spec.name}': codebooks have shape {tuple(self.codebooks.shape)}, expected "
                              f"({subspaces}, {codewords}, {sub_dim})")
        return ProductQuantizedTable(spec, codes.to(code_dtype(codewords)).contiguous(), codewords, self.codebooks)


class DifferentiableVQTable(Method):
    """End-to-end product VQ (see the module docstring): a query table, S codebooks, per-id combiner.

    The forward output of an id is the concatenation of its nearest codewords (exactly what the
    exported ``ProductQuantization`` returns); the gradient passes straight through to the query.
    Training forwards count codeword usage; the first one seeds every codeword from the batch's
    query vectors, and every ``reseed_every`` batches codewords used fewer than
    ``dead_code_threshold`` times since the last check are re-seeded from random query vectors.

    On W ranks the counts cover every rank's batch: a training forward adds W to ``calls`` and
    the usage of all W batches (all-reduced) to ``usage``, so every rank holds the same counts
    and a checkpoint holds them all; W ranks count as one process reading their W batches one
    after the other (what ``tests/test_sharding.py`` compares), and ``dead_code_threshold``
    means the same for any W.

    Args:
        spec: the logical table.
        subspaces: S; must divide D.
        codewords: K per subspace.
        settings: the ``DifferentiableVQ`` config (beta, dead-code settings, seed).

    Example:
        >>> m = DifferentiableVQ(subspaces=2, codewords=16).build(TableSpec("item", 100, 8, ("item",)))
        >>> [(t.suffix, t.rows, t.dim) for t in m.plain_tables()], m.codebooks.shape
        ([('query', 100, 8)], torch.Size([2, 16, 4]))
    """

    additive = False

    def __init__(self, spec: TableSpec, subspaces: int, codewords: int, settings: DifferentiableVQ):
        super().__init__(spec)
        self.subspaces, self.codewords, self.settings = subspaces, codewords, settings
        generator = torch.Generator().manual_seed(settings.seed)
        bound = 0.1 / spec.dim**0.5
        self.codebooks = nn.Parameter((torch.rand(subspaces, codewords, spec.dim // subspaces, generator=generator)
                                       * 2 - 1) * bound)
        self.register_buffer("usage", torch.zeros(subspaces, codewords))
        self.register_buffer("window_usage", torch.zeros(subspaces, codewords))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self._losses: list[torch.Tensor] = []
        self._count = 0
        self._combined = True
        self._reseed: Literal["all", "dead"] | None = None
        self._first_batch = 0  # number (from 1, over all ranks) of the current forward's first batch

    def plain_tables(self) -> list[PlainTable]:
        return [PlainTable("query", self.spec.num_embeddings, self.spec.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        # The collection transforms every feature before combining any, so a transform after a
        # combine starts a new forward: the auxiliary loss restarts and training forwards are counted.
        if self._combined:
            self._combined, self._losses, self._count = False, [], 0
            if self.training:
                world = dist.get_world_size() if _distributed() else 1
                first, every = int(self.calls) + 1, self.settings.reseed_every
                self.calls += world  # this forward reads batches first .. first + world - 1
                self._first_batch = first
                if first == 1:
                    self._reseed = "all"
                elif every and (first + world - 2) // every > (first - 2) // every:  # batch k * every + 1 is one
                    self._reseed = "dead"
        return [ids]

    def combine(self, parts: list[torch.Tensor], ids: torch.Tensor | None) -> torch.Tensor:
        self._combined = True
        query = parts[0]
        n = len(query)
        sub = query.reshape(n, self.subspaces, -1)
        if self._reseed is not None and (n > 0 or _distributed()):  # ranks run its collectives in step
            self.reseed_dead_codes(query, everything=self._reseed == "all")
            self._reseed = None
        codes = nearest_codes(query, self.codebooks)
        subspace = torch.arange(self.subspaces, device=codes.device)
        chosen = self.codebooks[subspace, codes]  # (n, S, d)
        if self.training:
            offsets = codes + subspace * self.codewords
            counts = torch.bincount(offsets.reshape(-1), minlength=self.usage.numel()).view_as(self.usage)
            counts = counts.to(self.usage.dtype)
            if _distributed():
                dist.all_reduce(counts)  # every rank counts every rank's batch (see the class docstring)
            self.usage += counts
        if torch.is_grad_enabled() and n > 0:
            codebook_loss = (chosen - sub.detach()).pow(2).sum()
            commitment = (sub - chosen.detach()).pow(2).sum()
            self._losses.append(codebook_loss + self.settings.beta * commitment)
            self._count += n
        # Straight-through: the value is exactly the codewords, the gradient goes to the query.
        return (chosen.detach() + (sub - sub.detach())).reshape(n, -1)

    def exported(self, weights: list[torch.Tensor]) -> ProductQuantization:
        """Served as the ``ProductQuantization`` of ``export``: codes and codebooks, no query table."""
        return self.export(weights[0])

    def budget_bytes(self) -> int:
        """What the table is served in (codes + codebooks), as the budget counts it."""
        return pq_bytes(self.spec.num_embeddings, self.spec.dim, self.subspaces, self.codewords)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Codebook + beta * commitment loss, per id (squared distances summed over D), of the last forward."""
        if not self._losses:
            return None
        return torch.stack(self._losses).sum() / self._count

    @torch.no_grad()
    def reseed_dead_codes(self, vectors: torch.Tensor, everything: bool = False) -> int:
        """Moves dead codewords onto random rows of ``vectors``; returns how many moved.

        A codeword is dead when used fewer than ``dead_code_threshold`` times since the last
        check (``usage`` already sums the ranks' batches); the usage counts then start a new window.
        Rank 0's new codebooks are broadcast, so every rank keeps the same ones.

        Args:
            vectors: (n, D) current query vectors (a training batch).
            everything: re-seed every codeword (the data-dependent init of the first forward).
        """
        distributed = _distributed()
        if everything:
            dead = torch.ones_like(self.usage, dtype=torch.bool)
        else:
            usage = self.usage.clone()
            dead = usage < self.settings.dead_code_threshold
            self.window_usage.copy_(usage)
            self.usage.zero_()
        if not bool(dead.any()) or not (len(vectors) or distributed):  # the same on every rank
            return 0
        books = self.codebooks.detach().clone()
        if len(vectors):
            sub = vectors.detach().reshape(len(vectors), self.subspaces, -1).to(books.dtype)
            generator = torch.Generator().manual_seed(self.settings.seed + self._first_batch)
            for s in range(self.subspaces):
                rows = dead[s].nonzero().squeeze(1)
                if len(rows) == 0:
                    continue
                picks = (torch.randperm(len(sub), generator=generator)[:len(rows)] if len(sub) >= len(rows)
                         else torch.randint(0, len(sub), (len(rows),), generator=generator))
                books[s, rows] = sub[picks.to(sub.device), s]
        if distributed:
            dist.broadcast(books, src=0)
        self.codebooks.copy_(books)
        return int(dead.sum())

    @torch.no_grad()
    def codebook_usage(self, vectors: torch.Tensor | None = None) -> dict[str, float]:
        """Fraction of codewords used and perplexity (both averaged over subspaces).

        Args:
            vectors: (N, D) rows to assign (e.g. every id's output); None = the training usage
                counted over the last one to two dead-code windows.

        Returns:
            ``used_fraction`` in [0, 1] and ``perplexity`` = exp(entropy of code use), in [1, K].
        """
        if vectors is None:
            counts = self.usage + self.window_usage
        else:
            subspace = torch.arange(self.subspaces, device=self.codebooks.device)
            offsets = nearest_codes(vectors.to(self.codebooks.device), self.codebooks) + subspace * self.codewords
            counts = torch.bincount(offsets.reshape(-1), minlength=self.usage.numel()).view_as(self.usage).float()
        p = counts / counts.sum(1, keepdim=True).clamp(min=1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(1)
        return {"used_fraction": float((counts > 0).float().mean()), "perplexity": float(entropy.exp().mean())}

    @torch.no_grad()
    def export(self, vectors: torch.Tensor) -> ProductQuantization:
        """The inference-time ``ProductQuantization``: learned codes and codebooks, no query table.

        Args:
            vectors: (N, D) the query rows or the table's output for ids 0..N-1 (e.g.
                ``task.embed(feature, torch.arange(N))``); both give the same codes.

        Example:
            >>> m = DifferentiableVQ(subspaces=2, codewords=4).build(TableSpec("item", 10, 4, ("item",)))
            >>> pq = m.export(torch.randn(10, 4))
            >>> pq.source, pq.codes.dtype, pq.codebooks.shape
            ('vq', torch.uint8, torch.Size([2, 4, 2]))
        """
        if tuple(vectors.shape) != (self.spec.num_embeddings, self.spec.dim):
            raise ConfigError(f"table '{self.spec.name}': export needs ({self.spec.num_embeddings}, {self.spec.dim}) "
                              f"vectors, got {tuple(vectors.shape)}")
        codes = nearest_codes(vectors.to(self.codebooks.device), self.codebooks).to(code_dtype(self.codewords))
        return ProductQuantization(subspaces=self.subspaces, codewords=self.codewords, source="vq", codes=codes.cpu(),
                                   codebooks=self.codebooks.detach().cpu().clone())


@dataclass
class DifferentiableVQ(Compression):
    """End-to-end differentiable product VQ (``embedding=vq_e2e``); ``export()`` after training.

    Training holds a full query table (N x D) besides the codebooks; the budget applies to the
    exported codes + codebooks.

    Args:
        subspaces: S; must divide D. None (with a budget) lets the budget choose it.
        codewords: K per subspace; None = 256, or the largest that fits ``budget``.
        budget: exported memory budget as a fraction of the float32 table's bytes; exclusive with
            ``codewords``.
        beta: weight of the commitment loss ``||q - sg(c)||^2``.
        dead_code_threshold: codewords used fewer times than this over a window are re-seeded.
        reseed_every: window length in training batches, counted over all ranks (0 = only the initial seeding).
        seed: seed of the codebook init and the re-seeding draws.

    Example:
        >>> DifferentiableVQ(subspaces=2, codewords=16).build(TableSpec("item", 100, 8, ("item",))).codebooks.shape
        torch.Size([2, 16, 4])
    """

    subspaces: int | None = 4
    codewords: int | None = None
    budget: float | None = None
    beta: float = 0.25
    dead_code_threshold: float = 1.0
    reseed_every: int = 100
    seed: int = 0

    def __post_init__(self):
        _validate_k(self.subspaces, self.codewords, self.budget)
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.dead_code_threshold < 0:
            raise ConfigError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if self.reseed_every < 0:
            raise ConfigError(f"reseed_every must be >= 0 (0 = never), got {self.reseed_every}")

    def build(self, spec: TableSpec, stats: TableStats | None = None) -> DifferentiableVQTable:
        subspaces, codewords = _resolve(spec, self.subspaces, self.codewords, self.budget)
        return DifferentiableVQTable(spec, subspaces, codewords, self)
