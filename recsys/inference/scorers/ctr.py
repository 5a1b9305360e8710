"""CTR models (DLRM, DCNv2, DeepFM): click probabilities of raw rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from recsys.data.batching import CTRBatcher
from recsys.data.prepare import transform_dense
from recsys.data.schemas import LABEL, CTRSchema
from recsys.errors import ConfigError, DataError
from recsys.inference.package import META, Package, from_config
from recsys.inference.scorers.ids import lookup
from recsys.inference.scorers.weights import held_bytes, load_weights, quantize
from recsys.models import ctr

CTR_BUILD = {"dim", "first_order", "multi_valued_pooling", "compress_min_rows"}  # ctr_network's plain arguments


class CTRScorer:
    """A CTR model (DLRM, DCNv2, DeepFM) from its package: click probabilities of raw rows.

    Args:
        package: the loaded package.
        tables: ``float`` or ``int8``/``int4``/``fp16`` (TorchRec's quantized tables, FBGEMM kernels).
    """

    family = ctr.FAMILY
    default_params: dict = {}

    def __init__(self, package: Package, tables: str = "float", index: str = "Flat"):
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

    def serving_tensors(self, package: Package) -> dict[str, torch.Tensor]:
        return {}

    def example_input(self, rows: int = 3) -> pd.DataFrame:
        """A few valid raw rows (dense 0, each field's most frequent id) for the pyfunc signature."""
        frame = {name: [0.0] * rows for name in self.schema.dense}
        frame |= {f: [self.vocabs[f].ids[0].item()] * rows for f in self.schema.sparse}
        frame |= {f: [[self.vocabs[f].ids[0].item()]] * rows for f in self.schema.multi_valued}
        return pd.DataFrame(frame)

    def predict_frame(self, frame: pd.DataFrame, params: dict) -> pd.DataFrame:
        """Raw feature columns -> ``probability`` per row: the pyfunc's and batch scoring's format."""
        return pd.DataFrame({"probability": self.predict(frame)}, index=frame.index)

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
