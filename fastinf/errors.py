"""Typed errors. Each message says what was expected, what was found, and what to do."""
from __future__ import annotations


class FastinfError(Exception):
    """Base class of every error fastinf raises on purpose."""


class ConfigError(FastinfError, ValueError):
    """A bad argument or configuration value."""


class SelectorError(ConfigError):
    """A layer selector is malformed or matches no unit."""


class DataError(FastinfError, ValueError):
    """The dataset is empty, lacks a column, or has labels the model cannot produce."""


class StoreError(FastinfError):
    """A GradientStore is missing, incomplete, corrupt or locked."""


class StoreMismatchError(StoreError):
    """Two stores (or a store and a request) disagree on model, units, projection or seed."""


class CorruptStoreError(StoreError):
    """A shard's bytes do not match its checksum, or a file is truncated."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class NonFiniteError(FastinfError, ValueError):
    """NaN/inf values were found; the message names the sample ids."""


class BackendError(FastinfError, RuntimeError):
    """A compiled or GPU backend is missing or failed; the message says how to get it."""
