"""Models rebuilt from their packages for inference: top-K recommendations, similar items, CTR scores.

``load(path)`` returns a ``Recommender`` (MF, ALS, EASE, NBMF, ComiRec) or a ``CTRScorer`` (DLRM, DCNv2,
DeepFM). Neither needs the training data: vocabularies, histories and id statistics come from the package.

Recommending: a known user is scored by the model (``source="model"``); a user the model has not seen is
scored from the recent items given for them (``history``: MF/ALS/NBMF average those items' vectors, ComiRec
extracts interests from them, EASE multiplies them by B); with no usable items it gets the most popular
items (``popularity``). Vector models (MF, ALS, ComiRec) retrieve through a FAISS index (exact inner product
by default, any ``index_factory`` string); EASE and NBMF score every item with their own weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torchrec import KeyedJaggedTensor

from recsys.data.batching import CTRBatcher, jagged
from recsys.data.prepare import transform_dense
from recsys.data.schemas import ITEM, LABEL, USER, CTRSchema
from recsys.data.vocab import Vocabulary
from recsys.embeddings.collection import CompressedEmbeddings
from recsys.embeddings.memory import tensor_bytes
from recsys.embeddings.serving_quantization import quantize_tables
from recsys.errors import ConfigError, DataError
from recsys.inference.package import META, Package, from_config, stats_from
from recsys.models.ease import _csr
from recsys.models.mf import MatrixFactorization, mf_specs
from recsys.models.multi_interest import HISTORY, MultiInterest, multi_interest_specs
from recsys.models.nbmf import unpack_codes
from recsys.retrieval import ItemIndex, multi_interest_retrieve
from recsys.retrieval.exact import top_k

SOURCES = ("model", "history", "popularity")
SCORE_BLOCK = 1 << 22  # scores per block of exact top-k over stored tables (16 MiB of float32)
CTR_BUILD = {"dim", "first_order", "multi_valued_pooling", "compress_min_rows"}  # ctr_network's plain arguments


@dataclass
class Recommendations:
    """Top items of one query: raw item ids, scores (best first) and where they came from (``SOURCES``)."""

    items: np.ndarray
    scores: np.ndarray
    source: str


class Recommender:
    """A ranking model from its package. Item index 0 (OOV) is never recommended.

    Args:
        package: the loaded package.
        index: FAISS ``index_factory`` string of the item index of vector models (``Flat`` = exact).
    """

    family = ""
    uses_index = True  # retrieve through FAISS over item_vectors (False: score every item with the model)

    def __init__(self, package: Package, index: str = "Flat"):
        self.users, self.items = package.vocabulary(USER), package.vocabulary(ITEM)
        self.n_items = len(self.items)
        t = package.tensors
        self._history = _item_lists(t, "history")
        self._exclude = _item_lists(t, "exclude") if "exclude.indptr" in t else self._history
        self.popularity = t["popularity"].float().numpy()
        self.index_factory = index
        self.index = None

    def memory(self) -> dict[str, int]:
        """Bytes the loaded model holds, by attribute (``held_bytes``)."""
        return held_bytes(self)

    # ------------------------------------------------------------------ ids
    def user_index(self, raw) -> np.ndarray:
        """Raw user ids -> indices, -1 for users the model has not seen."""
        return lookup(self.users, raw, missing="negative")

    def item_index(self, raw) -> np.ndarray:
        """Raw item ids -> indices, -1 for unknown items."""
        return lookup(self.items, raw, missing="negative")

    def history(self, user: int) -> np.ndarray:
        """A known user's training items in time order (item indices)."""
        indptr, items = self._history
        return items[indptr[user]:indptr[user + 1]]

    def excluded(self, user: int) -> np.ndarray:
        """Item indices a known user already interacted with (training and validation splits)."""
        indptr, items = self._exclude
        return items[indptr[user]:indptr[user + 1]]

    # ------------------------------------------------------------------ what each family implements
    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) known user indices -> (B, N) scores of every item."""
        return self._dense(self.queries(users))

    def score_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        """B lists of item indices (most recent last) -> (B, N) scores, for users the model has not seen."""
        return self._dense(self.history_queries(histories))

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) known users -> (B, K, D) query vectors (vector models)."""
        raise ConfigError(f"{self.family} has no query vectors")

    def history_queries(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(B, K, D) queries of users given by their items (vector models): the mean of the items' vectors."""
        vectors = self.item_vectors()
        return torch.stack([vectors[torch.as_tensor(h, dtype=torch.long)].mean(0) for h in histories]).unsqueeze(1)

    def item_vectors(self) -> torch.Tensor:
        """(N, D) item vectors (row 0 = OOV), for retrieval and similar items."""
        raise ConfigError(f"{self.family} has no item vectors")

    def similar_scores(self, items: np.ndarray) -> torch.Tensor:
        """(B,) item indices -> (B, N) similarity to every item (inner product of item vectors by default)."""
        vectors = self.item_vectors()
        return vectors[torch.as_tensor(items, dtype=torch.long)] @ vectors.T

    def _dense(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkd,nd->bkn", queries, self.item_vectors()).max(1).values

    # ------------------------------------------------------------------ retrieval
    def _item_index(self) -> ItemIndex:
        if self.index is None:
            self.index = ItemIndex(self.item_vectors()[1:].numpy(), ids=np.arange(1, self.n_items), factory=self.index_factory)
        return self.index

    def recommend(self, users: np.ndarray, k: int, histories: list[np.ndarray | None] | None = None,
                  exclude_seen: bool = True, allowed: np.ndarray | None = None,
                  excluded: np.ndarray | None = None) -> list[Recommendations]:
        """Top-``k`` items for each query.

        Args:
            users: (B,) user indices, -1 for users the model has not seen.
            k: items per query.
            histories: per query, item indices of recent items (used for unseen users), or None.
            exclude_seen: leave out a known user's training and validation items (and an unseen user's given items).
            allowed: item indices to choose from (None: every item).
            excluded: item indices never to return.
        """
        histories = histories if histories is not None else [None] * len(users)
        plan = []  # (row, source, history)
        for row, (user, history) in enumerate(zip(users, histories)):
            history = None if history is None else np.asarray(history, dtype=np.int64)
            history = None if history is None else history[history > 0]
            if user >= 0:
                plan.append((row, "model", self.history(user)))
            elif history is not None and len(history):
                plan.append((row, "history", history))
            else:
                plan.append((row, "popularity", np.empty(0, dtype=np.int64)))
        out: list[Recommendations | None] = [None] * len(users)
        for source in SOURCES:
            rows = [(row, h) for row, s, h in plan if s == source]
            if not rows:
                continue
            skip = [self._skip(users[row], h, exclude_seen, excluded) for row, h in rows]
            found = self._top(source, [users[row] for row, _ in rows], [h for _, h in rows], k, skip, allowed)
            for (row, _), (items, scores) in zip(rows, found):
                out[row] = Recommendations(self.items.raw(items) if len(items) else items, scores, source)
        return out

    def _skip(self, user: int, history: np.ndarray, exclude_seen: bool, excluded: np.ndarray | None) -> np.ndarray:
        parts = [np.zeros(1, dtype=np.int64)]  # OOV
        if exclude_seen:
            parts.append(self.excluded(user) if user >= 0 else history)
        if excluded is not None:
            parts.append(np.asarray(excluded, dtype=np.int64))
        return np.unique(np.concatenate(parts))

    def _top(self, source: str, users: list[int], histories: list[np.ndarray], k: int, skip: list[np.ndarray],
             allowed: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        if source != "popularity" and self.uses_index and allowed is None:
            queries = self.queries(torch.as_tensor(users)) if source == "model" else self.history_queries(histories)
            return self._search(queries.numpy(), k, skip)
        if source == "model":
            scores = self.score_users(torch.as_tensor(users)).double()
        elif source == "history":
            scores = self.score_histories(histories).double()
        else:
            scores = torch.from_numpy(self.popularity).double().expand(len(users), -1).clone()
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if allowed is not None:
            mask[:] = True
            mask[:, torch.as_tensor(allowed, dtype=torch.long)] = False
        for row, items in enumerate(skip):
            mask[row, torch.as_tensor(items, dtype=torch.long)] = True
        scores = scores.masked_fill(mask, -torch.inf)
        values, items = scores.topk(min(k, scores.shape[1]), dim=1)
        kept = torch.isfinite(values)
        return [(items[r][kept[r]].numpy(), values[r][kept[r]].float().numpy()) for r in range(len(users))]

    def _search(self, queries: np.ndarray, k: int, skip: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-``k`` of each query outside its ``skip`` items. A row is exact once ``k + len(skip)`` candidates are
        searched; the batch searches enough for 90% of its rows, and the rest (heavy users) again with their own."""
        index = self._item_index()
        needed = np.minimum(len(index), k + np.array([len(s) for s in skip]))
        results: list = [None] * len(queries)
        rows = np.arange(len(queries))
        n = int(min(needed.max(), max(k, np.percentile(needed, 90))))
        while len(rows):
            scores, ids = self._candidates(queries[rows], index, n)
            short = []
            for position, row in enumerate(rows):
                keep = (ids[position] > 0) & ~np.isin(ids[position], skip[row])
                if keep.sum() < k and n < needed[row]:
                    short.append(row)  # its skip items filled the candidates: search it deeper
                    continue
                results[row] = (ids[position][keep][:k], scores[position][keep][:k].astype(np.float32))
            rows = np.array(short, dtype=np.int64)
            n = int(needed[rows].max()) if len(rows) else n
        return results

    @staticmethod
    def _candidates(queries: np.ndarray, index: ItemIndex, n: int) -> tuple[np.ndarray, np.ndarray]:
        if queries.shape[1] == 1:
            return index.search(queries[:, 0], n)
        found = multi_interest_retrieve(queries, index, n)
        return found.scores, found.ids

    def similar(self, item: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items most similar to item index ``item`` (itself and OOV left out): raw ids and scores."""
        if self.uses_index:
            index = self._item_index()
            scores, ids = index.search(index.vectors_of(np.array([item])), min(len(index), k + 1))
            keep = (ids[0] > 0) & (ids[0] != item)
            items, values = ids[0][keep][:k], scores[0][keep][:k]
        else:
            scores = self.similar_scores(np.array([item])).double()[0]
            scores[[0, item]] = -torch.inf
            values, items = scores.topk(min(k, len(scores)))
            kept = torch.isfinite(values)
            items, values = items[kept].numpy(), values[kept].float().numpy()
        return (self.items.raw(items) if len(items) else items), values.astype(np.float32)


def _item_lists(tensors: dict[str, torch.Tensor], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A CSR list of item lists (``<name>.indptr``, ``<name>.indices``), its item indices held as int32."""
    return tensors[f"{name}.indptr"].numpy(), tensors[f"{name}.indices"].to(torch.int32).numpy()


class VectorRecommender(Recommender):
    """MF and ALS: fixed user and item vectors, score = inner product."""

    def __init__(self, package: Package, users: torch.Tensor, items: torch.Tensor, index: str = "Flat"):
        super().__init__(package, index)
        self.user_matrix, self.item_matrix = users.float(), items.float()

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_matrix[users.long()].unsqueeze(1)

    def item_vectors(self) -> torch.Tensor:
        return self.item_matrix


class MFRecommender(Recommender):
    """MF from its compressed tables as stored: a query's user vector is looked up when it is asked for, and items
    are scored in their stored form chunk by chunk (``CompressedEmbeddings.item_scores``: exact, no decoded item
    table). With an approximate FAISS ``index`` (not ``Flat``), the items are decoded once into that index.

    Args:
        package: the loaded package.
        tables: ``float`` or ``int8``/``int4``/``fp16`` rows.
        index: ``Flat`` (exact, from the stored tables) or a FAISS ``index_factory`` string.
    """

    family = "mf"

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, index)
        build = package.meta["build"]
        n_users = len(self.users)
        stats = stats_from(package)
        specs = mf_specs(n_users, self.n_items, build["dim"])
        self.model = MatrixFactorization(CompressedEmbeddings(specs, from_config(build["settings"], "build.settings"),
                                                              stats))
        load_weights(self.model, package)
        quantize(self.model.eval(), tables)
        self.uses_index = index != "Flat"

    @torch.no_grad()
    def _bags(self, feature: str, bags: list[np.ndarray]) -> torch.Tensor:
        """(B, D) sums of the vectors of each bag of ids."""
        lengths = torch.tensor([len(b) for b in bags], dtype=torch.int32)
        values = torch.from_numpy(np.concatenate([np.asarray(b, dtype=np.int64) for b in bags]))
        return self.model(KeyedJaggedTensor.from_lengths_sync([feature], values, lengths))[feature]

    def _vectors(self, feature: str, ids) -> torch.Tensor:
        """(n, D) vectors of single ids (``feature`` is also its table's name), from the stored tables."""
        return self.model.embeddings.vectors(feature, torch.from_numpy(np.asarray(ids, dtype=np.int64)))

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self._vectors(USER, users.numpy()).unsqueeze(1)

    def history_queries(self, histories: list[np.ndarray]) -> torch.Tensor:
        lengths = torch.tensor([max(len(h), 1) for h in histories], dtype=torch.float32)
        return (self._bags(ITEM, histories) / lengths.unsqueeze(1)).unsqueeze(1)

    def item_blocks(self, queries: torch.Tensor):
        """(B, D) queries -> ``(start, (B, n) scores)`` blocks over every item, from the stored tables: blocks of
        ``SCORE_BLOCK`` scores, so a few queries score every item in one block."""
        return self.model.embeddings.item_scores(ITEM, queries, chunk=max(1, SCORE_BLOCK // len(queries)))

    def item_vectors(self) -> torch.Tensor:
        """(N, D) decoded item vectors (only for an approximate FAISS index, never for exact retrieval)."""
        return self._vectors(ITEM, np.arange(self.n_items))

    def _dense(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.cat([s for _, s in self.item_blocks(queries[:, 0])], dim=1)

    def similar_scores(self, items: np.ndarray) -> torch.Tensor:
        return self._dense(self._vectors(ITEM, items).unsqueeze(1))

    def _top(self, source, users, histories, k, skip, allowed):
        if source == "popularity" or self.uses_index:
            return super()._top(source, users, histories, k, skip, allowed)
        queries = self.queries(torch.as_tensor(users)) if source == "model" else self.history_queries(histories)
        return top_k(self.item_blocks(queries[:, 0]), k, skip, allowed)


class NBMFRecommender(VectorRecommender):
    """NBMF: non-negative user weights W and bit-packed binary item codes H; score w_u . h_i over every item."""

    family, uses_index = "nbmf", False

    def __init__(self, package: Package, index: str = "Flat"):
        model = package.section("model")
        codes = unpack_codes(model["item_codes"], package.meta["build"]["factors"], torch.float32)
        super().__init__(package, model["user_factors"], codes, index)

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_matrix[users.long()] @ self.item_matrix.T


class ComiRecRecommender(Recommender):
    """ComiRec: K interests extracted from the user's last ``max_length`` items; score max_k v_k . e_i."""

    family = "comirec"

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, index)
        build = package.meta["build"]
        settings = from_config(build["settings"], "build.settings")
        stats = stats_from(package)
        self.max_length = build["max_length"]
        embeddings = CompressedEmbeddings(multi_interest_specs(self.n_items, build["dim"]), settings, stats)
        extractor = from_config(build["extractor"], "build.extractor")
        self.model = MultiInterest(embeddings, extractor.build(build["dim"], self.max_length))
        load_weights(self.model, package)
        quantize(self.model.eval(), tables)
        with torch.no_grad():
            ids = torch.arange(self.n_items)
            self.item_matrix = self.model(jagged([ITEM], [ids]))[1][ITEM]

    def item_vectors(self) -> torch.Tensor:
        return self.item_matrix

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self.history_queries([self.history(int(u)) for u in users])

    @torch.no_grad()
    def history_queries(self, histories: list[np.ndarray]) -> torch.Tensor:
        recent = [np.asarray(h[::-1][:self.max_length], dtype=np.int64) for h in histories]  # most recent first
        lengths = torch.tensor([len(h) for h in recent], dtype=torch.int32)
        values = torch.from_numpy(np.concatenate(recent)) if recent else torch.empty(0, dtype=torch.int64)
        return self.model(KeyedJaggedTensor.from_lengths_sync([HISTORY], values, lengths))[0]


class EASERecommender(Recommender):
    """EASE: scores x B of the user's item set x, with B dense or pruned (stored sparse)."""

    family, uses_index = "ease", False

    def __init__(self, package: Package, index: str = "Flat"):
        super().__init__(package, index)
        model = package.section("model")
        self.kept = model["items"].long()
        m = len(self.kept)
        self.position = torch.full((self.n_items,), -1, dtype=torch.long)
        self.position[self.kept] = torch.arange(m)
        if "item_item" in model:
            self.b = model["item_item"].float()
            self.bt = None
        else:
            self.b = None
            self.bt = _csr(model["indptr"], model["indices"], model["values"].float(), (m, m))

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        return self.score_histories([self.history(int(u)) for u in users])

    def score_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        x = torch.zeros(len(histories), len(self.kept))
        for row, items in enumerate(histories):
            columns = self.position[torch.as_tensor(items, dtype=torch.long)]
            x[row, columns[columns >= 0]] = 1.0
        kept = x @ self.b if self.b is not None else (self.bt @ x.T).T
        scores = (kept.min(dim=1, keepdim=True).values - 1).expand(len(histories), self.n_items).contiguous()
        return scores.index_copy_(1, self.kept, kept)

    def similar_scores(self, items: np.ndarray) -> torch.Tensor:
        """Row i of B: how much having item i raises each item's score."""
        return self.score_histories([np.array([i]) for i in items])


class CTRScorer:
    """A CTR model (DLRM, DCNv2, DeepFM) from its package: click probabilities of raw rows.

    Args:
        package: the loaded package.
        tables: ``float`` or ``int8``/``int4``/``fp16`` (TorchRec's quantized tables, FBGEMM kernels).
    """

    family = "ctr"

    def __init__(self, package: Package, tables: str = "float"):
        from recsys.training.ctr import ctr_network  # the training module: imported only for CTR packages

        data, build = package.meta["data"], dict(package.meta["build"])
        self.schema = CTRSchema(**{k: tuple(v) for k, v in data["schema"].items()})
        self.transform, self.dense_stats = data.get("dense_transform", "none"), data.get("dense_stats")
        self.vocabs = {f: package.vocabulary(f) for f in self.schema.sparse_features}
        counts = {f: package.tensors[f"stats.{f}.counts"].numpy() for f in self.schema.sparse_features}
        model = from_config(build.pop("model"), "build.model")
        settings = from_config(build.pop("settings"), "build.settings")
        unknown = set(build) - CTR_BUILD
        if unknown:
            raise ConfigError(f"{META}: build has unknown entries {sorted(unknown)}; a CTR package has {sorted(CTR_BUILD)}")
        self.model = ctr_network(model, self.schema, data["vocab_sizes"], counts, settings, **build)[0]
        load_weights(self.model, package)
        quantize(self.model.eval(), tables)
        self.to_batch = CTRBatcher(self.schema)

    def memory(self) -> dict[str, int]:
        """Bytes the loaded model holds, by attribute (``held_bytes``)."""
        return held_bytes(self)

    @property
    def columns(self) -> list[str]:
        """The input columns a row needs (raw values, as in the source data)."""
        return [*self.schema.dense, *self.schema.sparse_features]

    def prepared(self, frame: pd.DataFrame) -> pa.Table:
        """Raw rows -> the prepared layout (ids through the vocabularies, unknown -> OOV; dense transformed)."""
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise DataError(f"CTR rows lack columns {missing}; the model reads {self.columns}")
        columns = {LABEL: pa.array(np.zeros(len(frame), dtype=np.int8))}
        for name in self.schema.dense:
            try:
                x = pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError) as error:
                raise DataError(f"CTR column '{name}' must be numeric: {error}") from error
            columns[name] = pa.array(transform_dense(x, self.transform, self.dense_stats and self.dense_stats[name]))
        for name in self.schema.sparse:
            vocab = self.vocabs[name]
            columns[name] = pa.array(lookup(vocab, frame[name].tolist()))
        for name in self.schema.multi_valued:
            vocab, cells = self.vocabs[name], frame[name].tolist()
            if not all(isinstance(c, (list, tuple, np.ndarray)) for c in cells):
                raise DataError(f"CTR column '{name}' is multi-valued: every cell must be a list of ids")
            lengths = np.array([len(c) for c in cells], dtype=np.int32)
            flat = lookup(vocab, [v for c in cells for v in c])
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int64()))
        return pa.table(columns, schema=self.schema.prepared())

    @torch.no_grad()
    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """(B,) click probabilities of raw rows."""
        batch = self.to_batch(self.prepared(frame))
        return torch.sigmoid(self.model(batch.sparse, batch.dense)).float().numpy()


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


def load_weights(model: torch.nn.Module, package: Package) -> None:
    """Loads the package's ``model.*`` tensors into ``model`` built from its config.

    Raises:
        ConfigError: naming the first tensors missing from the package, not expected by the config, or of another
            shape than the config builds (a package whose weights do not match its config).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = package.section("model")
    problems = [f"'model.{k}' is missing (expected shape {shape})" for k, shape in expected.items() if k not in given]
    problems += [f"'model.{k}' is not part of this model" for k in given if k not in expected]
    problems += [f"'model.{k}' has shape {tuple(given[k].shape)}, the config builds {shape}"
                 for k, shape in expected.items() if k in given and tuple(given[k].shape) != shape]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(f"the package's weights do not match its config: {'; '.join(problems[:5])}{more}")
    model.load_state_dict(given)


def held_bytes(scorer) -> dict[str, int]:
    """Bytes of every tensor, array and FAISS index a loaded model holds, by attribute, measured from the objects
    (tensors shared by several attributes are counted once): what serving keeps resident for the model.

    Example:
        >>> class Scorer: ...
        >>> scorer = Scorer(); scorer.table = torch.zeros(10, 4); scorer.same = scorer.table
        >>> held_bytes(scorer)
        {'table': 160}
    """
    seen: set[int] = set()

    def size(value, depth: int = 0) -> int:
        if isinstance(value, torch.Tensor):
            if value.layout == torch.sparse_csr:
                return sum(size(t) for t in (value.crow_indices(), value.col_indices(), value.values()))
            storage = value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value)
            if storage in seen:
                return 0
            seen.add(storage)
            return tensor_bytes(value)
        if isinstance(value, np.ndarray):
            base = value if value.base is None else value.base
            if id(base) in seen:
                return 0
            seen.add(id(base))
            return value.nbytes
        if isinstance(value, torch.nn.Module):
            return sum(size(t) for t in value.state_dict(keep_vars=True).values())
        if isinstance(value, ItemIndex):
            return size(value.vectors) + int(faiss.serialize_index(value.index).nbytes)
        if isinstance(value, (tuple, list)):
            return sum(size(v, depth) for v in value)
        if isinstance(value, dict):
            return sum(size(v, depth) for v in value.values())
        if isinstance(value, pd.Index):
            return int(value.memory_usage(deep=True))
        if hasattr(value, "__dict__") and depth < 2 and not isinstance(value, type):
            return sum(size(v, depth + 1) for v in vars(value).values())
        return 0

    return {name: b for name, value in vars(scorer).items() if (b := size(value))}


COLLECTIONS = ("embeddings", "first_order")  # where the models keep their CompressedEmbeddings


def collections(module: torch.nn.Module) -> dict[str, CompressedEmbeddings]:
    """The embedding collections of a model (MF, ComiRec, CTR networks; DeepFM's first-order tables included)."""
    return {name: c for name in COLLECTIONS if isinstance(c := getattr(module, name, None), CompressedEmbeddings)}


def quantize(module: torch.nn.Module, tables: str) -> None:
    """Swaps a model's collections for copies with ``tables`` (int8, int4, fp16) rows; ``float`` keeps them."""
    if tables != "float":
        for name, collection in collections(module).items():
            setattr(module, name, quantize_tables(collection, tables))


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


def _als(package: Package, tables: str, index: str) -> Recommender:
    model = package.section("model")
    recommender = VectorRecommender(package, model["user_factors"], model["item_factors"], index)
    recommender.family = "als"
    return recommender


def _table_free(cls):
    def build(package: Package, tables: str, index: str):
        if tables != "float":
            raise ConfigError(f"{package.family} has no embedding tables to quantize; use tables=float")
        return cls(package, index=index)
    return build


LOADERS = {"mf": lambda p, tables, index: MFRecommender(p, tables, index), "als": _als,
           "nbmf": _table_free(NBMFRecommender), "ease": _table_free(EASERecommender),
           "comirec": lambda p, tables, index: ComiRecRecommender(p, tables, index),
           "ctr": lambda p, tables, index: CTRScorer(p, tables)}


def load(source: str | Path | Package, tables: str = "float", index: str = "Flat") -> Recommender | CTRScorer:
    """The model of a package directory (or a loaded Package).

    Args:
        source: a package directory or Package.
        tables: ``float`` (as trained) or ``int8``/``int4``/``fp16``: the embedding tables quantized with
            TorchRec's quantized modules (models with tables: MF, ComiRec, CTR).
        index: FAISS ``index_factory`` string of vector models' item index (``Flat``, ``HNSW32``, ``IVF256,Flat``,
            ``IVF256,PQ16``...).
    """
    package = source if isinstance(source, Package) else Package.load(source)
    return LOADERS[package.family](package, tables, index)
