"""Batch scoring: ``python -m pipelines.batch_score model.uri=models:/recsys@champion input=... output=...``.

Reads the input parquet (a file or a directory of files) in chunks of ``batch_size`` rows and writes one output
part per (input file, chunk): the top-``k`` items of every ``user_id`` (columns ``user_id``, ``rank``,
``item_id``, ``score``, ``source``) for a ranking model, the ``key_columns`` and ``probability`` of every row for
a CTR model. Re-running the same command skips the finished parts, so a killed job is finished by running it
again; a run with another model, settings or input into the same output fails unless ``overwrite=true``
(the layout and the guarantees are in :mod:`recsys.inference.batch`).

On several ranks, the input files split over them (file ``i`` to rank ``i % WORLD_SIZE``)::

    torchrun --nproc_per_node=2 -m pipelines.batch_score model.uri=... input=... output=...

From Python: ``batch_score("model.uri=...", "input=...", "output=...")`` returns the summary (rows in, rows out,
parts written, parts skipped, seconds).

The same model on Spark: the pyfunc logged with the model returns one row per input row (ranking: ``items``,
``scores``, ``source``; CTR: ``probability``), so ``mlflow.pyfunc.spark_udf`` runs it with a struct result
type (item ids are ``array<string>`` for string ids)::

    import mlflow
    from pyspark.sql import functions as F

    mlflow.set_tracking_uri("sqlite:///mlflow.db")  # or the tracking server
    recommend = mlflow.pyfunc.spark_udf(spark, "models:/recsys@champion", env_manager="local",
                                        result_type="items array<bigint>, scores array<double>, source string",
                                        params={"k": 10, "exclude_seen": True})
    top = (users.withColumn("top", recommend(F.struct("user_id")))   # users: a DataFrame with a user_id column
           .select("user_id", "top.scores", "top.source", F.posexplode("top.items").alias("pos", "item_id"))
           .select("user_id", (F.col("pos") + 1).alias("rank"), "item_id",
                   F.col("scores")[F.col("pos")].alias("score"), "source"))

    click = mlflow.pyfunc.spark_udf(spark, "models:/recsys-ctr@champion", result_type="double", env_manager="local")
    scored = rows.withColumn("probability", click(F.struct(*feature_columns)))  # the raw dense + sparse columns
"""

from __future__ import annotations

import json

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipelines.config import compose_run
from recsys.inference.batch import BatchSettings, score_parquet



def run(cfg: DictConfig) -> dict:
    """Scores ``cfg.input`` with ``cfg.model.uri`` into ``cfg.output``; returns this rank's summary."""
    settings = BatchSettings(k=cfg.k, exclude_seen=cfg.exclude_seen, batch_size=cfg.batch_size,
                             key_columns=tuple(cfg.key_columns or ()), tables=cfg.model.tables, index=cfg.model.index,
                             overwrite=cfg.overwrite, progress=cfg.progress)
    tracking_uri = instantiate(cfg.tracking).uri
    return score_parquet(cfg.model.uri, cfg.input, cfg.output, settings, tracking_uri=tracking_uri)


def batch_score(*overrides: str) -> dict:
    """``python -m pipelines.batch_score <overrides>`` as a Python call; returns :func:`run`'s summary.

    Example:
        >>> summary = batch_score("model.uri=models:/recsys@champion", "input=users.parquet", "output=top10",
        ...                       "progress=false")  # doctest: +SKIP
        >>> summary["rows_out"], summary["parts_written"]  # doctest: +SKIP
    """
    cfg = compose_run("batch_score", overrides)
    return run(cfg)


@hydra.main(config_path="../conf", config_name="batch_score", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
