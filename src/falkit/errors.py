"""Exceptions whose message tells the user what to do; the CLI prints them as one line, exit 2."""


class FalkitError(Exception):
    """Base class of every user-facing error (bad config, missing data, bad input)."""


class ConfigError(FalkitError):
    """The configuration is invalid: unknown key, impossible budget, bad value."""


class DataNotFoundError(FalkitError):
    """A dataset's files are not under any data root; the message says how to get them."""
