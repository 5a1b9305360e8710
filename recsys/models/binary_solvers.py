"""Solvers of many small QUBO problems at once: ``min over h in {0, 1}^k of h^T Q h + c^T h``.

NBMF's item step is one such problem per item (``Q_i`` is k x k, symmetric). Every solver here takes a
batch of N problems, ``q`` (N, k, k) and ``c`` (N, k), and works on all N in parallel with torch ops, so
the Python loops run over bits, sweeps or code chunks, never over items:

- :func:`enumerate_qubo`: the exact minimum over all ``2^k`` codes (small k). The k bits are split in
  a low and a high half, so the energies of all codes of a chunk of items come from two small tables
  and one batched matrix product: ``E(a, b) = E_low(a) + E_high(b) + 2 a^T Q_lh b``.
- :func:`anneal_qubo`: simulated annealing. Bit ``j`` of every item is proposed at once; each item
  accepts with the Metropolis rule at its own temperature (a per-item energy scale times a geometric
  schedule). The best state seen (checked after every sweep) is returned.
- :func:`greedy_descent`: steepest single-bit-flip descent; every accepted flip lowers the energy, so
  it never increases the objective and stops in a local minimum (no single flip helps).
- :func:`solve_qubo`: picks one of them and keeps, per item, the better of the start and the result.

Local fields make a flip cheap: with ``f = Q h``, flipping bit ``j`` (``d = 1 - 2 h_j``) changes the
energy by ``d (2 f_j + c_j) + Q_jj`` and ``f`` by ``d Q[:, j]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.errors import ConfigError
from recsys.models.settings import check, is_int, is_number

METHODS = ("auto", "enumerate", "anneal", "greedy")
AUTO_ENUMERATION_BITS = 12  # "auto" enumerates all 2^k codes up to this k; anneals (then greedy) above
MAX_ENUMERATION_BITS = 20  # "enumerate" refuses larger k: 2^k codes per item
ENUMERATION_ELEMENTS = 1 << 22  # energies held at once by enumerate_qubo (items of a chunk x 2^k codes)


@dataclass
class Annealing:
    """Settings of :func:`anneal_qubo`.

    Args:
        sweeps: passes over all k bits (>= 1); the temperature falls geometrically from the first to the last.
        t_start: first temperature, as a multiple of each item's energy scale (> 0).
        t_end: last temperature, same units (> 0, <= t_start).

    Example:
        >>> Annealing(sweeps=50, t_start=2.0, t_end=0.02).temperatures()[[0, -1]]
        tensor([2.0000, 0.0200], dtype=torch.float64)
    """

    sweeps: int = 100
    t_start: float = 0.2
    t_end: float = 0.01

    def __post_init__(self):
        check(is_int(self.sweeps), "annealing.sweeps", self.sweeps, "an integer >= 1")
        check(is_number(self.t_start) and self.t_start > 0, "annealing.t_start", self.t_start, "a finite number > 0")
        check(is_number(self.t_end) and 0 < self.t_end <= self.t_start, "annealing.t_end", self.t_end,
              "a finite number > 0 and <= annealing.t_start")

    def temperatures(self) -> torch.Tensor:
        """(sweeps,) float64 geometric schedule from ``t_start`` to ``t_end``."""
        if self.sweeps == 1:
            return torch.tensor([float(self.t_end)], dtype=torch.float64)
        ratio = torch.arange(self.sweeps, dtype=torch.float64) / (self.sweeps - 1)
        return self.t_start * (self.t_end / self.t_start) ** ratio


def qubo_energy(q: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(N,) energies ``h_n^T Q_n h_n + c_n^T h_n`` of codes ``h`` (N, k), in ``q``'s dtype.

    Example:
        >>> qubo_energy(torch.eye(2)[None], torch.tensor([[-3.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([-2.])
    """
    h = h.to(q.dtype)
    return (torch.bmm(q, h.unsqueeze(2)).squeeze(2) * h).sum(1) + (c * h).sum(1)


def all_codes(bits: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """(2^bits, bits) every binary code; row r holds the bits of r, least significant first.

    Example:
        >>> all_codes(2).int().tolist()
        [[0, 0], [1, 0], [0, 1], [1, 1]]
    """
    numbers = torch.arange(1 << bits, device=device)
    return ((numbers[:, None] >> torch.arange(bits, device=device)) & 1).to(dtype)


def enumerate_qubo(q: torch.Tensor, c: torch.Tensor, max_elements: int = ENUMERATION_ELEMENTS) -> torch.Tensor:
    """Exact minimisers (N, k) of N QUBO problems by evaluating all ``2^k`` codes (the first minimum on ties).

    Args:
        q: (N, k, k) symmetric matrices.
        c: (N, k) linear terms.
        max_elements: energies computed at once; items are processed in chunks of ``max_elements // 2^k``.

    Returns:
        (N, k) codes in ``q``'s dtype.

    Example:
        >>> q = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])
        >>> enumerate_qubo(q, torch.tensor([[-3.0, -2.5]]))  # 11 costs 6 - 5.5; 10 costs -2
        tensor([[1., 0.]])
    """
    n, k = c.shape
    low_bits = k // 2
    low, high = (all_codes(b, q.dtype, q.device) for b in (low_bits, k - low_bits))
    out = torch.empty(n, k, dtype=q.dtype, device=q.device)
    chunk = max(1, max_elements >> k)
    for lo in range(0, n, chunk):
        qc, cc = q[lo:lo + chunk], c[lo:lo + chunk]
        q_ll, q_lh, q_hh = qc[:, :low_bits, :low_bits], qc[:, :low_bits, low_bits:], qc[:, low_bits:, low_bits:]
        e_low = _table_energies(low, q_ll, cc[:, :low_bits])  # (C, 2^low)
        e_high = _table_energies(high, q_hh, cc[:, low_bits:])  # (C, 2^high)
        cross = torch.matmul(torch.matmul(low, q_lh), high.T)  # (C, 2^low, 2^high): a^T Q_lh b
        energies = cross.mul_(2).add_(e_low.unsqueeze(2)).add_(e_high.unsqueeze(1))
        best = energies.flatten(1).argmin(1)
        out[lo:lo + chunk, :low_bits] = low[best // high.shape[0]]
        out[lo:lo + chunk, low_bits:] = high[best % high.shape[0]]
    return out


def _table_energies(codes: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(C, M) energies of the M ``codes`` (M, b) under C problems ``q`` (C, b, b), ``c`` (C, b)."""
    return (torch.matmul(codes, q) * codes).sum(2) + c @ codes.T


def _flip_gain(h: torch.Tensor, field: torch.Tensor, c: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """Energy change of flipping each bit, (N, k): ``(1 - 2 h_j) (2 f_j + c_j) + Q_jj``."""
    return (1 - 2 * h) * (2 * field + c) + diag


def energy_scale(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N,) the energy scale of each problem, ``mean_j (sum_l |Q_jl| + |c_j|)``: the size of a single-flip energy
    change (at most ``2 sum_l |Q_jl| + |c_j|`` for bit j) and the unit of the annealing temperatures, so one
    schedule fits problems of any magnitude. It does not depend on the state (a scale measured at the start
    state misjudged shallow local minima)."""
    return (q.abs().sum(2) + c.abs()).mean(1).clamp_min(torch.finfo(q.dtype).tiny)


def anneal_qubo(q: torch.Tensor, c: torch.Tensor, h: torch.Tensor, annealing: Annealing,
                generator: torch.Generator) -> torch.Tensor:
    """Simulated annealing from ``h`` on N problems at once; returns the best codes (N, k) seen.

    Each sweep visits the bits in order. At bit ``j`` every item proposes flipping it and accepts
    when the energy change ``dE <= 0`` or with probability ``exp(-dE / T_n)``, where ``T_n`` is the
    sweep's temperature times the item's :func:`energy_scale`. The best state of each item
    (among the start and the state after every sweep) is kept.

    Args:
        q: (N, k, k) symmetric matrices.
        c: (N, k) linear terms.
        h: (N, k) start codes (0/1, any dtype); not modified.
        annealing: the schedule.
        generator: a seeded generator on ``q``'s device (the Metropolis draws).

    Returns:
        (N, k) codes in ``q``'s dtype.

    Example:
        >>> q = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)
        >>> g = torch.Generator().manual_seed(0)
        >>> anneal_qubo(q, torch.tensor([[-3.0, -2.5]], dtype=torch.float64), torch.ones(1, 2), Annealing(), g)
        tensor([[1., 0.]], dtype=torch.float64)
    """
    h = h.to(q.dtype)
    best, best_energy = h.clone(), qubo_energy(q, c, h)
    scale = energy_scale(q, c)
    # bit-major layouts, so that bit j of all items is one contiguous row: h_t[j], field[j] (N,), q_t[j] (k, N)
    q_t = q.permute(1, 2, 0).contiguous()
    diag = q.diagonal(dim1=1, dim2=2).T.contiguous()
    h_t = h.T.contiguous()
    field = (2 * torch.bmm(q, h.unsqueeze(2)).squeeze(2) + c).T.contiguous()  # 2 Q h + c; gain = d field_j + Q_jj
    for temperature in annealing.temperatures().tolist():
        # Metropolis: accept when u < exp(-gain / T), i.e. gain < -T log u, with u uniform in [0, 1)
        uniform = torch.rand(h_t.shape, generator=generator, dtype=q.dtype, device=q.device)
        threshold = uniform.log_().neg_().mul_(temperature * scale)
        for j in range(h_t.shape[0]):
            d = 1 - 2 * h_t[j]
            step = d * ((d * field[j] + diag[j]) < threshold[j])
            h_t[j] += step
            field.addcmul_(q_t[j], step, value=2.0)
        h = h_t.T
        energy = ((field + c.T) * h_t).sum(0) / 2  # h.(2 Q h + c) + c.h = 2 E
        better = energy < best_energy
        best = torch.where(better.unsqueeze(1), h, best)
        best_energy = torch.where(better, energy, best_energy)
    return best


def greedy_descent(q: torch.Tensor, c: torch.Tensor, h: torch.Tensor, max_steps: int | None = None) -> torch.Tensor:
    """Steepest single-bit-flip descent from ``h`` on N problems at once; returns local minima (N, k).

    At every step each item flips its bit of most negative energy change, if that change is below
    ``-1e-12`` times the item's energy scale; items with no such bit stop. The energy of every item
    falls with every flip, so it never ends above the start.

    Args:
        q: (N, k, k) symmetric matrices.
        c: (N, k) linear terms.
        h: (N, k) start codes (0/1, any dtype); not modified.
        max_steps: flips per item at most (default 4 k; descent usually stops far earlier).

    Returns:
        (N, k) codes in ``q``'s dtype.

    Example:
        >>> q = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])
        >>> greedy_descent(q, torch.tensor([[-3.0, -2.5]]), torch.zeros(1, 2))
        tensor([[1., 0.]])
    """
    h = h.to(q.dtype).clone()
    n, k = h.shape
    diag = q.diagonal(dim1=1, dim2=2)
    field = torch.bmm(q, h.unsqueeze(2)).squeeze(2)
    tolerance = 1e-12 * energy_scale(q, c)
    rows = torch.arange(n, device=q.device)
    for _ in range(4 * k if max_steps is None else max_steps):
        gain, bit = _flip_gain(h, field, c, diag).min(1)
        move = gain < -tolerance
        if not bool(move.any()):
            break
        rows_moved, bits_moved = rows[move], bit[move]
        d = 1 - 2 * h[rows_moved, bits_moved]
        h[rows_moved, bits_moved] += d
        field[rows_moved] += d.unsqueeze(1) * q[rows_moved, bits_moved]
    return h


def solve_qubo(q: torch.Tensor, c: torch.Tensor, h: torch.Tensor, method: str = "auto",
               annealing: Annealing | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Better codes (N, k) for N problems: the chosen solver's result where it is strictly better than ``h``.

    Args:
        q: (N, k, k) symmetric matrices (float64 recommended: the old/new comparison is done in this dtype).
        c: (N, k) linear terms.
        h: (N, k) current codes (0/1).
        method: ``"enumerate"`` (exact, k <= 20), ``"anneal"`` (annealing, then greedy descent from its
            result), ``"greedy"`` (descent from ``h``), or ``"auto"`` (enumerate for k <= 12, else anneal).
        annealing: schedule of ``"anneal"`` (default :class:`Annealing`).
        generator: seeded generator of ``"anneal"`` on ``q``'s device (default: seed 0).

    Returns:
        (N, k) codes in ``q``'s dtype; per item never of higher energy than ``h``.

    Example:
        >>> q = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)
        >>> solve_qubo(q, torch.tensor([[-3.0, -2.5]], dtype=torch.float64), torch.ones(1, 2))
        tensor([[1., 0.]], dtype=torch.float64)
    """
    k = h.shape[1]
    if method not in METHODS:
        raise ConfigError(f"solve_qubo: method={method!r}, expected one of {list(METHODS)}")
    if method == "auto":
        method = "enumerate" if k <= AUTO_ENUMERATION_BITS else "anneal"
    if method == "enumerate" and k > MAX_ENUMERATION_BITS:
        raise ConfigError(f"solve_qubo: enumerating 2^{k} codes per item; use it for k <= {MAX_ENUMERATION_BITS}")
    h = h.to(q.dtype)
    if method == "enumerate":
        new = enumerate_qubo(q, c)
    elif method == "greedy":
        new = greedy_descent(q, c, h)
    else:
        if generator is None:
            generator = torch.Generator(device=q.device).manual_seed(0)
        # annealing streams Q once per sweep: float32 halves that; the greedy polish and the comparison stay in q's dtype
        fast = torch.float32 if q.dtype == torch.float64 else q.dtype
        new = anneal_qubo(q.to(fast), c.to(fast), h, annealing or Annealing(), generator)
        new = greedy_descent(q, c, new.to(q.dtype))
    better = qubo_energy(q, c, new) < qubo_energy(q, c, h)
    return torch.where(better.unsqueeze(1), new, h)
