"""What every loaded model shares: its weights from the package, quantized tables, the bytes it holds."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import torch

from recsys.embeddings.collection import CompressedEmbeddings
from recsys.embeddings.memory import tensor_bytes
from recsys.embeddings.serving_quantization import quantize_tables
from recsys.errors import ConfigError
from recsys.inference.package import Package
from recsys.retrieval import ItemIndex


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
