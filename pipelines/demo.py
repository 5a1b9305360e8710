"""The main job: synthetic data -> prepare -> train MF -> evaluate -> MLflow, then a summary.

    python -m pipelines.demo                      (what `make demo` runs)
    python -m pipelines.demo data=ml100k model=mf_bpr
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipelines.train import run


def summary(cfg: DictConfig, result: dict) -> str:
    ctr = cfg.data.kind == "ctr"
    names = ["auc", "logloss"] if ctr else [f"{m}@{k}" for k in cfg.trainer.eval_ks
                                           for m in ("recall", "ndcg", "hitrate", "mrr", "coverage")]
    width = max(map(len, names + ["users evaluated"])) + 2
    lines = [f"{'metric':<{width}}{cfg.model.name:>12}{'click rate' if ctr else 'popularity':>12}"]
    lines += [f"{n:<{width}}{result['metrics'][n]:>12.4f}{result['baseline'][n]:>12.4f}" for n in names]
    if not ctr:
        lines.append(f"{'users evaluated':<{width}}{int(result['metrics']['n_users']):>12}")
    lines += [f"{'table bytes':<{width}}{sum(result['memory'].values()):>12}",
              "", f"MLflow run {result['run_id']} in {result['tracking_uri']}",
              f"open the UI: .venv/bin/mlflow ui --backend-store-uri {result['tracking_uri']}"]
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(summary(cfg, run(cfg)))


if __name__ == "__main__":
    main()
