"""A dataset in a bucket: `--data s3://bucket/prefix`, `gs://...`, or any URI pyarrow's
filesystems open (`?endpoint_override=host:port&scheme=http` for an S3-compatible server).

Two steps, neither of which knows about Ray:
- `inspect_remote_dataset` (the driver's preflight): lists the prefix, reads every label file
  and the first bytes of every frame (a ranged read: its `.npy` header), in parallel, and runs
  the folder preflight (`check_dataset`) on what it read. The listing it returns (each file's
  size and ETag) is what every node later checks its copy against.
- `fetch_remote_dataset` (each node): downloads the listed files once into the node's cache,
  however many processes ask at once: the first takes a lock and downloads with parallel
  streams into a staging folder, renamed into place when every file is verified; the others
  wait for it and re-use the result. A cut download keeps its verified files and fetches the
  rest; an object that changed since the listing is refused, naming it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from crossdet_ray.data.errors import DatasetError
from crossdet_ray.data.index import FRAME_SUFFIX, IMAGES_DIR, LABEL_SUFFIX, LABELS_DIR
from crossdet_ray.data.labels import YoloLabels, parse_yolo_labels
from crossdet_ray.data.npy_header import NpyHeader, parse_npy_header
from crossdet_ray.durable import fsync_directory

logger = logging.getLogger(__name__)

PREFLIGHT_STREAMS = 32  # requests in flight while the driver reads labels and headers
FETCH_STREAMS = 16  # downloads in flight on a node
HEADER_BYTES = 1024  # numpy.save's header is 128 bytes for a plain array; more is re-read
COMPLETE_MARK = ".crossdet_complete.json"  # written last into a finished cache folder
_CHUNK_BYTES = 8 << 20


class DatasetChangedError(DatasetError):
    """An object differs from the listing the run's preflight took."""


def is_remote(location: str | os.PathLike | None) -> bool:
    """A bucket URI (s3://, gs://, ...), not a local path."""
    text = str(location or "")
    return "://" in text and not text.startswith("file://")


def printable_uri(uri: str) -> str:
    """The URI without its query (endpoint options) or any key in it, for messages."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]  # s3://KEY:SECRET@bucket/...: never printed
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


@dataclass(frozen=True)
class RemoteFile:
    relative: str  # "images/<stem>.npy" or "labels/<stem>.txt"
    size: int
    etag: str | None = None  # None where the store gives none


@dataclass
class RemoteListing:
    """The dataset's files as the preflight saw them; the run records its fingerprint."""

    uri: str  # as given, with its query
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for item in sorted(self.files, key=lambda f: f.relative):
            digest.update(f"{item.relative}\0{item.size}\0{item.etag or ''}\n".encode())
        return digest.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.files)

    def to_json(self) -> str:
        return json.dumps({"uri": self.uri, "fingerprint": self.fingerprint,
                           "files": [[f.relative, f.size, f.etag] for f in self.files]})

    @classmethod
    def from_json(cls, text: str) -> "RemoteListing":
        data = json.loads(text)
        listing = cls(data["uri"], [RemoteFile(r, int(s), e) for r, s, e in data["files"]])
        if data.get("fingerprint") not in (None, listing.fingerprint):
            raise DatasetError(f"the dataset listing of {printable_uri(listing.uri)} is damaged "
                               "(its fingerprint does not match its files)")
        return listing


def open_remote(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) of a dataset URI; DatasetError when pyarrow cannot open it."""
    try:
        filesystem, base = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:
        raise DatasetError(f"--data {printable_uri(uri)}: cannot open this URI ({error}); use "
                           "s3://bucket/prefix or gs://bucket/prefix (an S3-compatible server: "
                           "add ?endpoint_override=HOST:PORT&scheme=http)") from error
    return filesystem, base.rstrip("/")


def _etag(metadata: dict) -> str | None:
    for key in (b"ETag", "ETag", b"etag", "etag"):
        if key in metadata:
            value = metadata[key]
            return (value.decode() if isinstance(value, bytes) else str(value)).strip('"')
    return None


class RemoteFiles:
    """A bucket dataset read ahead for the preflight: label texts and frame headers in memory.

    Implements `data.index.DatasetFiles`, so `check_dataset` checks it as it checks a folder;
    a problem with one object is raised when the check reaches it, naming the object's URI.
    """

    def __init__(self, uri: str, names: dict[str, dict[str, str]],
                 labels: dict[str, YoloLabels | DatasetError],
                 headers: dict[str, NpyHeader | DatasetError]):
        self.uri = uri
        self._names, self._labels, self._headers = names, labels, headers

    def where(self, relative: str = "") -> str:
        base = printable_uri(self.uri)
        return f"{base}/{relative}" if relative else base

    def names(self, folder: str, suffix: str) -> dict[str, str] | None:
        return self._names.get(folder)

    def labels(self, relative: str) -> YoloLabels:
        return _raise_or_return(self._labels[relative])

    def header(self, relative: str) -> NpyHeader:
        return _raise_or_return(self._headers[relative])


def _raise_or_return(value):
    if isinstance(value, DatasetError):
        raise value
    return value


def _list(filesystem: pafs.FileSystem, base: str, uri: str) -> dict[str, int]:
    """{relative path: size} of the plain files directly under images/ and labels/."""
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True,
                                                           allow_not_found=True))
    except OSError as error:
        raise DatasetError(f"{printable_uri(uri)}: cannot list the dataset ({error}); check the "
                           "bucket name and that this machine's credentials may read it") from error
    found = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(base):].lstrip("/")
        folder, _, name = relative.partition("/")
        if folder in (IMAGES_DIR, LABELS_DIR) and name and "/" not in name:
            found[relative] = int(info.size)
    return found


def inspect_remote_dataset(uri: str, test_size: float = 0.2,
                           streams: int = PREFLIGHT_STREAMS):
    """The preflight of a bucket dataset: (listing, DatasetReport); DatasetError naming the
    object to fix, before any trial starts."""
    from crossdet_ray.data.check import check_dataset

    filesystem, base = open_remote(uri)
    sizes = _list(filesystem, base, uri)
    if not sizes:
        raise DatasetError(f"{printable_uri(uri)}: no {IMAGES_DIR}/ or {LABELS_DIR}/ objects "
                           f"under this prefix; pass the prefix that holds {IMAGES_DIR}/ and "
                           f"{LABELS_DIR}/")
    names: dict[str, dict[str, str]] = {}
    for relative in sizes:
        folder, name = relative.split("/", 1)
        suffix = FRAME_SUFFIX if folder == IMAGES_DIR else LABEL_SUFFIX
        if name.endswith(suffix):
            names.setdefault(folder, {})[name[: -len(suffix)]] = name
    files = RemoteFiles(uri, names, {}, {})
    etags: dict[str, str | None] = {}

    def where(relative: str) -> str:
        return files.where(relative)

    def unreadable(relative: str, error: OSError) -> DatasetError:
        return DatasetError(f"{where(relative)}: cannot be read ({error}); check that this "
                            "machine's credentials may read it")

    def read_label(relative: str):
        try:
            with filesystem.open_input_file(f"{base}/{relative}") as handle:
                etags[relative] = _etag(handle.metadata())
                data = handle.read()
            return parse_yolo_labels(data.decode("utf-8"), where(relative))
        except UnicodeDecodeError as error:
            return DatasetError(f"{where(relative)}: not a text file ({error})")
        except DatasetError as error:
            return error
        except OSError as error:
            return unreadable(relative, error)

    def read_header(relative: str):
        try:
            with filesystem.open_input_file(f"{base}/{relative}") as handle:
                etags[relative] = _etag(handle.metadata())
                size = handle.size()
                head = handle.read_at(min(HEADER_BYTES, size), 0)
                try:
                    return parse_npy_header(io.BytesIO(head), size, where(relative))
                except DatasetError:
                    if size <= len(head):
                        raise
                    # A long header (many-field dtypes, format 2.0): read as much as it can be.
                    head = handle.read_at(min(size, 1 << 20), 0)
                    return parse_npy_header(io.BytesIO(head), size, where(relative))
        except DatasetError as error:
            return error
        except OSError as error:
            return unreadable(relative, error)

    label_paths = [f"{LABELS_DIR}/{n}" for n in names.get(LABELS_DIR, {}).values()]
    frame_paths = [f"{IMAGES_DIR}/{n}" for n in names.get(IMAGES_DIR, {}).values()]
    with ThreadPoolExecutor(max_workers=streams) as pool:
        files._labels.update(zip(label_paths, pool.map(read_label, label_paths)))
        files._headers.update(zip(frame_paths, pool.map(read_header, frame_paths)))
    report = check_dataset(uri, test_size=test_size, files=files)
    listing = RemoteListing(uri, [RemoteFile(r, sizes[r], etags.get(r))
                                  for r in sorted(label_paths + frame_paths)])
    return listing, report


# -- a node's copy ---------------------------------------------------------------------------
@dataclass
class FetchRecord:
    """What a node did to have the dataset: for the trial's log and training_info.json."""

    uri: str
    path: str
    fingerprint: str
    reused: bool  # the node's cache already held it (this process downloaded nothing)
    files: int
    bytes_downloaded: int
    seconds: float
    waited_seconds: float  # for another process of this node that was downloading it

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "uri": printable_uri(self.uri),
                "megabytes_per_second": round(self.megabytes_per_second, 2)}

    def describe(self) -> str:
        if self.reused:
            waited = (f" after waiting {self.waited_seconds:.1f} s for another process to fetch "
                      "it" if self.waited_seconds >= 0.5 else "")
            return (f"dataset {printable_uri(self.uri)}: re-using this node's copy at "
                    f"{self.path}{waited}")
        return (f"dataset {printable_uri(self.uri)}: fetched {self.files} files, "
                f"{self.bytes_downloaded / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.megabytes_per_second:.1f} MB/s) into {self.path}")


def cache_folder(listing: RemoteListing, cache: Path) -> Path:
    """One folder per listing: a dataset changed in the bucket is a new folder, never mixed."""
    name = posixpath.basename(urlsplit(listing.uri).path.rstrip("/")) or "dataset"
    return cache / "remote" / f"{name}-{listing.fingerprint[:16]}"


def fetch_remote_dataset(listing: RemoteListing, cache: Path,
                         streams: int = FETCH_STREAMS) -> FetchRecord:
    """The dataset's folder on this node, downloaded once and verified against `listing`."""
    target = cache_folder(listing, cache)
    started = time.monotonic()
    if (target / COMPLETE_MARK).is_file():
        return _record(listing, target, reused=True, files=0, downloaded=0, seconds=0.0,
                       waited=0.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("dataset %s: another process on this node is fetching it; waiting",
                        printable_uri(listing.uri))
            fcntl.flock(lock, fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if (target / COMPLETE_MARK).is_file():
            return _record(listing, target, reused=True, files=0, downloaded=0, seconds=0.0,
                           waited=waited)
        files, downloaded = _download(listing, Path(f"{target}.staging"), streams)
        staging = Path(f"{target}.staging")
        (staging / COMPLETE_MARK).write_text(json.dumps(
            {"uri": printable_uri(listing.uri), "fingerprint": listing.fingerprint,
             "files": len(listing.files), "bytes": listing.total_bytes}))
        os.rename(staging, target)
        fsync_directory(target.parent)
        seconds = time.monotonic() - started - waited
        return _record(listing, target, reused=False, files=files, downloaded=downloaded,
                       seconds=seconds, waited=waited)


def _record(listing: RemoteListing, target: Path, *, reused: bool, files: int,
            downloaded: int, seconds: float, waited: float) -> FetchRecord:
    return FetchRecord(uri=listing.uri, path=str(target), fingerprint=listing.fingerprint,
                       reused=reused, files=files, bytes_downloaded=downloaded,
                       seconds=seconds, waited_seconds=waited)


def _download(listing: RemoteListing, staging: Path, streams: int) -> tuple[int, int]:
    """Every listed file not yet verified in `staging`: (files, bytes) downloaded now."""
    filesystem, base = open_remote(listing.uri)
    for folder in (IMAGES_DIR, LABELS_DIR):
        (staging / folder).mkdir(parents=True, exist_ok=True)
    # A file is renamed from .part only once verified: one of the right size is complete.
    missing = [item for item in listing.files
               if not ((staging / item.relative).is_file()
                       and (staging / item.relative).stat().st_size == item.size)]

    def fetch(item: RemoteFile) -> int:
        where = f"{printable_uri(listing.uri)}/{item.relative}"
        part = staging / f"{item.relative}.part"
        count = 0
        try:
            with filesystem.open_input_stream(f"{base}/{item.relative}") as source, \
                    open(part, "wb") as sink:
                etag = _etag(source.metadata())
                if item.etag and etag and etag != item.etag:
                    raise DatasetChangedError(
                        f"{where}: changed after the run's preflight (ETag {etag}, listed "
                        f"{item.etag}); a dataset must not change during a run: restore it, "
                        "or start a new run (its preflight lists the new version)")
                while chunk := source.read(_CHUNK_BYTES):
                    sink.write(chunk)
                    count += len(chunk)
        except DatasetChangedError:
            part.unlink(missing_ok=True)
            raise
        except FileNotFoundError as error:
            part.unlink(missing_ok=True)
            raise DatasetChangedError(f"{where}: removed after the run's preflight; restore it "
                                      "or start a new run") from error
        except OSError as error:
            part.unlink(missing_ok=True)
            raise DatasetError(f"{where}: download failed ({error}); check this node's "
                               "credentials and network, then resume the run") from error
        if count != item.size:
            part.unlink(missing_ok=True)
            raise DatasetChangedError(
                f"{where}: {count} bytes downloaded, the run's preflight listed {item.size}; "
                "the object changed after the preflight: restore it, or start a new run")
        os.replace(part, staging / item.relative)
        return count

    with ThreadPoolExecutor(max_workers=streams) as pool:
        downloaded = sum(pool.map(fetch, missing))
    return len(missing), downloaded
