"""A trained model as files that load without the training data: JSON metadata and safetensors weights.

A package directory holds ``meta.json`` (the family, what rebuilds the model, the run's resolved
``model``/``embedding`` config, a summary of the prepared data, metrics), ``vocab.json`` (the raw id of
every index, per feature) and ``weights.safetensors`` (every tensor: the model's unsharded state with its
compressed tables, id statistics, the users' histories). Nothing is pickled, and loading runs no code a package
names: its metadata may only name the platform's own classes (``packageable()``), with plain JSON arguments checked
against their types (``from_config``); anything else fails with the key and value before any object is built.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import shutil
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydantic
import torch
from safetensors.torch import load_file, save_file

from recsys.data.vocab import Vocabulary
from recsys.embeddings.spec import TableStats
from recsys.errors import ConfigError

FORMAT = 1
META, VOCAB, WEIGHTS = "meta.json", "vocab.json", "weights.safetensors"


@dataclass
class Package:
    """A model's metadata, vocabularies and tensors.

    Args:
        family: the model family (``recsys.inference.scorers.SCORERS`` names the class that loads each).
        meta: JSON-serialisable metadata (``build`` arguments, ``config``, ``data``, ``metrics``).
        tensors: name -> tensor; ``model.<key>`` entries are the model's state dict.
        vocabs: feature -> raw ids of indices 1..n (index 0 is OOV).
    """

    family: str
    meta: dict
    tensors: dict[str, torch.Tensor]
    vocabs: dict[str, list] = field(default_factory=dict)

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors named ``<prefix>.<key>``, keyed by ``<key>``."""
        start = f"{prefix}."
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}

    def vocabulary(self, feature: str) -> Vocabulary:
        if feature not in self.vocabs:
            raise ConfigError(f"the package has no vocabulary '{feature}'; it has {sorted(self.vocabs)}")
        return Vocabulary(np.asarray(self.vocabs[feature]), None, name=feature)  # packages keep no id counts

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


def stats_tensors(stats: dict[str, TableStats], collection) -> dict[str, torch.Tensor]:
    """``stats.<table>.<counts|clusters>`` tensors that rebuild ``collection``'s methods without the training data:
    the id counts, and what each method needs besides (``Method.rebuild_stats``, e.g. GraphHash's clusters). No
    interaction graph is stored, so loading never clusters."""
    out = {f"stats.{table}.counts": torch.from_numpy(np.asarray(s.counts, dtype=np.int64))
           for table, s in stats.items() if s.counts is not None}
    for table, method in collection.methods.items():
        out |= {f"stats.{table}.{name}": t.detach().cpu().long() for name, t in method.rebuild_stats().items()}
    return out


def stats_from(package: Package) -> dict[str, TableStats]:
    """TableStats per table from ``stats_tensors``' entries."""
    stats = {}
    for table in {k.split(".")[1] for k in package.tensors if k.startswith("stats.")}:
        part = package.section(f"stats.{table}")
        stats[table] = TableStats(counts=part["counts"].numpy() if "counts" in part else None,
                                  clusters=part["clusters"].numpy() if "clusters" in part else None)
    return stats


def csr_tensors(name: str, indptr: np.ndarray, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """``<name>.indptr`` / ``<name>.indices`` int64 tensors of a CSR-style list of lists."""
    return {f"{name}.indptr": torch.from_numpy(np.asarray(indptr, dtype=np.int64)),
            f"{name}.indices": torch.from_numpy(np.asarray(indices, dtype=np.int64))}


def to_config(obj):
    """A JSON form of a settings object that ``from_config`` builds again: dataclasses (and ``functools.partial`` of
    a CTR network, as Hydra's ``_partial_`` builds them) become ``{"_target_": ..., field: value}``, recursively.
    Only the classes of ``packageable()`` can be stored.

    Example:
        >>> to_config(Hashing(budget=0.25))["_target_"]  # doctest: +SKIP
        'recsys.embeddings.hashing.Hashing'
    """
    if isinstance(obj, functools.partial):
        _allowed(obj.func, partial=True)
        return {"_target_": _qualname(obj.func), "_partial_": True, **{k: to_config(v) for k, v in obj.keywords.items()}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _allowed(type(obj), partial=False)
        return {"_target_": _qualname(type(obj)),
                **{f.name: to_config(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}}
    if isinstance(obj, dict):
        return {str(k): to_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_config(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ConfigError(f"cannot store a {type(obj).__name__} in a package's JSON metadata: {obj!r:.80}")


def from_config(config, key: str = "build"):
    """The object ``to_config`` described, built without Hydra and without importing what the package names.

    The whole tree is checked before any object is built: every ``_target_`` must be a class of ``packageable()``
    (``_partial_: true`` only on a CTR network), every other key one of its parameters, every value plain JSON
    data. Arguments are then validated against the class's type hints as the objects are built, innermost first.

    Args:
        config: ``to_config``'s output, read from a package's ``meta.json``.
        key: where ``config`` sits in the metadata (e.g. ``build.settings``), for error messages.

    Raises:
        ConfigError: naming the key and the value that is not allowed, or not of its parameter's type.
    """
    _check(config, key)
    return _build(config, key)


@functools.cache
def packageable() -> dict[str, type]:
    """The classes a package may name, by ``_target_``: embedding settings, compression methods, interest extractors
    and CTR networks (with their cross-layer settings). A class is not trusted because it can be imported."""
    from recsys.embeddings import (compositional, full, graph_hash, hashing, low_rank, mixed_dim, quantization,
                                   tensor_train)
    from recsys.embeddings.collection import EmbeddingSettings
    from recsys.models import ctr, multi_interest

    classes = (EmbeddingSettings, full.Full, hashing.Hashing, hashing.DoubleHashing, hashing.MultiHash,
               hashing.FrequencyHashing, compositional.QuotientRemainder, compositional.Compositional,
               mixed_dim.MixedDimension, quantization.ProductQuantization, quantization.DifferentiableVQ,
               graph_hash.GraphHash, low_rank.LowRank, tensor_train.TensorTrain, multi_interest.DynamicRouting,
               multi_interest.SelfAttention, ctr.Cross, *_networks())
    return {_qualname(cls): cls for cls in classes}


def _networks() -> tuple[type, ...]:
    """The classes stored as ``_partial_`` factories (the CTR networks, called with their tables at build)."""
    from recsys.models import ctr

    return ctr.DLRM, ctr.DCNv2, ctr.DeepFM


def _allowed(cls: type, partial: bool) -> None:
    if packageable().get(_qualname(cls)) is not cls or partial != (cls in _networks()):
        how = "as a _partial_ factory" if partial else "as an object"
        raise ConfigError(f"{_qualname(cls)} cannot be stored in a model package {how}; packages name only "
                          f"{sorted(packageable())} (CTR networks as _partial_ factories)")


_SPECIAL = ("_target_", "_partial_")
# Parameters added after packages were written, with the value that reproduces what those packages were built with
# (the parameter's default may differ): embedding.full_below_rows did not exist, so no table was kept full by it.
_WRITTEN_BEFORE = {"recsys.embeddings.collection.EmbeddingSettings": {"full_below_rows": 0}}


def _check(value, key: str) -> None:
    """Raises ConfigError unless ``value`` is plain JSON data and allowed ``_target_`` dicts (see ``from_config``)."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check(v, f"{key}[{i}]")
    elif isinstance(value, dict):
        if "_target_" not in value:
            for k, v in value.items():
                _check(v, f"{key}.{k}")
            return
        target, partial = value["_target_"], value.get("_partial_", False)
        cls = packageable().get(target) if isinstance(target, str) else None
        if cls is None:
            raise ConfigError(f"{key}._target_={target!r:.200} is not a class a model package may name; it may name "
                              f"{sorted(packageable())}")
        if type(partial) is not bool or partial != (cls in _networks()):
            raise ConfigError(f"{key}._partial_={partial!r:.80} is not allowed for {target}: only the CTR networks "
                              f"are stored as _partial_ factories (_partial_: true)")
        parameters = inspect.signature(cls).parameters
        for k, v in value.items():
            if k in _SPECIAL:
                continue
            if k not in parameters or k.startswith("_"):
                raise ConfigError(f"{key}.{k}={v!r:.80}: {target} has no parameter {k!r}; it takes {list(parameters)}")
            _check(v, f"{key}.{k}")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ConfigError(f"{key}={value!r:.80} is not plain JSON data")


def _build(value, key: str):
    if isinstance(value, list):
        return [_build(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if "_target_" not in value:
        return {k: _build(v, f"{key}.{k}") for k, v in value.items()}
    cls = packageable()[value["_target_"]]
    hints = typing.get_type_hints(cls.__init__)
    arguments = dict(_WRITTEN_BEFORE.get(value["_target_"], {}))  # what a package without the key was built with
    for k, v in value.items():
        if k not in _SPECIAL:
            arguments[k] = _build(v, f"{key}.{k}")
            _check_type(arguments[k], hints.get(k, typing.Any), f"{key}.{k}")
    return functools.partial(cls, **arguments) if value.get("_partial_") else cls(**arguments)


def _check_type(value, hint, key: str) -> None:
    try:
        _adapter(hint).validate_python(value, strict=True)
    except pydantic.ValidationError as error:
        reason = error.errors()[0]["msg"]
        raise ConfigError(f"{key}={value!r:.80} is not a {_hint_name(hint)}: {reason}") from None


@functools.cache
def _adapter(hint) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(hint, config=pydantic.ConfigDict(arbitrary_types_allowed=True))


def _hint_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
