"""The plugin's user-facing errors: one base class the command line catches.

Every error a user can fix (a bad config key or value, a missing or malformed file, an encoder
that cannot be loaded, a damaged cache or checkpoint) is a :class:`UserError`. Its message is one
line naming the file, line or key and what was expected; ``cli.main`` prints it as
``error: <message>`` and exits with :data:`EXIT_USER_ERROR`. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or a broken file that the user can fix; the message is one line."""

    def __str__(self) -> str:  # one line, whatever the message was built from
        return " ".join(super().__str__().split())


class PluginConfigError(UserError, ValueError):
    """A model, dataset or config value that cannot be used; the message says which and why."""


class TowerConfigError(PluginConfigError):
    """A tower is configured wrongly; the message names the key."""


class PrepareError(UserError, ValueError):
    """Bad raw input to ``prepare``: ``<file>:<line>: <what was expected>``."""


class ImageStoreError(PrepareError):
    """An image folder, zip or LMDB image store that cannot be read."""


class EncoderLoadError(UserError, RuntimeError):
    """An encoder cannot be found or loaded; the message names the config key."""


class CacheError(UserError, RuntimeError):
    """A hidden-state cache that is missing, stale, incomplete or damaged; names the folder."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or written; names the file."""


class DownloadError(UserError, RuntimeError):
    """A dataset file that could not be fetched or failed its checksum; names URL and file."""
