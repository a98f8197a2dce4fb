"""Atomic, durable file writes on any pyarrow filesystem: a local disk, a shared mount, S3 or GCS.

A trial writes its run files through this class, rooted at its trial directory on Tune's
storage, so the same code serves a laptop and a cluster whose driver is on another machine.
A write that does not fit raises DiskFullError and leaves the previous file intact.
Nothing here knows about Ray.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import pyarrow.fs as pafs

from crossdet_ray.durable import fsync_directory
from crossdet_ray.engine.errors import DiskFullError

if TYPE_CHECKING:
    import torch

# torch is imported where a checkpoint is saved or loaded: the driver writes its run files
# through this class and never needs torch itself (seconds of import on a small machine).

__all__ = ["DiskFullError", "RunStorage"]

_DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if code is not None
)
# Only checkpoints can be thinned by the user; other run files are small.
_CHECKPOINT_HINT = " (or --keep-checkpoints 1)"
_COPY_CHUNK_BYTES = 8 << 20


def _disk_full_cause(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error`, if any.

    torch.save reports a failed write to its file object as a RuntimeError whose context is
    the OSError, so the whole cause/context chain is searched.
    """
    if not isinstance(error, Exception):  # Ctrl-C stays Ctrl-C
        return None
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return current
        pending.extend((current.__cause__, current.__context__))
    return None


def _format_bytes(count: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _existing_ancestor(path: str) -> str:
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


class _ByteCounter:
    """A sink that keeps only the count: torch's serialized size without holding the bytes."""

    def __init__(self):
        self.count = 0

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self.count += size
        return size

    def flush(self) -> None:
        pass


def _serialized_size(obj: Any) -> int:
    import torch

    # A file object, not a path: torch names the archive after a path, changing the size.
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


class RunStorage:
    """A directory on a pyarrow filesystem; every write lands whole or not at all."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, options: str = ""):
        self.filesystem = filesystem
        self.root = root.rstrip("/") or "/"
        # A bucket URI's query (endpoint_override=...&scheme=http), kept so `full_uri` opens
        # the same store from another process.
        self.options = options

    @classmethod
    def from_uri(cls, uri_or_path: str) -> "RunStorage":
        """`s3://bucket/dir`, `gs://...` or a plain local path."""
        if "://" not in uri_or_path:
            path = str(Path(uri_or_path).expanduser().resolve())
            return cls(pafs.LocalFileSystem(), path)
        filesystem, path = pafs.FileSystem.from_uri(uri_or_path)
        return cls(filesystem, path, uri_or_path.partition("?")[2])

    @classmethod
    def for_file(cls, location: str | os.PathLike) -> tuple["RunStorage", str]:
        """(the folder's storage, the file's name) of a path or a bucket URI with its options
        (`s3://bucket/run/trial/checkpoints/best_map_model.pth?endpoint_override=...`)."""
        location = str(location)
        path, _, options = location.partition("?") if "://" in location else (location, "", "")
        folder, name = posixpath.split(path) if "://" in path else os.path.split(
            str(Path(path).expanduser().resolve()))
        return cls.from_uri(f"{folder}?{options}" if options else folder), name

    def load_torch_file(self, relative: str) -> Any:
        """`load_torch` of a file that must exist: FileNotFoundError (naming it) when not."""
        if self.filesystem.get_file_info(self.path(relative)).type != pafs.FileType.File:
            raise FileNotFoundError(self.uri(relative))
        return self.load_torch(relative)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def child(self, relative: str) -> "RunStorage":
        return RunStorage(self.filesystem, self.path(relative), self.options)

    def parent(self) -> "RunStorage":
        """The directory above (a trial's run directory)."""
        return RunStorage(self.filesystem, posixpath.dirname(self.root), self.options)

    def uri(self, relative: str = "") -> str:
        """A printable location: a plain path locally, scheme://path elsewhere."""
        full = self.path(relative)
        if self.is_local:
            return full
        scheme = {"s3": "s3", "gcs": "gs"}.get(self.filesystem.type_name, self.filesystem.type_name)
        return f"{scheme}://{full}"

    def full_uri(self, relative: str = "") -> str:
        """`uri` with the bucket URI's options: what `from_uri` opens again, anywhere."""
        uri = self.uri(relative)
        return f"{uri}?{self.options}" if self.options and not self.is_local else uri

    def makedirs(self, relative: str = "") -> None:
        self.filesystem.create_dir(self.path(relative), recursive=True)

    def exists(self, relative: str) -> bool:
        info = self.filesystem.get_file_info(self.path(relative))
        return info.type != pafs.FileType.NotFound

    def list_files(self, relative: str = "") -> list[str]:
        """Names of the plain files directly under `relative` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        return sorted(
            posixpath.basename(info.path)
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File
        )

    def read_bytes(self, relative: str) -> bytes:
        # A random-access file reads an object in large ranged requests; a stream of an S3
        # object is ~70x slower for a 200 MB checkpoint.
        with self.filesystem.open_input_file(self.path(relative)) as handle:
            return handle.read()

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write to a temporary name beside the target, then rename over it."""
        if self.is_local:
            def write_data(temporary: str) -> None:
                self._write_synced(temporary, lambda handle: handle.write(data))

            self._replace_local(relative, write_data, needed_bytes=lambda: memoryview(data).nbytes)
            return
        target = self.path(relative)
        try:
            self.filesystem.create_dir(posixpath.dirname(target), recursive=True)
            # Object stores publish an object only when its upload completes: already atomic.
            with self.filesystem.open_output_stream(target) as stream:
                stream.write(data)
        except Exception as error:
            self._raise_if_store_full(error, relative, memoryview(data).nbytes)
            raise

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def save_torch(self, obj: Any, relative: str) -> None:
        """torch.save, atomically, streaming through a local temporary file for remote stores."""
        import torch

        if self.is_local:
            def write_checkpoint(temporary: str) -> None:
                # Into the open file: it is fsynced before the rename, and its size is what
                # _serialized_size counts (torch names a path's archive after the file).
                self._write_synced(temporary, lambda handle: torch.save(obj, handle))

            self._replace_local(relative, write_checkpoint,
                                needed_bytes=lambda: _serialized_size(obj), hint=_CHECKPOINT_HINT)
            return
        target = self.path(relative)
        with tempfile.TemporaryDirectory() as staging:
            local = os.path.join(staging, "checkpoint.pth")
            try:
                with self._open_local_output(local) as handle:
                    torch.save(obj, handle)
            except Exception as error:
                cause = _disk_full_cause(error)
                if cause is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(local)  # before measuring what is free
                    raise self._local_disk_full(relative, _serialized_size(obj), staging, cause,
                                                staged=True) from error
                raise
            try:
                self.filesystem.create_dir(posixpath.dirname(target), recursive=True)
                pafs.copy_files(local, target, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.filesystem)
            except Exception as error:
                self._raise_if_store_full(error, relative, os.path.getsize(local), _CHECKPOINT_HINT)
                raise

    def load_torch(self, relative: str, map_location: str | torch.device = "cpu") -> Any:
        """torch.load with weights_only=True: a checkpoint can hold no code."""
        import torch

        if self.is_local:
            return torch.load(self.path(relative), map_location=map_location, weights_only=True)
        return torch.load(io.BytesIO(self.read_bytes(relative)), map_location=map_location,
                          weights_only=True)

    def copy(self, source_relative: str, target_relative: str) -> None:
        """Give a file a second name, atomically.

        Locally a hard link, so a multi-GB checkpoint is stored once however many names it
        has (best_model.pth, the final complete checkpoint); a server-side copy elsewhere.
        """
        source = self.path(source_relative)
        if not self.is_local:
            self.filesystem.copy_file(source, self.path(target_relative))
            return

        def link_or_copy(temporary: str) -> None:
            try:
                os.link(source, temporary)
            except OSError:  # a filesystem without hard links
                with open(source, "rb") as source_handle:
                    self._write_synced(temporary, lambda handle: shutil.copyfileobj(
                        source_handle, handle, _COPY_CHUNK_BYTES))

        self._replace_local(target_relative, link_or_copy,
                            needed_bytes=lambda: os.path.getsize(source), hint=_CHECKPOINT_HINT)

    def delete(self, relative: str) -> None:
        target = self.path(relative)
        if self.filesystem.get_file_info(target).type == pafs.FileType.File:
            self.filesystem.delete_file(target)

    def _replace_local(self, relative: str, fill_temporary: Callable[[str], None],
                       needed_bytes: Callable[[], int], hint: str = "") -> None:
        """Put a local file in place whole or not at all, and durably.

        `fill_temporary` leaves the complete file, synced, at the temporary path it is given;
        it is renamed over the target and the directory synced so the rename is durable too.
        On any failure, Ctrl-C included, the temporary file is removed and the target keeps
        its previous content; running out of space becomes DiskFullError.
        """
        target = self.path(relative)
        directory = posixpath.dirname(target)
        # run_logs.PARTIAL_FILE recognises this pattern to clean up after a crash.
        temporary = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(directory, exist_ok=True)
            fill_temporary(temporary)
            os.replace(temporary, target)
        except BaseException as error:
            with contextlib.suppress(OSError):  # the original error matters more
                os.remove(temporary)
            cause = _disk_full_cause(error)
            if cause is not None:
                raise self._local_disk_full(relative, needed_bytes(), directory, cause,
                                            hint=hint) from error
            raise
        fsync_directory(directory)

    def _write_synced(self, path: str, write: Callable[[BinaryIO], object]) -> None:
        with self._open_local_output(path) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())

    def _open_local_output(self, path: str) -> BinaryIO:
        """Every local write opens its file here (a seam to simulate a small disk in tests)."""
        return open(path, "wb")

    def _local_free_bytes(self, directory: str) -> int:
        return shutil.disk_usage(directory).free

    def _local_disk_full(self, relative: str, needed: int, directory: str, cause: OSError,
                         hint: str = "", staged: bool = False) -> DiskFullError:
        directory = _existing_ancestor(directory)
        free = self._local_free_bytes(directory)
        shortfall = needed - free
        remedy = (f"free at least {_format_bytes(shortfall)} more" if shortfall > 0
                  else "free some space")
        reason = "" if cause.errno == errno.ENOSPC else f" ({_one_line(cause.strerror)})"
        if staged:
            action = f"could not stage {self.uri(relative)} in {tempfile.gettempdir()}"
            hint = " (or set TMPDIR to a larger disk)"
        else:
            action = f"could not write {self.uri(relative)}"
        message = (f"disk full{reason}: {action} ({_format_bytes(needed)}) on "
                   f"{_mount_point(directory)}: {_format_bytes(free)} free; {remedy}{hint}, "
                   f"then --resume")
        return DiskFullError(message, self.uri(relative), needed, free)

    def _raise_if_store_full(self, error: Exception, relative: str, needed: int,
                             hint: str = "") -> None:
        """Raise DiskFullError if a remote store reported `error` for lack of space."""
        cause = _disk_full_cause(error)
        if cause is None:
            return
        message = (f"disk full: could not write {self.uri(relative)} ({_format_bytes(needed)}): "
                   f"the store reports \"{_one_line(cause.strerror or cause)}\"; free space "
                   f"there{hint}, then --resume")
        raise DiskFullError(message, self.uri(relative), needed, None) from error
