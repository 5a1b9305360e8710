"""Hydra entry points (prepare, train, register, promote, batch_score, demo); importing the package registers the
config resolvers they use (``pipelines.config``)."""

from pipelines.config import register_resolvers

register_resolvers()
