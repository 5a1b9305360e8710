"""Read access to a prepared directory (see recsys.data.prepare for its layout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys.data.prepare import MANIFEST, RANKING_EXCLUDES, SPLITS
from recsys.data.schemas import ITEM, TIMESTAMP, USER, CTRSchema
from recsys.data.vocab import Vocabulary
from recsys.embeddings.spec import InteractionGraph
from recsys.errors import DataError


@dataclass
class PreparedData:
    """A prepared dataset: its manifest, split files and vocabularies.

    Args:
        root: the prepared directory.

    Example:
        >>> data = PreparedData.open("data/prepared/ml100k")  # doctest: +SKIP
        >>> data.matrix("train").shape                         # doctest: +SKIP
        (944, 1483)
    """

    root: Path

    @classmethod
    def open(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise DataError(f"{root}: not a prepared dataset (no {MANIFEST}); run `python -m pipelines.prepare` first")
        return cls(root)

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text())

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def path(self, split: str) -> Path:
        path = self.root / f"{split}.parquet"
        if not path.is_file():
            raise DataError(f"{path}: split '{split}' not found; the dataset has {self.splits}")
        return path

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if (self.root / f"{s}.parquet").is_file()]

    def vocab(self, feature: str) -> Vocabulary:
        return Vocabulary.load(self.root / "vocab" / f"{feature}.parquet")

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return dict(self.manifest["vocab_sizes"])

    @property
    def ctr_schema(self) -> CTRSchema:
        s = self.manifest["schema"]
        return CTRSchema(tuple(s["dense"]), tuple(s["sparse"]), tuple(s["multi_valued"]))

    @property
    def n_users(self) -> int:
        return self.vocab_sizes[USER]

    @property
    def n_items(self) -> int:
        return self.vocab_sizes[ITEM]

    def matrix(self, split: str) -> sp.csr_matrix:
        """The (n_users, n_items) 0/1 CSR matrix of a split's interactions."""
        table = pq.read_table(self.path(split), columns=[USER, ITEM])
        users, items = table[USER].to_numpy(), table[ITEM].to_numpy()
        matrix = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)),
                               shape=(self.n_users, self.n_items))
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        return matrix

    def seen(self, split: str) -> sp.csr_matrix:
        """The interactions a user's ranking on ``split`` leaves out: train's, and for test also those of the
        manifest's ``ranking_excludes`` (train and valid by default; train only for LightGCN-style splits)."""
        names = self.manifest.get("ranking_excludes", RANKING_EXCLUDES) if split == "test" else ["train"]
        matrix = sum(self.matrix(name) for name in names if name in self.splits).tocsr()
        matrix.data[:] = 1.0
        return matrix

    def graph(self, split: str = "train") -> InteractionGraph:
        """The split's interactions as a bipartite user-item graph."""
        table = pq.read_table(self.path(split), columns=[USER, ITEM])
        return InteractionGraph(table[USER].to_numpy(), table[ITEM].to_numpy(), self.n_users, self.n_items)

    def sequences(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Each user's items of a split in time order, as CSR-style ``(indptr, items)``.

        ``items[indptr[u]:indptr[u + 1]]`` are user ``u``'s items ordered by timestamp (ties and data
        without timestamps keep the file order); ``indptr`` has ``n_users + 1`` entries (int64).
        """
        columns = [USER, ITEM] + ([TIMESTAMP] if TIMESTAMP in pq.read_schema(self.path(split)).names else [])
        table = pq.read_table(self.path(split), columns=columns)
        users, items = table[USER].to_numpy(), table[ITEM].to_numpy()
        keys = (table[TIMESTAMP].to_numpy(), users) if TIMESTAMP in columns else (users,)
        order = np.lexsort(keys)  # stable: by user, then timestamp, then file position
        indptr = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=self.n_users), out=indptr[1:])
        return indptr, items[order].astype(np.int64)

    def clusters(self, side: str) -> np.ndarray | None:
        """Graph cluster id per ``user`` or ``item`` index, if prepare computed them (else None)."""
        path = self.root / "clusters" / f"{side}.parquet"
        return pq.read_table(path)["cluster"].to_numpy() if path.is_file() else None

    def item_counts(self, split: str = "train") -> np.ndarray:
        """Interactions per item index in a split: shape (n_items,)."""
        return self._counts(split, ITEM, self.n_items)

    def user_counts(self, split: str = "train") -> np.ndarray:
        """Interactions per user index in a split: shape (n_users,)."""
        return self._counts(split, USER, self.n_users)

    def _counts(self, split: str, column: str, size: int) -> np.ndarray:
        return np.bincount(pq.read_table(self.path(split), columns=[column])[column].to_numpy(), minlength=size)
