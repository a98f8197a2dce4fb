"""Durable renames: the one directory fsync that the run's files (engine/storage.py) and a
node's dataset cache (data/remote.py) share. No torch, no Ray."""

from __future__ import annotations

import errno
import os


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` survive a power loss, not only the renamed file's data."""
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    except OSError as error:
        # Some network and FUSE filesystems cannot sync a directory; the rename stands anyway.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(descriptor)
