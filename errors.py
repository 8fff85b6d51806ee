"""The errors a user can cause or meet, each with a message that names the setting and a fix.

main.py turns a ValueError below into one line on stderr and exit code 2 (nothing was written),
RunStopped into one line and exit code 1 (the run started and cannot go on).
"""


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and a valid example."""


class DataError(ValueError):
    """Data that cannot be found, read or used; the message names the setting and a fix."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, or of another model."""


class RunStopped(RuntimeError):
    """Training cannot go on (no disk space, non-finite values, a run directory in use)."""


class DiskFullError(RunStopped):
    """Not enough disk space to write a checkpoint, even after deleting old periodic ones."""
