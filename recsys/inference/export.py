"""Trained model -> Package (the model's own tensors plus what inference needs from the prepared data), and the
serving export written beside it: item vectors (or EASE's B, or NBMF's bit-packed items) and int8/int4 tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from recsys.data.dataset import PreparedData
from recsys.data.schemas import ITEM, USER
from recsys.embeddings.serving_quantization import quantize_tables
from recsys.errors import ConfigError
from recsys.inference.package import Package, csr_tensors, vocab_ids
from recsys.inference.scorers import CTRScorer, Recommender, collections, load

QUANTIZED = ("int8", "int4")


def package_model(model, data: PreparedData, config: dict | None = None, metrics: dict | None = None) -> Package:
    """The Package of a trained model (any family with ``export()``); a collective on several ranks.

    Args:
        model: the trained task (MFRetrieval, ImplicitALS, EASE, NBMF, ComiRec, CTRTask).
        data: the prepared data it was trained on (vocabularies, histories, popularity).
        config: the run's resolved config, kept in the metadata.
        metrics: test metrics, kept in the metadata.
    """
    if not hasattr(model, "export"):
        raise ConfigError(f"{type(model).__name__} cannot be packaged (it has no export())")
    family, build, tensors = model.export()
    manifest = data.manifest
    summary = {"kind": data.kind, "vocab_sizes": data.vocab_sizes, "root": str(data.root)}
    if data.kind == "ctr":
        summary |= {"schema": manifest["schema"], "dense_transform": (manifest.get("ctr") or {}).get("dense_transform",
                    "none"), "dense_stats": manifest.get("dense_stats")}
        vocabs = {f: vocab_ids(data.vocab(f)) for f in data.ctr_schema.sparse_features}
    else:
        vocabs = {USER: vocab_ids(data.vocab(USER)), ITEM: vocab_ids(data.vocab(ITEM))}
        tensors = {**tensors, **csr_tensors("history", *data.sequences("train")),
                   "popularity": torch.from_numpy(data.item_counts("train").astype(np.float32))}
        if "valid" in data.splits:
            seen = (data.matrix("train") + data.matrix("valid")).tocsr()
            tensors |= csr_tensors("exclude", seen.indptr, seen.indices)
    meta = {"build": build, "data": summary, "metrics": metrics or {}, "config": config or {}}
    return Package(family, meta, tensors, vocabs)


def serving_export(package: Package, directory: str | Path, scorer: Recommender | CTRScorer | None = None
                   ) -> dict[str, int]:
    """Writes what a server needs to ``directory``: ``items.safetensors`` (ALS: ``item_vectors`` and
    ``user_vectors``; EASE: B; NBMF: ``item_codes`` bit-packed and ``user_factors``) and, for models with
    embedding tables, ``tables_<int8|int4>.safetensors``: the state of every collection with its plain tables
    quantized by TorchRec's quantized modules. ``scorer``: the package already loaded (float tables). Returns the
    bytes of each file's tensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scorer = scorer or load(package)
    items = scorer.serving_tensors(package)  # models with embedding tables serve them as stored: none
    sizes = {}
    if items:
        sizes["items"] = _save(items, directory / "items.safetensors")
    tables = collections(scorer.model) if hasattr(scorer, "model") else {}
    for dtype in QUANTIZED if tables else ():
        quantized = {f"{name}.{k}": v for name, c in tables.items() for k, v in quantize_tables(c, dtype).state_dict().items()}
        sizes[f"tables_{dtype}"] = _save(quantized, directory / f"tables_{dtype}.safetensors")
    return sizes


def _save(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Saves plain tensors; TorchRec's packed sub-byte tensors (``UInt4Tensor``) as their packed bytes."""
    tensors = {k: (v if type(v) is torch.Tensor else v.view(torch.uint8)).detach().cpu().contiguous().clone()
               for k, v in tensors.items()}
    save_file(tensors, str(path))
    return sum(t.numel() * t.element_size() for t in tensors.values())
