"""Hyperparameter search spaces for Optuna, and the best trial as a config ``pipelines.train`` accepts.

A search space (``conf/search/<model>.yaml``) names the validation metric to optimise and, per config key, an
Optuna distribution::

    metric: recall@20
    direction: maximize
    params:
      model.dim: {type: categorical, choices: [32, 64, 128]}
      model.table_optimizer.lr: {type: float, low: 0.005, high: 0.3, log: true}

``fixed`` sets values for every trial (e.g. ``trainer.epochs: 1`` for a closed-form model). Keys are dotted paths
of the training config (values, not config groups); ``data.*`` keys are refused: a study tunes a model on one
prepared dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
import yaml

from recsys.errors import ConfigError

DIRECTIONS = ("maximize", "minimize")


@dataclass
class Param:
    """One searched value.

    Args:
        type: ``float``, ``int`` or ``categorical``.
        low, high: the range of a float or int (inclusive).
        log: sample the range on a log scale.
        step: a grid step of the range (not with ``log``).
        choices: the values of a categorical.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def distribution(self, key: str) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution, or a ConfigError naming ``key`` and what is wrong."""
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"search.params.{key}: a categorical needs a non-empty 'choices' list")
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.type not in ("float", "int"):
            raise ConfigError(f"search.params.{key}: type must be float, int or categorical, got {self.type!r}")
        if self.low is None or self.high is None or self.choices is not None:
            raise ConfigError(f"search.params.{key}: a {self.type} needs 'low' and 'high' (and no 'choices')")
        if self.log and self.step is not None:
            raise ConfigError(f"search.params.{key}: 'log' and 'step' exclude each other")
        try:
            if self.type == "int":
                return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                            step=int(self.step or 1))
            return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                                          step=self.step)
        except ValueError as error:
            raise ConfigError(f"search.params.{key}: {error}") from error


@dataclass
class SearchSpace:
    """What a study optimises and over which values.

    Args:
        metric: a validation metric of the training loop (``recall@20``, ``ndcg@20``, ``auc``, ``logloss``...).
        direction: ``maximize`` or ``minimize``.
        params: dotted config key -> ``Param``.
        fixed: dotted config key -> the value every trial uses.

    Example:
        >>> space = SearchSpace.from_config({"metric": "recall@20", "params": {
        ...     "model.dim": {"type": "categorical", "choices": [32, 64]}}})
        >>> space.distributions()["model.dim"]
        CategoricalDistribution(choices=(32, 64))
    """

    metric: str
    direction: str = "maximize"
    params: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> SearchSpace:
        config = dict(config)
        unknown = set(config) - {"metric", "direction", "params", "fixed"}
        if unknown:
            raise ConfigError(f"search: unknown key(s) {sorted(unknown)}; expected metric, direction, params, fixed")
        if "metric" not in config:
            raise ConfigError("search.metric is missing: name the validation metric to optimise (e.g. recall@20)")
        params, fixed = {}, {str(k): v for k, v in dict(config.get("fixed") or {}).items()}
        for key in [*dict(config.get("params") or {}), *fixed]:
            if str(key).startswith("data."):
                raise ConfigError(f"search: {key}: a study tunes a model on one dataset; data.* is not searched")
        for key, spec in dict(config.get("params") or {}).items():
            try:
                params[str(key)] = Param(**dict(spec))
            except TypeError as error:
                raise ConfigError(f"search.params.{key}: {error}") from error
        space = cls(str(config["metric"]), str(config.get("direction", "maximize")), params, fixed)
        if space.direction not in DIRECTIONS:
            raise ConfigError(f"search.direction must be maximize or minimize, got {space.direction!r}")
        if not params:
            raise ConfigError("search.params is empty: name at least one config key to search")
        space.distributions()  # every param checked now, not at the first trial
        return space

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {key: param.distribution(key) for key, param in self.params.items()}


def tuned_config(groups: dict[str, str], params: dict, comment: str) -> str:
    """A Hydra config (``# @package _global_``) that selects the study's config ``groups`` and sets the best
    trial's ``params``: saved as ``<dir>/tuned/<study>.yaml``, ``python -m pipelines.train --config-dir <dir>
    +tuned=<study>`` trains it.

    Example:
        >>> print(tuned_config({"model": "mf_bpr"}, {"model.dim": 64}, "best of 3 trials"))
        # @package _global_
        # best of 3 trials
        defaults:
        - override /model: mf_bpr
        model:
          dim: 64
        <BLANKLINE>
    """
    nested: dict = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    body = {"defaults": [{f"override /{group}": choice} for group, choice in groups.items()], **nested}
    header = "# @package _global_\n" + "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(body, sort_keys=False)
