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

from pathlib import Path

from recsys.errors import ConfigError
from recsys.inference.package import Package
from recsys.inference.scorers.als import ALSRecommender
from recsys.inference.scorers.base import HISTORY_ID, SOURCES, USER_ID, Recommendations, Recommender, VectorRecommender
from recsys.inference.scorers.comirec import ComiRecRecommender
from recsys.inference.scorers.ctr import CTRScorer
from recsys.inference.scorers.ease import EASERecommender
from recsys.inference.scorers.ids import comparable, lookup
from recsys.inference.scorers.mf import MFRecommender
from recsys.inference.scorers.nbmf import NBMFRecommender
from recsys.inference.scorers.weights import collections, held_bytes, load_weights, quantize

__all__ = ["ALSRecommender", "CTRScorer", "ComiRecRecommender", "EASERecommender", "HISTORY_ID", "MFRecommender",
           "NBMFRecommender", "Recommendations", "Recommender", "SCORERS", "SOURCES", "USER_ID", "VectorRecommender",
           "collections", "comparable", "held_bytes", "load", "load_weights", "lookup", "quantize"]


SCORERS = {cls.family: cls for cls in (MFRecommender, ALSRecommender, NBMFRecommender, EASERecommender,
                                       ComiRecRecommender, CTRScorer)}  # a package's family -> the class that loads it


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
    if package.family not in SCORERS:
        raise ConfigError(f"package family must be one of {sorted(SCORERS)}, got {package.family!r}")
    return SCORERS[package.family](package, tables, index)
