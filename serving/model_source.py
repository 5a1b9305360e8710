"""Where the served model comes from (an MLflow registry URI or a package directory) and the holder that swaps it.

``models:/<name>@<alias>`` is resolved to a version first, and that exact version is downloaded, so the version
reported is the one loaded even when the alias moves meanwhile (``recsys.tracking.registry.fetched_package``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from recsys.errors import ConfigError
from recsys.inference.scorers import CTRScorer, Recommender, load
from recsys.tracking.registry import fetched_package
from serving.errors import LoadFailed, ReloadBusy, error_reference
from serving.settings import ServingSettings

log = logging.getLogger("serving")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and what it is: registered ``name`` and ``version`` (a package directory: its name and a hash of
    its metadata, ``sha-<12 hex>``), the URI it was loaded from, its family, and the bytes it holds by part
    (``model.memory()``, measured once it is warm)."""

    model: Recommender | CTRScorer
    name: str
    version: str
    uri: str
    family: str
    seconds: float
    memory: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "uri": self.uri, "family": self.family,
                "load_seconds": round(self.seconds, 3), "bytes": sum(self.memory.values())}


def load_model(settings: ServingSettings) -> LoadedModel:
    """Fetches ``settings.model_uri`` (``recsys.tracking.registry.fetched_package``: an alias is resolved to its version
    first), loads the package with the settings' tables and index, and warms it up.

    Raises:
        ConfigError: the URI names no registered version or no package directory.
    """
    began = time.perf_counter()
    with fetched_package(settings.model_uri, settings.tracking_uri, quiet=True) as fetched:
        model = load(fetched.directory, tables=settings.tables, index=settings.index)
    _warm_up(model)
    return LoadedModel(model, fetched.name, fetched.version, settings.model_uri, model.family,
                       time.perf_counter() - began, model.memory())


def _warm_up(model: Recommender | CTRScorer) -> None:
    """Builds what the first query would build lazily (the FAISS item index), so requests after a swap are not slow."""
    if isinstance(model, Recommender) and model.n_items > 1:
        model.recommend(np.array([-1]), 1, [np.array([1])])
        model.similar(1, 1)


class ModelHolder:
    """The served model. A request reads ``current`` once and uses that object to the end, so a swap never changes
    the model under an in-flight request; ``reload`` loads the next one first and only then swaps.

    Args:
        settings: what to load.
        loader: ``settings -> LoadedModel`` (``load_model``; replaceable in tests).
    """

    def __init__(self, settings: ServingSettings, loader=load_model):
        self.settings, self.loader = settings, loader
        self.current: LoadedModel | None = None
        self.error: str | None = None  # why the last load failed, as clients may read it (an error reference)
        self._reloading = threading.Lock()

    @property
    def busy(self) -> bool:
        """A load is running."""
        return self._reloading.locked()

    def reload(self) -> tuple[LoadedModel, LoadedModel | None]:
        """Loads the model (blocking: call it from a worker thread) and swaps it in; returns (new, previous).

        Raises:
            ReloadBusy: another reload is running.
            LoadFailed: resolving or loading failed; the previous model keeps serving.
        """
        if not self._reloading.acquire(blocking=False):
            raise ReloadBusy("a reload is already running; try again when it has finished")
        try:
            try:
                new = self.loader(self.settings)
            except Exception as error:
                # The details (exception class, tracking URI, paths) go to the log only; clients get the reference.
                reference = error_reference()
                log.error("loading %s failed [error %s]: %s: %s", self.settings.model_uri, reference,
                          type(error).__name__, error,
                          exc_info=not isinstance(error, ConfigError))  # a ConfigError's message says it all
                self.error = f"the model could not be loaded (error reference {reference}; the server log has the details)"
                serving = f"still serving version {self.current.version}" if self.current else "no model is loaded"
                raise LoadFailed(f"loading the model failed ({serving}): error reference {reference}; "
                                 f"the server log has the details") from error
            previous, self.current, self.error = self.current, new, None
            log.info("serving %s version %s (%s), loaded in %.2fs", new.name, new.version, new.family, new.seconds)
            return new, previous
        finally:
            self._reloading.release()
