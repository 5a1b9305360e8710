"""The embedding collection: table specs in, one D-dimensional vector per feature out.

It builds each spec's compression method, gathers every method's plain tables into one
TorchRec ``EmbeddingBagCollection`` (methods whose combiner commutes with pooling) and one
``EmbeddingCollection`` (the others, and unpooled tables), so the planner can shard all of
them and FBGEMM's kernels run them. Models never see which method is in use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.embeddings.base import Compression, Method, PlainTable
from recsys.embeddings.budget import split_budget, with_budget
from recsys.embeddings.full import Full
from recsys.embeddings.memory import table_memory
from recsys.embeddings.spec import TableSpec, TableStats
from recsys.errors import ConfigError


@dataclass
class EmbeddingSettings:
    """Which compression each table uses (``conf/embedding/``).

    Args:
        default: the compression of every table not listed in ``tables``.
        tables: per-table overrides, by table name.
        init_scale: plain-table rows start uniform in ±init_scale / sqrt(their dim) (``Method.init_fn``; tensor-train
            cores start Gaussian, scaled so their product does).
        total_budget: the fraction of all the collection's full table bytes its tables may use together
            (None: each method's own budget). The tables stored as ``default`` with at least ``full_below_rows``
            rows share what the others (kept full, or listed in ``tables``) leave, split by
            ``recsys.embeddings.budget.split_budget``.
        full_below_rows: with ``total_budget``, ``default`` tables of fewer rows are kept full (their bytes count
            against the total); 0 = no threshold. Tables listed in ``tables`` keep their method. Ignored without
            ``total_budget``.
    """

    default: Compression = field(default_factory=Full)
    tables: dict[str, Compression] = field(default_factory=dict)
    init_scale: float = 0.1
    total_budget: float | None = None
    full_below_rows: int = 1000

    def __post_init__(self):
        if self.total_budget is not None and (isinstance(self.total_budget, bool) or not isinstance(
                self.total_budget, (int, float)) or not 0 < self.total_budget <= 1):
            raise ConfigError(f"embedding.total_budget must be a fraction in (0, 1] of the full tables' bytes, "
                              f"got {self.total_budget!r}")
        if isinstance(self.full_below_rows, bool) or not isinstance(self.full_below_rows, int) \
                or self.full_below_rows < 0:
            raise ConfigError(f"embedding.full_below_rows must be an integer >= 0 (a number of rows; 0 = no "
                              f"threshold), got {self.full_below_rows!r}")

    def compression(self, table: str) -> Compression:
        return self.tables.get(table, self.default)


def _pooled(spec: TableSpec, method: Method) -> bool:
    return spec.pooling != "none" and method.additive


class CompressedEmbeddings(nn.Module):
    """Looks up every feature of a KeyedJaggedTensor through its (compressed) table.

    Args:
        specs: the logical tables; each feature is read by exactly one table.
        settings: compression per table (default: full tables).
        stats: per-table id statistics (frequencies, clusters) for methods that need them.
        device: where the plain tables are created (``meta`` to let DMP materialise them).

    Example:
        >>> emb = CompressedEmbeddings([TableSpec("item", 100, 8, ("item",))])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([1, 2, 3]), torch.tensor([2, 1]))
        >>> emb(kjt)["item"].shape
        torch.Size([2, 8])
    """

    def __init__(self, specs: Sequence[TableSpec], settings: EmbeddingSettings | None = None,
                 stats: Mapping[str, TableStats] | None = None, device: torch.device | None = None):
        super().__init__()
        settings, stats = settings or EmbeddingSettings(), stats or {}
        self.specs = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ConfigError(f"duplicate table name '{spec.name}'")
            self.specs[spec.name] = spec
        readers = [f for s in specs for f in s.feature_names]
        if len(set(readers)) != len(readers):
            raise ConfigError(f"a feature is read by more than one table: {sorted(readers)}")
        unknown = set(settings.tables) - set(self.specs)
        if unknown:
            raise ConfigError(f"embedding.tables names unknown tables {sorted(unknown)}; tables are {sorted(self.specs)}")
        methods, self.compressions = _build_methods(specs, settings, stats)  # compressions: each table's, as sized
        self.methods = nn.ModuleDict(methods)
        bag_configs, seq_configs = [], []
        for spec in specs:
            method = self.methods[spec.name]
            streams, initial = method.stream_tables(), method.initial_weights()
            for index, table in enumerate(method.plain_tables()):
                features = [f"{f}__{s}" for f in spec.feature_names for s, t in enumerate(streams) if t == index]
                bound = settings.init_scale / table.dim**0.5
                init_fn = (_copy_init(spec.name, table, initial[table.suffix]) if table.suffix in initial
                           else method.init_fn(table, settings.init_scale))
                common = dict(name=f"{spec.name}__{table.suffix}", num_embeddings=table.rows, embedding_dim=table.dim,
                              feature_names=features, weight_init_min=-bound, weight_init_max=bound, init_fn=init_fn)
                if _pooled(spec, method):
                    bag_configs.append(EmbeddingBagConfig(**common))
                else:
                    seq_configs.append(EmbeddingConfig(**common))
        self.bags = EmbeddingBagCollection(bag_configs, device=device) if bag_configs else None
        by_dim: dict[str, list[EmbeddingConfig]] = {}  # TorchRec's EmbeddingCollection needs one dim
        for config in seq_configs:
            by_dim.setdefault(f"dim{config.embedding_dim}", []).append(config)
        self.sequences = nn.ModuleDict({d: EmbeddingCollection(c, device=device) for d, c in by_dim.items()})
        self._bag_keys = [f for c in bag_configs for f in c.feature_names]
        self._seq_keys = {d: [f for c in configs for f in c.feature_names] for d, configs in by_dim.items()}

    def lookups(self) -> list[nn.Module]:
        """The TorchRec modules holding the plain tables: ``bags`` and one ``sequences`` module per dim."""
        return [m for m in (self.bags, *self.sequences.values()) if m is not None]

    def plain_weight(self, table: str) -> torch.Tensor:
        """The rows of plain table ``table`` (e.g. ``item__hashed``) of an unsharded collection."""
        for module in self.lookups():
            tables = getattr(module, "embedding_bags", None) or getattr(module, "embeddings", None)
            if isinstance(tables, nn.ModuleDict) and table in tables:  # TorchRec's float modules: no state_dict()
                return tables[table].weight.detach()
            for key, value in module.state_dict().items():  # quantized modules keep their rows elsewhere
                if key.endswith(f".{table}.weight"):
                    return value
        raise ConfigError(f"no plain table '{table}'")

    @torch.no_grad()
    def vectors(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """(n, D) vectors of single ids of logical table ``table``, what a forward of one-id bags returns: decoded
        from float tables directly (``Method.decode``, no KeyedJaggedTensor), looked up through the modules for
        quantized ones.

        Example:
            >>> emb = CompressedEmbeddings([TableSpec("item", 100, 8, ("item",))])
            >>> emb.vectors("item", torch.tensor([3, 5])).shape
            torch.Size([2, 8])
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        weights = self._float_rows(table)
        if weights is not None:
            return self.methods[table].decode(ids, weights)
        feature = self.specs[table].feature_names[0]
        return self(KeyedJaggedTensor.from_lengths_sync([feature], ids, torch.ones(len(ids), dtype=torch.int32)))[
            feature].float()

    @torch.no_grad()
    def item_scores(self, table: str, queries: torch.Tensor, chunk: int = 65536) -> Iterator[tuple[int, torch.Tensor]]:
        """Inner products of (B, D) ``queries`` with every row of logical table ``table``, from the tables as stored
        (``Method.item_scores``): yields ``(start, (B, n) scores)`` for consecutive chunks of ids. Quantized tables
        (int8/int4/fp16 rows) are looked up and scored chunk by chunk.

        Example:
            >>> emb = CompressedEmbeddings([TableSpec("item", 100, 8, ("item",))])
            >>> torch.cat([s for _, s in emb.item_scores("item", torch.ones(2, 8), chunk=30)], dim=1).shape
            torch.Size([2, 100])
        """
        weights = self._float_rows(table)
        if weights is not None:
            yield from self.methods[table].item_scores(queries.to(weights[0].dtype), weights, chunk)
            return
        n = self.specs[table].num_embeddings
        for start in range(0, n, chunk):
            yield start, queries @ self.vectors(table, torch.arange(start, min(start + chunk, n))).T

    def _float_rows(self, table: str) -> list[torch.Tensor] | None:
        """The rows of logical table ``table``'s plain tables when they are float32/float64 (a method computes
        from them directly), None for quantized (int8, int4, fp16) rows, which only the modules read."""
        weights = [self.plain_weight(f"{table}__{t.suffix}") for t in self.methods[table].plain_tables()]
        return weights if all(w.dtype.is_floating_point and w.dtype != torch.float16 for w in weights) else None

    @property
    def feature_names(self) -> list[str]:
        return [f for s in self.specs.values() for f in s.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor | JaggedTensor]:
        """features (keys ⊆ feature_names, stride B) -> {feature: (B, D)} or, for unpooled
        tables, {feature: JaggedTensor of (n_ids, D)}."""
        inputs = features.to_dict()
        streams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        plan = []
        for spec in self.specs.values():
            method = self.methods[spec.name]
            for feature in spec.feature_names:
                if feature not in inputs:
                    continue
                ids, lengths = inputs[feature].values(), inputs[feature].lengths()
                kept = []
                for s, stream in enumerate(method.transform(ids)):
                    valid = stream >= 0
                    streams[f"{feature}__{s}"] = (stream[valid], _segment_count(valid, lengths))
                    kept.append(valid)
                plan.append((spec, method, feature, ids, lengths, kept))
        stride = features.stride()
        bags = self._lookup(self.bags, self._bag_keys, streams, stride)
        sequences = {}
        for name, module in self.sequences.items():
            sequences |= self._lookup(module, self._seq_keys[name], streams, stride)
        out = {}
        for spec, method, feature, ids, lengths, kept in plan:
            keys = [f"{feature}__{s}" for s in range(len(kept))]
            if _pooled(spec, method):
                vector = method.combine([bags[k] for k in keys], None)
            else:
                parts = [_scatter(sequences[k].values(), valid) for k, valid in zip(keys, kept)]
                per_id = method.combine(parts, ids)
                if spec.pooling == "none":
                    out[feature] = JaggedTensor(values=per_id, lengths=lengths)
                    continue
                vector = per_id if bool((lengths == 1).all()) else torch.segment_reduce(per_id, "sum", lengths=lengths)
            if spec.pooling == "mean":
                vector = vector / lengths.clamp(min=1).unsqueeze(1).to(vector.dtype)
            out[feature] = vector
        return out

    @staticmethod
    def _lookup(module, keys: list[str], streams: dict, stride: int) -> dict:
        """Runs a TorchRec collection on the streams it owns (absent features get empty bags)."""
        if module is None:
            return {}
        empty = (torch.empty(0, dtype=torch.int64), torch.zeros(stride, dtype=torch.int32))
        values, lengths = zip(*(streams.get(k, empty) for k in keys))
        kjt = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths).int())
        result = module(kjt)
        return result.to_dict() if hasattr(result, "to_dict") else result

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the methods' auxiliary losses from the last forward (None when there are none)."""
        losses = [loss for m in self.methods.values() if (loss := m.auxiliary_loss()) is not None]
        return torch.stack(losses).sum() if losses else None

    def memory_parts(self) -> dict[str, int]:
        """Bytes of every stored tensor, as ``<table>/plain/<plain table>``, ``<table>/buffer/<name>``
        (id maps, codes) and ``<table>/parameter/<name>`` (combiners), measured from the tensors."""
        parts = {f"{t.split('__')[0]}/plain/{t}": b for t, b in table_memory(self).items()}
        for name, method in self.methods.items():
            parts |= {f"{name}/{part}": b for part, b in method.extra_memory_parts().items()}
        return parts

    def memory(self) -> dict[str, int]:
        """Bytes per logical table: its plain tables plus the method's id maps, codes and combiner."""
        totals = dict.fromkeys(self.specs, 0)
        for part, b in self.memory_parts().items():
            totals[part.split("/")[0]] += b
        return totals

    def layout(self) -> dict[str, dict]:
        """Per logical table: the compression it got (``method``: its class; ``budget``: the fraction of the full
        table it was sized to, None for a method without one, e.g. Full), its measured ``bytes`` (``memory()``) and
        its ``full_bytes``.

        Example:
            >>> CompressedEmbeddings([TableSpec("item", 100, 8, ("item",))]).layout()
            {'item': {'method': 'Full', 'budget': None, 'bytes': 3200, 'full_bytes': 3200}}
        """
        memory = self.memory()
        return {name: {"method": type(self.compressions[name]).__name__,
                       "budget": getattr(self.compressions[name], "budget", None), "bytes": memory[name],
                       "full_bytes": spec.full_bytes} for name, spec in self.specs.items()}


def served_form(collection: CompressedEmbeddings, settings: EmbeddingSettings, state: Mapping[str, torch.Tensor],
                prefix: str = "") -> tuple[EmbeddingSettings, dict[str, torch.Tensor]]:
    """A trained collection as it is served: each table whose method has a smaller inference form
    (``Method.exported``, e.g. differentiable VQ -> PQ codes and codebooks without the query table) is replaced by it.

    Args:
        collection: the trained collection (its methods; its plain tables may be sharded).
        settings: the settings it was built from.
        state: an unsharded state dict holding the collection's tensors under ``prefix``.
        prefix: where the collection sits in ``state`` (e.g. ``model.embeddings.``).

    Returns:
        The settings that build the served collection (replaced tables pinned in ``tables``, in their stored form)
        and ``state`` with the replaced tables' tensors swapped for the served ones.
    """
    tables, state = dict(settings.tables), dict(state)
    for name, method in collection.methods.items():
        owned = [k for k in state if k.startswith(prefix) and (k.startswith(f"{prefix}methods.{name}.")
                                                                or f".{name}__" in k[len(prefix):])]
        weights = [state[_plain_key(owned, name, t.suffix)] for t in method.plain_tables()]
        form = method.exported(weights)
        if form is None:
            continue
        served = CompressedEmbeddings([replace(collection.specs[name], compression=None)],
                                      EmbeddingSettings(form, init_scale=settings.init_scale))
        for key in owned:
            del state[key]
        state |= {f"{prefix}{k}": v for k, v in served.state_dict().items()}
        tables[name] = form.stored()
    return replace(settings, tables=tables), state


def _plain_key(keys: list[str], table: str, suffix: str) -> str:
    found = [k for k in keys if k.endswith(f".{table}__{suffix}.weight")]
    if len(found) != 1:
        raise ConfigError(f"the state holds {len(found)} tensors of plain table '{table}__{suffix}', expected one")
    return found[0]


def _build_methods(specs: Sequence[TableSpec], settings: EmbeddingSettings, stats: Mapping[str, TableStats]
                   ) -> tuple[dict[str, Method], dict[str, Compression]]:
    """Each spec's method and the compression it was built from, in spec order. With ``settings.total_budget``, the
    ``default`` tables under ``settings.full_below_rows`` rows are kept full and the other ``default`` tables are
    sized to share what all the rest leave of it."""
    budgeted = [s for s in specs if settings.total_budget is not None and s.compression is None
                and s.name not in settings.tables]
    small = {s.name for s in budgeted if s.num_embeddings < settings.full_below_rows}
    shared = {s.name for s in budgeted} - small
    compressions = {s.name: Full() if s.name in small else s.compression or settings.compression(s.name)
                    for s in specs if s.name not in shared}
    methods = {name: compressions[name].build(s, stats.get(name)) for s in specs if (name := s.name) in compressions}
    if budgeted:
        allowed = math.floor(settings.total_budget * sum(s.full_bytes for s in specs))
        kept = {s.name: methods[s.name].budget_bytes() for s in budgeted if s.name in small}
        if sum(kept.values()) > allowed:
            listed = ", ".join(f"{name} ({size} bytes)" for name, size in kept.items())
            raise ConfigError(f"embedding.total_budget={settings.total_budget} allows {allowed} bytes for all tables, "
                              f"but the tables under embedding.full_below_rows={settings.full_below_rows} rows, kept "
                              f"full, need {sum(kept.values())} bytes alone: {listed}; raise total_budget or lower "
                              "full_below_rows (0: no threshold)")
    if shared:
        available = allowed - sum(m.budget_bytes() for m in methods.values())
        sized = [s for s in specs if s.name in shared]
        budgets = split_budget(settings.default, sized, available, stats)
        for spec in sized:
            compressions[spec.name] = with_budget(settings.default, budgets[spec.name])
            methods[spec.name] = compressions[spec.name].build(spec, stats.get(spec.name))
    return {s.name: methods[s.name] for s in specs}, {s.name: compressions[s.name] for s in specs}


def _copy_init(name: str, table: PlainTable, rows: torch.Tensor):
    """An ``init_fn`` that copies a method's initial rows into its plain table, also when DMP
    materialises it: a rank holding the whole table copies it, a rank holding none skips; row or
    column shards cannot tell their offsets, so they are refused."""
    if tuple(rows.shape) != (table.rows, table.dim):
        raise ConfigError(f"table '{name}': initial weights of plain table '{table.suffix}' have shape "
                          f"{tuple(rows.shape)}, expected ({table.rows}, {table.dim})")

    def init(weight: torch.Tensor) -> torch.Tensor:
        if weight.numel() == 0:
            return weight
        if tuple(weight.shape) != tuple(rows.shape):
            raise ConfigError(f"table '{name}__{table.suffix}' starts from given weights, so it must be sharded "
                              f"whole (table_wise or data_parallel); this rank holds a {tuple(weight.shape)} shard")
        with torch.no_grad():
            return weight.copy_(rows.to(weight.device, weight.dtype))

    return init


def _segment_count(valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-bag count of valid ids: (B,) from an (n,) mask and (B,) bag lengths."""
    if bool(valid.all()):
        return lengths
    bag = torch.repeat_interleave(torch.arange(len(lengths), device=valid.device), lengths)
    return torch.zeros_like(lengths).index_add_(0, bag, valid.to(lengths.dtype))


def _scatter(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(n_valid, d) vectors -> (n, d) with zeros where the stream had no lookup."""
    if values.shape[0] == valid.shape[0]:
        return values
    return values.new_zeros(valid.shape[0], values.shape[1]).index_put_((valid.nonzero().squeeze(1),), values)
