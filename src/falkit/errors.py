"""Exceptions whose message tells the user what to do; the CLI prints them as one line, exit 2."""


class FalkitError(Exception):
    """Base class of every user-facing error (bad config, missing data, bad input)."""


class ConfigError(FalkitError):
    """The configuration is invalid: unknown key, impossible budget, bad value."""


class DataNotFoundError(FalkitError):
    """A dataset's files are not under any data root; the message says how to get them."""


class RunLocked(FalkitError):
    """Another process is writing this run; `holder` is what its lock file says (pid, host,
    since when, its command). A sweep skips such a run instead of failing it."""

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder
