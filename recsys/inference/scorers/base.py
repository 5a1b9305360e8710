"""The ranking models' shared interface: ids, histories, fallbacks, exclusions, top-K, similar items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recsys.data.schemas import ITEM, USER
from recsys.errors import ConfigError, DataError
from recsys.inference.package import Package
from recsys.inference.scorers.ids import lookup
from recsys.inference.scorers.weights import held_bytes
from recsys.retrieval import ItemIndex, multi_interest_retrieve
from recsys.retrieval.exact import top_k

SOURCES = ("model", "history", "popularity")
SCORE_BLOCK = 1 << 22  # scores per block of exact top-k over stored tables (16 MiB of float32)
USER_ID, HISTORY_ID = "user_id", "history"  # the input columns of ranking predictions


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
    has_tables = False  # embedding tables that ``tables="int8"`` etc. quantize

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        if tables != "float" and not self.has_tables:
            raise ConfigError(f"{package.family} has no embedding tables to quantize; use tables=float")
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

    def serving_tensors(self, package: Package) -> dict[str, torch.Tensor]:
        """What a server without this code would need besides the package (``recsys.inference.export.serving_export``):
        item and user vectors, EASE's B, NBMF's bit-packed codes. Models with tables serve them as stored: none."""
        return {}

    def example_input(self, rows: int = 3) -> pd.DataFrame:
        """A few valid input rows (known users) for the pyfunc signature."""
        return pd.DataFrame({USER_ID: self.users.ids[:rows].tolist()})

    default_params = {"k": 10, "exclude_seen": True}  # the pyfunc's params and their defaults

    def predict_frame(self, frame: pd.DataFrame, params: dict) -> pd.DataFrame:
        """``user_id`` (+ optional ``history``) -> ``items``, ``scores``, ``source`` per row (params ``k``,
        ``exclude_seen``): the pyfunc's and batch scoring's format."""
        if USER_ID not in frame.columns:
            raise DataError(f"ranking input needs a '{USER_ID}' column; got {list(frame.columns)}")
        k = int(params.get("k", self.default_params["k"]))
        if k < 1:
            raise DataError(f"k must be >= 1, got {k}")
        users = self.user_index(frame[USER_ID].tolist())
        histories = None
        if HISTORY_ID in frame.columns:
            histories = [None if not isinstance(h, (list, tuple, np.ndarray)) or len(h) == 0
                         else self.item_index(list(h)) for h in frame[HISTORY_ID]]
        found = self.recommend(users, k, histories, exclude_seen=bool(params.get("exclude_seen", True)))
        return pd.DataFrame({"items": [r.items.tolist() for r in found], "scores": [r.scores.tolist() for r in found],
                             "source": [r.source for r in found]}, index=frame.index)

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
    """ALS and NBMF: fixed user and item vectors, score = inner product."""

    def __init__(self, package: Package, users: torch.Tensor, items: torch.Tensor, tables: str = "float",
                 index: str = "Flat"):
        super().__init__(package, tables, index)
        self.user_matrix, self.item_matrix = users.float(), items.float()

    def queries(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_matrix[users.long()].unsqueeze(1)

    def item_vectors(self) -> torch.Tensor:
        return self.item_matrix


class TableRecommender(Recommender):
    """Models whose items live in an embedding collection (MF, ComiRec), served from the tables as stored: items are
    scored in their stored form chunk by chunk (``CompressedEmbeddings.item_scores``; a query with K interests
    scores max_k q_k . e_i) and the top-k kept as the chunks pass, exactly, with no decoded item table. With an
    approximate FAISS ``index`` (not ``Flat``) the items are decoded once into that index.

    Subclasses set ``self.model`` (whose ``embeddings`` holds the ``item`` table) and implement ``queries`` and
    ``history_queries``.
    """

    has_tables = True

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
        super().__init__(package, tables, index)
        self.uses_index = index != "Flat"

    def _vectors(self, table: str, ids) -> torch.Tensor:
        """(n, D) vectors of single ids of ``table``, from the stored tables."""
        return self.model.embeddings.vectors(table, torch.from_numpy(np.asarray(ids, dtype=np.int64)))

    def item_blocks(self, queries: torch.Tensor):
        """(B, K, D) queries -> ``(start, (B, n) scores)`` blocks over every item (the best of the K interests), of
        ``SCORE_BLOCK`` scores, so a few queries score every item in one block."""
        b, k, d = queries.shape
        chunk = max(1, SCORE_BLOCK // (b * k))
        for start, scores in self.model.embeddings.item_scores(ITEM, queries.reshape(b * k, d), chunk=chunk):
            yield start, scores if k == 1 else scores.view(b, k, -1).max(1).values

    def item_vectors(self) -> torch.Tensor:
        """(N, D) decoded item vectors (only for an approximate FAISS index, never for exact retrieval)."""
        return self._vectors(ITEM, np.arange(self.n_items))

    def _dense(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.cat([s for _, s in self.item_blocks(queries)], dim=1)

    def similar_scores(self, items: np.ndarray) -> torch.Tensor:
        return self._dense(self._vectors(ITEM, items).unsqueeze(1))

    def _top(self, source, users, histories, k, skip, allowed):
        if source == "popularity" or self.uses_index:
            return super()._top(source, users, histories, k, skip, allowed)
        queries = self.queries(torch.as_tensor(users)) if source == "model" else self.history_queries(histories)
        return top_k(self.item_blocks(queries), k, skip, allowed)
