"""Errors that reach the user as one clear line."""


class ConfigError(ValueError):
    """A config value is wrong. The message names the key and says how to fix it."""


class DataError(ValueError):
    """Input data cannot be used. The message names the file and says what to do."""
