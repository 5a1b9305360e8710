"""A trained model as files that load without the training data: JSON metadata and safetensors weights.

A package directory holds ``meta.json`` (the family, what rebuilds the model, the run's resolved
``model``/``embedding`` config, a summary of the prepared data, metrics), ``vocab.json`` (the raw id of
every index, per feature) and ``weights.safetensors`` (every tensor: the model's unsharded state with its
compressed tables, id statistics, the users' histories). Nothing is pickled; loading runs no user code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from recsys.data.vocab import Vocabulary
from recsys.embeddings.graph_hash import GraphHash
from recsys.embeddings.spec import InteractionGraph, TableStats
from recsys.errors import ConfigError

FORMAT = 1
META, VOCAB, WEIGHTS = "meta.json", "vocab.json", "weights.safetensors"
FAMILIES = ("mf", "als", "ease", "nbmf", "comirec", "ctr")


@dataclass
class Package:
    """A model's metadata, vocabularies and tensors.

    Args:
        family: one of ``FAMILIES``.
        meta: JSON-serialisable metadata (``build`` arguments, ``config``, ``data``, ``metrics``).
        tensors: name -> tensor; ``model.<key>`` entries are the model's state dict.
        vocabs: feature -> raw ids of indices 1..n (index 0 is OOV).
    """

    family: str
    meta: dict
    tensors: dict[str, torch.Tensor]
    vocabs: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"package family must be one of {FAMILIES}, got {self.family!r}")

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors named ``<prefix>.<key>``, keyed by ``<key>``."""
        start = f"{prefix}."
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}

    def vocabulary(self, feature: str) -> Vocabulary:
        if feature not in self.vocabs:
            raise ConfigError(f"the package has no vocabulary '{feature}'; it has {sorted(self.vocabs)}")
        ids = np.asarray(self.vocabs[feature])
        return Vocabulary(ids, np.zeros(len(ids), dtype=np.int64), name=feature)

    def bytes(self) -> int:
        """Bytes of every tensor of the package."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, directory: str | Path) -> Path:
        """Writes the package to ``directory`` atomically (a temporary sibling renamed into place)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}")
        staging.mkdir()
        try:
            meta = {"format": FORMAT, "family": self.family, **self.meta}
            (staging / META).write_text(json.dumps(meta, indent=1, default=_json_default))
            (staging / VOCAB).write_text(json.dumps(self.vocabs, default=_json_default))
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in self.tensors.items()},
                      str(staging / WEIGHTS))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Package:
        directory = Path(directory)
        missing = [name for name in (META, VOCAB, WEIGHTS) if not (directory / name).is_file()]
        if missing:
            raise ConfigError(f"{directory}: not a model package (missing {', '.join(missing)})")
        meta = json.loads((directory / META).read_text())
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{directory / META}: package format {meta.get('format')!r}, this code reads {FORMAT}")
        family = meta.pop("family")
        meta.pop("format")
        return cls(family, meta, load_file(str(directory / WEIGHTS)), json.loads((directory / VOCAB).read_text()))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def vocab_ids(vocabulary: Vocabulary) -> list:
    """The raw ids of a vocabulary as JSON values (numpy scalars converted)."""
    return vocabulary.ids.tolist()


def stats_tensors(stats: dict[str, TableStats], settings) -> dict[str, torch.Tensor]:
    """``stats.<table>.<counts|clusters>`` tensors of the tables' id statistics, and the interaction graph
    (``stats.graph.users/items``) when a GraphHash table has no prepared clusters and clusters it at build."""
    out = {}
    for table, s in stats.items():
        for name in ("counts", "clusters"):
            if (value := getattr(s, name)) is not None:
                out[f"stats.{table}.{name}"] = torch.from_numpy(np.asarray(value, dtype=np.int64))
        if s.graph is not None and s.clusters is None and isinstance(settings.compression(table), GraphHash):
            out["stats.graph.users"] = torch.from_numpy(np.asarray(s.graph.users, dtype=np.int64))
            out["stats.graph.items"] = torch.from_numpy(np.asarray(s.graph.items, dtype=np.int64))
    return out


def stats_from(package: Package, sides: dict[str, str], sizes: dict[str, int]) -> dict[str, TableStats]:
    """TableStats per table from ``stats_tensors``' entries; ``sides`` maps table -> graph side (user/item)."""
    graph = None
    if "stats.graph.users" in package.tensors:
        graph = InteractionGraph(package.tensors["stats.graph.users"].numpy(), package.tensors["stats.graph.items"].numpy(),
                                 sizes.get("user", 0), sizes.get("item", 0))
    stats = {}
    for table in {k.split(".")[1] for k in package.tensors if k.startswith("stats.") and k.split(".")[1] != "graph"}:
        part = package.section(f"stats.{table}")
        stats[table] = TableStats(counts=part["counts"].numpy() if "counts" in part else None,
                                  clusters=part["clusters"].numpy() if "clusters" in part else None,
                                  graph=graph, side=sides.get(table))
    return stats


def csr_tensors(name: str, indptr: np.ndarray, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """``<name>.indptr`` / ``<name>.indices`` int64 tensors of a CSR-style list of lists."""
    return {f"{name}.indptr": torch.from_numpy(np.asarray(indptr, dtype=np.int64)),
            f"{name}.indices": torch.from_numpy(np.asarray(indices, dtype=np.int64))}


def to_config(obj):
    """A Hydra-instantiable JSON form of a settings object: dataclasses (and ``functools.partial`` of a class, as
    Hydra's ``_partial_`` builds them) become ``{"_target_": ..., field: value}``, recursively.

    Example:
        >>> to_config(Hashing(budget=0.25))["_target_"]  # doctest: +SKIP
        'recsys.embeddings.hashing.Hashing'
    """
    if isinstance(obj, functools.partial):
        return {"_target_": _qualname(obj.func), "_partial_": True, **{k: to_config(v) for k, v in obj.keywords.items()}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"_target_": _qualname(type(obj)),
                **{f.name: to_config(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}}
    if isinstance(obj, dict):
        return {str(k): to_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_config(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ConfigError(f"cannot store a {type(obj).__name__} in a package's JSON metadata: {obj!r:.80}")


def from_config(config):
    """The object ``to_config`` described (Hydra's ``instantiate``)."""
    return instantiate(config, _convert_="object")


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
