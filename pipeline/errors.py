"""Errors a user can act on.

Anything raised as an ``AceTurboError`` is printed by the CLI as one line ("Error: ...") with no
traceback: the message must name the file or setting at fault and say how to fix it. Bugs stay
ordinary exceptions so they keep their traceback.
"""
from __future__ import annotations


class AceTurboError(Exception):
    """Base class for user-facing errors (bad input, missing checkpoint, stale cache...)."""


class AudioDecodeError(AceTurboError):
    """An audio file could not be decoded (corrupt, empty, truncated or unsupported)."""


class DatasetError(AceTurboError):
    """The dataset folder or one of its files breaks a rule (see `aceturbo ingest --help`)."""


class ZipImportError(AceTurboError):
    """A ZIP archive was refused; nothing was written."""


class CheckpointError(AceTurboError):
    """A model checkpoint folder is missing or incomplete."""


class CacheError(AceTurboError):
    """The feature cache is missing, corrupt, or was made by other encoders/settings."""


class ConfigError(AceTurboError):
    """A setting has an invalid value."""


class DiskFullError(AceTurboError):
    """A write ran out of disk space (or quota); what was published before is intact."""


class LockHeldError(AceTurboError):
    """Another live process holds the lock of what this command would write (a run folder)."""


class MemoryLimitError(AceTurboError):
    """The model, its LoRA or a training step did not fit in GPU/CPU memory; the message names the
    settings to lower."""
