"""Errors the engine raises for its users; importable without Ray."""

from __future__ import annotations

import errno


class DiskFullError(OSError):
    """A run file did not fit on its storage; the previous file of that name is intact.

    `path` is the printable location of the file, `needed_bytes` the size of what was being
    written and `free_bytes` the space left on that filesystem after the failed write was
    cleaned up (None when a remote store reported the error and cannot say).
    """

    def __init__(self, message: str, path: str, needed_bytes: int, free_bytes: int | None):
        super().__init__(errno.ENOSPC, message)
        self.path = path
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes

    def __str__(self) -> str:
        # The one-line message alone: OSError would prefix "[Errno 28] ".
        return self.strerror

    def __reduce__(self):
        # Ray ships a trial's exception to the driver by pickling; OSError's own reduce would
        # call __init__ with (errno, message).
        return type(self), (self.strerror, self.path, self.needed_bytes, self.free_bytes)
