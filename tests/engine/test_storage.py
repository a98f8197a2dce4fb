"""RunStorage writes land whole and durably, or not at all, and a full disk says so plainly."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import uuid

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

from crossdet_ray.engine.storage import DiskFullError, RunStorage

MIB = 1 << 20
CHECKPOINT = "checkpoints/epoch_002.pth"


def _temporary_files(directory) -> list[str]:
    return [name for _, _, names in os.walk(directory) for name in names if ".tmp-" in name]


def _torch_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


SIZE = r"\d+(?:\.\d)? [kMGT]?B"
LOCAL_DISK_FULL = re.compile(
    rf"disk full: could not write (?P<path>\S+) \((?P<needed>{SIZE})\) on (?P<mount>\S+): "
    rf"(?P<free>{SIZE}) free; free at least (?P<more>{SIZE}) more"
    r"(?P<hint> \(or --keep-checkpoints 1\))?, then --resume")


def _is_about(shown: str, count: int) -> bool:
    """Whether a size as the message shows it ("892.9 kB") rounds `count` bytes."""
    number, unit = shown.split()
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
    return abs(float(number) * scale - count) <= 0.05 * scale


def _assert_reports(error: DiskFullError, storage: RunStorage, relative: str, needed: int,
                    disk) -> re.Match:
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert error.path == storage.uri(relative)
    assert error.needed_bytes == needed
    assert error.free_bytes == disk.free_bytes()
    shown = LOCAL_DISK_FULL.fullmatch(str(error))
    assert shown, str(error)
    assert shown["path"] == storage.uri(relative)
    assert shown["mount"] == disk.mount_point
    assert _is_about(shown["needed"], needed)
    assert _is_about(shown["free"], error.free_bytes)
    assert _is_about(shown["more"], needed - error.free_bytes)
    return shown


def test_a_checkpoint_that_does_not_fit_raises_disk_full_and_keeps_the_previous_one(small_disk):
    disk = small_disk(2 * MIB)
    storage = disk.storage()
    previous = {"w": torch.arange(1000, dtype=torch.float32)}
    storage.save_torch(previous, CHECKPOINT)
    too_big = {"w": torch.ones(1_000_000)}  # 4 MB

    with pytest.raises(DiskFullError) as caught:
        storage.save_torch(too_big, CHECKPOINT)

    shown = _assert_reports(caught.value, storage, CHECKPOINT, _torch_size(too_big), disk)
    assert shown["hint"]
    assert _temporary_files(disk.path) == []
    kept = torch.load(storage.path(CHECKPOINT), weights_only=True)
    assert torch.equal(kept["w"], previous["w"])


@pytest.mark.parametrize("as_text", [False, True], ids=["write_bytes", "write_text"])
def test_a_file_that_does_not_fit_raises_disk_full_and_keeps_the_previous_one(small_disk,
                                                                              as_text):
    disk = small_disk(2 * MIB)
    storage = disk.storage()
    storage.write_text("logs/epochs.csv", "epoch,loss\n1,0.5\n")
    too_big = "x" * (3 * MIB)

    with pytest.raises(DiskFullError) as caught:
        if as_text:
            storage.write_text("logs/epochs.csv", too_big)
        else:
            storage.write_bytes("logs/epochs.csv", too_big.encode())

    shown = _assert_reports(caught.value, storage, "logs/epochs.csv", 3 * MIB, disk)
    assert not shown["hint"]  # thinning checkpoints is advice for checkpoints only
    assert _temporary_files(disk.path) == []
    assert storage.read_text("logs/epochs.csv") == "epoch,loss\n1,0.5\n"


def test_a_copy_without_hard_links_that_does_not_fit_raises_disk_full(small_disk, monkeypatch):
    disk = small_disk(2 * MIB)
    storage = disk.storage()
    storage.write_bytes(CHECKPOINT, b"n" * 1_200_000)
    storage.write_bytes("checkpoints/best_model.pth", b"previous best")

    def no_hard_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    with pytest.raises(DiskFullError) as caught:
        storage.copy(CHECKPOINT, "checkpoints/best_model.pth")

    _assert_reports(caught.value, storage, "checkpoints/best_model.pth", 1_200_000, disk)
    assert _temporary_files(disk.path) == []
    assert storage.read_bytes("checkpoints/best_model.pth") == b"previous best"


def test_the_write_that_did_not_fit_succeeds_once_the_disk_is_larger(small_disk):
    disk = small_disk(2 * MIB)
    storage = disk.storage()
    checkpoint = {"w": torch.ones(1_000_000)}
    with pytest.raises(DiskFullError):
        storage.save_torch(checkpoint, CHECKPOINT)

    disk.resize(8 * MIB)
    storage.save_torch(checkpoint, CHECKPOINT)

    assert torch.equal(storage.load_torch(CHECKPOINT)["w"], checkpoint["w"])
    assert _temporary_files(disk.path) == []


class _Unpicklable:
    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        raise self.error


@pytest.mark.parametrize("error", [ValueError("cannot pickle"), KeyboardInterrupt()],
                         ids=["exception", "ctrl-c"])
def test_a_checkpoint_failing_mid_write_leaves_no_temporary_file(tmp_path, error):
    storage = RunStorage.from_uri(str(tmp_path))
    storage.save_torch({"w": torch.zeros(3)}, CHECKPOINT)

    with pytest.raises(type(error)):
        storage.save_torch({"w": torch.ones(3), "extra": _Unpicklable(error)}, CHECKPOINT)

    assert _temporary_files(tmp_path) == []
    assert torch.equal(storage.load_torch(CHECKPOINT)["w"], torch.zeros(3))


@pytest.mark.parametrize("failing, error", [("replace", OSError(errno.EIO, "I/O error")),
                                            ("fsync", KeyboardInterrupt())],
                         ids=["rename-fails", "ctrl-c-at-fsync"])
def test_a_file_failing_mid_write_leaves_no_temporary_file(tmp_path, monkeypatch, failing,
                                                           error):
    storage = RunStorage.from_uri(str(tmp_path))
    storage.write_text("config.json", "{}")

    def fail(*args):
        raise error

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(type(error)) as caught:
        storage.write_text("config.json", '{"epochs": 3}')
    monkeypatch.undo()

    assert not isinstance(caught.value, DiskFullError)
    assert _temporary_files(tmp_path) == []
    assert storage.read_text("config.json") == "{}"


def test_a_hard_link_failing_to_take_its_name_leaves_no_temporary_file(tmp_path, monkeypatch):
    storage = RunStorage.from_uri(str(tmp_path))
    storage.write_bytes(CHECKPOINT, b"new")
    storage.write_bytes("checkpoints/best_model.pth", b"previous best")

    def fail(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        storage.copy(CHECKPOINT, "checkpoints/best_model.pth")
    monkeypatch.undo()

    assert _temporary_files(tmp_path) == []
    assert storage.read_bytes("checkpoints/best_model.pth") == b"previous best"


@pytest.mark.parametrize("write", [
    lambda storage: storage.write_bytes(CHECKPOINT, b"data"),
    lambda storage: storage.save_torch({"w": torch.ones(2)}, CHECKPOINT),
], ids=["write_bytes", "save_torch"])
def test_the_file_is_synced_before_the_rename_and_its_directory_after(tmp_path, monkeypatch,
                                                                      write):
    storage = RunStorage.from_uri(str(tmp_path))
    storage.makedirs("checkpoints")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def recording_replace(source, target):
        events.append(("replace", source, target))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write(storage)

    target = storage.path(CHECKPOINT)
    temporary = events[1][1]
    assert temporary.startswith(f"{target}.tmp-")
    assert events == [("fsync", temporary), ("replace", temporary, target),
                      ("fsync", os.path.dirname(target))]


def test_a_hard_link_is_made_durable_by_syncing_its_directory(tmp_path, monkeypatch):
    storage = RunStorage.from_uri(str(tmp_path))
    storage.write_bytes(CHECKPOINT, b"data")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    storage.copy(CHECKPOINT, "checkpoints/best_model.pth")

    assert synced == [str(tmp_path / "checkpoints")]
    assert os.stat(storage.path("checkpoints/best_model.pth")).st_ino == \
        os.stat(storage.path(CHECKPOINT)).st_ino


def test_disk_full_error_survives_pickling():
    error = DiskFullError("disk full: could not write /runs/x.pth (2.0 MB) on /runs: ...",
                          "/runs/x.pth", 2_000_000, 12)

    copy = pickle.loads(pickle.dumps(error))

    assert (type(copy), str(copy), copy.path, copy.needed_bytes, copy.free_bytes) == \
        (DiskFullError, str(error), "/runs/x.pth", 2_000_000, 12)


class _RefusingSink:
    def __init__(self, error: OSError):
        self.error = error
        self.closed = False

    def write(self, data):
        raise self.error

    def flush(self):
        pass

    def close(self):
        self.closed = True


class _RefusingUploads(pafs.FSSpecHandler):
    """An in-memory object store whose uploads fail with `error`."""

    def __init__(self, error: OSError):
        super().__init__(fsspec.filesystem("memory"))
        self.error = error

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_RefusingSink(self.error), mode="w")


def _remote_storage(error: OSError) -> RunStorage:
    return RunStorage(pafs.PyFileSystem(_RefusingUploads(error)), f"/bucket/{uuid.uuid4().hex}")


@pytest.fixture
def staging_dir(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(staging))
    return staging


def test_a_remote_store_out_of_space_raises_disk_full(staging_dir):
    storage = _remote_storage(OSError(errno.ENOSPC, "No space left on device"))
    checkpoint = {"w": torch.ones(1000)}

    with pytest.raises(DiskFullError) as checkpoint_error:
        storage.save_torch(checkpoint, CHECKPOINT)
    with pytest.raises(DiskFullError) as file_error:
        storage.write_bytes("summary.parquet", b"p" * 5000)

    assert (checkpoint_error.value.path, checkpoint_error.value.needed_bytes,
            checkpoint_error.value.free_bytes) == (storage.uri(CHECKPOINT),
                                                   _torch_size(checkpoint), None)
    assert (file_error.value.needed_bytes, file_error.value.free_bytes) == (5000, None)
    assert str(file_error.value) == (
        f"disk full: could not write {storage.uri('summary.parquet')} (5.0 kB): the store "
        f"reports \"No space left on device\"; free space there, then --resume")
    assert list(staging_dir.iterdir()) == []


def test_a_failed_upload_raises_and_removes_its_staging_copy(staging_dir):
    storage = _remote_storage(OSError(errno.ECONNRESET, "Connection reset by peer"))

    with pytest.raises(OSError, match="Connection reset") as caught:
        storage.save_torch({"w": torch.ones(10)}, CHECKPOINT)

    assert not isinstance(caught.value, DiskFullError)
    assert list(staging_dir.iterdir()) == []


def test_a_checkpoint_that_does_not_fit_its_local_staging_copy_raises_disk_full(small_disk,
                                                                               monkeypatch):
    disk = small_disk(2 * MIB)
    monkeypatch.setattr("tempfile.tempdir", str(disk.path))
    storage = disk.storage(pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory"))),
                           f"/bucket/{uuid.uuid4().hex}")
    too_big = {"w": torch.ones(1_000_000)}

    with pytest.raises(DiskFullError) as caught:
        storage.save_torch(too_big, CHECKPOINT)

    assert (caught.value.needed_bytes, caught.value.free_bytes) == (_torch_size(too_big),
                                                                   disk.free_bytes())
    assert str(caught.value).startswith(
        f"disk full: could not stage {storage.uri(CHECKPOINT)} in {disk.path} ")
    assert "TMPDIR" in str(caught.value)
    assert list(disk.path.iterdir()) == []
    assert not storage.exists(CHECKPOINT)
