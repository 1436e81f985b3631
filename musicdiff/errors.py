"""Errors that reach the user as one clear line."""

from collections.abc import Iterable, Mapping


class ConfigError(ValueError):
    """A config value is wrong. The message names the key and says how to fix it."""


class DataError(ValueError):
    """Input data cannot be used. The message names the file and says what to do."""


class DistributedError(RuntimeError):
    """The processes of a multi-host job cannot work together (joining timed out, a peer is gone). The message
    names this process, the coordinator and what to check."""


class ShardingContextError(RuntimeError):
    """Model code was traced outside `sharding_context` / `unsharded()` (musicdiff/parallel/sharding.py), where its
    sharding constraints would have been dropped without a word."""


def refuse_unknown_options(values: Mapping, known: Iterable[str], where: str, what: str) -> None:
    """ConfigError naming the first key of `values` that is not among `known` (e.g. a misspelt model option)."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: not {what} option; options are {', '.join(known)}")
