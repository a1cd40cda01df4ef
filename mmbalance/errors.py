"""Exception types shared by the engine, methods and dataset loaders.

Every message names the dataset / file / key / value at fault and what was expected.
"""
from __future__ import annotations


class MMBalanceError(Exception):
    """Base class of every error mmbalance raises on purpose (the CLI turns it into exit code 2)."""


class ConfigError(MMBalanceError, ValueError):
    """A configuration value, key or file is invalid."""


class RegistryError(MMBalanceError, KeyError):
    """Unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(MMBalanceError, FileNotFoundError):
    """Dataset files are missing; the message gives the expected layout and how to prepare it."""


class DatasetFormatError(MMBalanceError, ValueError):
    """Dataset files exist but are malformed (missing key, wrong shape, empty split, ...)."""


class MethodNotApplicable(MMBalanceError):
    """A method cannot run on this dataset/task/model; the message says why (shown as n/a)."""


class BackboneNotFoundError(MMBalanceError, FileNotFoundError):
    """A pretrained backbone path/cache entry does not exist."""


class CacheFormatError(MMBalanceError, ValueError):
    """A cache directory exists but does not hold what its fingerprint promises."""


class InsufficientDiskError(MMBalanceError, OSError):
    """A cache or conversion would not fit in the free space; the message gives both numbers."""


class NonFiniteLossError(MMBalanceError, FloatingPointError):
    """The training loss became NaN or inf."""


class RunInterrupted(Exception):
    """The run stopped at a safe point after SIGTERM/SIGINT; its folder resumes with ``--resume``.
    Not an :class:`MMBalanceError`: the CLI exits with 128 + the signal number, not 2."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class RunFileWriteError(MMBalanceError, OSError):
    """A run or report file could not be written (full disk, no permission); the previous file is intact."""
