"""The MLflow pyfunc of every model family, logged as code ("models from code"): MLflow stores this file and the
package directory (JSON + safetensors), never a pickle.

Input and output (one output row per input row, so ``mlflow.pyfunc.spark_udf`` can run it):

* ranking models: column ``user_id`` (raw ids), optional ``history`` (lists of raw item ids, used for users the
  model has not seen); params ``k`` (default 10) and ``exclude_seen`` (default true). Output columns ``items``
  (lists of raw item ids, best first), ``scores`` and ``source`` (``model``, ``history`` or ``popularity``).
* CTR models: the raw feature columns; output column ``probability``. The signature types integer id columns
  as ``long``, which MLflow's schema enforcement does not let hold missing values (pandas would turn them into
  floats and round large ids): score rows with missing ids through ``pipelines.batch_score`` or ``POST /score``,
  which take them (unknown and missing ids look up the OOV row).

The model config (``mlflow.pyfunc.load_model(uri, model_config={...})``) takes ``tables`` (``float``, ``int8``,
``int4``: TorchRec's quantized tables) and ``index`` (a FAISS ``index_factory`` string).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from recsys.inference.predict import predict_frame
from recsys.inference.scorers import load


class RecsysModel(PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.model = load(context.artifacts["package"], tables=config.get("tables", "float"),
                          index=config.get("index", "Flat"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.model, model_input, params or {})


mlflow.models.set_model(RecsysModel())
