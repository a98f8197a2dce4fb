"""A dataset in a bucket, against a real S3-compatible server that counts its requests: the
preflight reads headers, not frames; a node fetches each object once, however many processes
ask; a cut download resumes; an object changed after the preflight is refused by name."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossdet_ray.data import DatasetError, check_dataset
from crossdet_ray.data.remote import (COMPLETE_MARK, DatasetChangedError, RemoteListing,
                                      fetch_remote_dataset, inspect_remote_dataset)

ROOT = Path(__file__).resolve().parents[2]
DATA_FOLDERS = ("images", "labels")


def _local_files(folder: str) -> dict[str, bytes]:
    """The dataset's files (images/, labels/) under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in Path(folder).glob("*/*") if p.is_file() and p.parent.name in DATA_FOLDERS}


def _upload(s3_server, folder, prefix: str) -> list[str]:
    """The dataset's keys (the synthetic set's synthetic.json goes up too, and is no frame)."""
    return [k for k in s3_server.upload(folder, prefix) if k.split("/")[1] in DATA_FOLDERS]


def _assert_same_files(copy: str | Path, original: str) -> None:
    files = {k: v for k, v in _local_files(str(copy)).items() if k != COMPLETE_MARK}
    assert files == _local_files(original)


def test_preflight_reads_labels_and_headers_and_agrees_with_the_folder_check(s3_server,
                                                                           tiny_dataset):
    keys = _upload(s3_server, tiny_dataset, "tiny")
    listing, report = inspect_remote_dataset(s3_server.uri("tiny"))

    local = check_dataset(tiny_dataset)
    for field in ("num_images", "num_usable", "num_boxes", "classes", "num_classes",
                  "num_train", "num_test", "min_height", "max_height", "min_width",
                  "max_width", "dtypes"):
        assert getattr(report, field) == getattr(local, field), field
    assert report.data_dir == f"s3://{s3_server.BUCKET}/tiny"
    # Every object listed with its size on disk (an independent count: os.stat).
    assert {f.relative: f.size for f in listing.files} == {
        k.split("/", 1)[1]: os.path.getsize(Path(tiny_dataset) / k.split("/", 1)[1])
        for k in keys}
    assert all(f.etag for f in listing.files), "S3 gives every object an ETag"
    # Labels are read whole; frames only by their header (a ranged read).
    for key in keys:
        expected = 1 if key.endswith(".txt") else 0
        assert s3_server.full_downloads(key) == expected, key


@pytest.mark.parametrize("damage, message", [
    ("truncate_frame", "truncated"),
    ("garble_label", "labels/"),
])
def test_a_malformed_bucket_dataset_is_refused_naming_the_object(s3_server, tiny_dataset,
                                                                 damage, message, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    frame = sorted((broken / "images").glob("*.npy"))[2]
    if damage == "truncate_frame":
        frame.write_bytes(frame.read_bytes()[:300])
        culprit = f"images/{frame.name}"
    else:
        label = broken / "labels" / f"{frame.stem}.txt"
        label.write_text("0 0.5 0.5 not-a-number 0.2\n")
        culprit = f"labels/{label.name}"
    s3_server.upload(broken, "broken")

    with pytest.raises(DatasetError) as raised:
        inspect_remote_dataset(s3_server.uri("broken"))
    assert f"s3://{s3_server.BUCKET}/broken/{culprit}" in str(raised.value)
    assert message in str(raised.value)
    assert "endpoint_override" not in str(raised.value)


FETCH = """
import json, sys
from pathlib import Path
from crossdet_ray.data.remote import RemoteListing, fetch_remote_dataset
listing = RemoteListing.from_json(Path(sys.argv[1]).read_text())
record = fetch_remote_dataset(listing, Path(sys.argv[2]))
print(json.dumps(record.to_dict()))
"""


def test_a_node_fetches_each_object_once_however_many_processes_ask(s3_server, tiny_dataset,
                                                                    tmp_path):
    keys = _upload(s3_server, tiny_dataset, "tiny")
    listing, _ = inspect_remote_dataset(s3_server.uri("tiny"))
    listing_file = tmp_path / "listing.json"
    listing_file.write_text(listing.to_json())
    cache = tmp_path / "node_cache"

    # Three processes of one node at once, as three trials starting together would.
    processes = [subprocess.Popen([sys.executable, "-c", FETCH, str(listing_file), str(cache)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT, env=os.environ.copy()) for _ in range(3)]
    records = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        records.append(json.loads(out.strip().splitlines()[-1]))

    assert len({r["path"] for r in records}) == 1
    assert sorted(r["reused"] for r in records) == [False, True, True]
    fetched = next(r for r in records if not r["reused"])
    assert fetched["files"] == len(keys)
    assert fetched["bytes_downloaded"] == sum(len(b) for b in _local_files(tiny_dataset).values())
    _assert_same_files(records[0]["path"], tiny_dataset)
    for key in keys:
        # One whole download per object on this node (labels: one more, the preflight's).
        assert s3_server.full_downloads(key) == (2 if key.endswith(".txt") else 1), key


KILLED_AFTER_THREE_FILES = """
import os, signal, sys
from pathlib import Path
from crossdet_ray.data import remote
from crossdet_ray.data.remote import RemoteListing, fetch_remote_dataset
finished = []
real_replace = os.replace
def replace_then_die(source, target):
    real_replace(source, target)
    finished.append(target)
    if len(finished) == 3:  # the power goes out mid-download
        os.kill(os.getpid(), signal.SIGKILL)
remote.os.replace = replace_then_die
listing = RemoteListing.from_json(Path(sys.argv[1]).read_text())
fetch_remote_dataset(listing, Path(sys.argv[2]), streams=1)
"""


def test_a_cut_download_resumes_and_an_object_changed_since_the_preflight_is_refused(
        s3_server, tiny_dataset, tmp_path):
    keys = _upload(s3_server, tiny_dataset, "tiny")
    listing, _ = inspect_remote_dataset(s3_server.uri("tiny"))
    listing_file = tmp_path / "listing.json"
    listing_file.write_text(listing.to_json())
    cache = tmp_path / "node_cache"

    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_THREE_FILES, str(listing_file),
                             str(cache)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    staging = next((cache / "remote").glob("*.staging"))
    done_before = {p.relative_to(staging).as_posix() for p in staging.rglob("*")
                   if p.is_file() and not p.name.endswith(".part")}
    assert len(done_before) == 3
    assert not list((cache / "remote").glob(f"*/{COMPLETE_MARK}")), "a cut copy was completed"

    record = fetch_remote_dataset(listing, cache)
    assert not record.reused and record.files == len(keys) - 3
    _assert_same_files(record.path, tiny_dataset)
    for key in keys:
        # Each object downloaded once in all: the three verified before the cut not again.
        expected = 1 + (1 if key.endswith(".txt") else 0)
        assert s3_server.full_downloads(key) == expected, key

    # Another node (another cache) after an object changed in the bucket: refused, by name.
    frame_key = next(k for k in keys if k.endswith(".npy"))
    original = s3_server.client.get_object(Bucket=s3_server.BUCKET, Key=frame_key)["Body"].read()
    changed = bytearray(original)
    changed[-1] ^= 0xFF  # same size: only the ETag tells
    s3_server.client.put_object(Bucket=s3_server.BUCKET, Key=frame_key, Body=bytes(changed))
    other = tmp_path / "other_node"
    with pytest.raises(DatasetChangedError) as raised:
        fetch_remote_dataset(RemoteListing.from_json(listing_file.read_text()), other)
    assert f"s3://{s3_server.BUCKET}/{frame_key}" in str(raised.value)
    assert "changed after the run's preflight" in str(raised.value)
    assert not list((other / "remote").glob(f"*/{COMPLETE_MARK}")), "a changed set was kept"


def test_init_from_and_checkpoint_loading_take_bucket_uris(s3_server):
    import torch

    from crossdet_ray.engine.checkpoint import CheckpointError
    from crossdet_ray.engine.inference import read_checkpoint
    from crossdet_ray.tune.follow_up import resolve_init_weights

    def put(key: str, body: bytes) -> None:
        s3_server.client.put_object(Bucket=s3_server.BUCKET, Key=key, Body=body)

    put("runs/old/run_config.json", json.dumps({"trials": [
        {"name": "test_mit_lr0.01", "backbone": "test_mit"},
        {"name": "test_mit_lr0.02", "backbone": "test_mit"}]}).encode())
    for name, best in (("test_mit_lr0.01", 0.2), ("test_mit_lr0.02", 0.4)):
        put(f"runs/old/{name}/checkpoints/best_map_model.pth", b"not a checkpoint")
        put(f"runs/old/{name}/logs/training_info.json", json.dumps({"best_map": best}).encode())

    chosen = resolve_init_weights(s3_server.uri("runs/old"), ["test_mit"])["test_mit"]
    assert chosen["trial"] == "test_mit_lr0.02"  # the better of the grid
    # A location any node opens again: the URI with the server's options.
    assert chosen["path"] == s3_server.uri("runs/old/test_mit_lr0.02/checkpoints/"
                                           "best_map_model.pth")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(chosen["path"])
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(2)}, buffer)
    put("runs/old/foreign/mit_b0_other.pth", buffer.getvalue())
    with pytest.raises(CheckpointError, match="is not a CrossAttentionDet checkpoint") as raised:
        read_checkpoint(s3_server.uri("runs/old/foreign/mit_b0_other.pth"))
    assert f"s3://{s3_server.BUCKET}/runs/old/foreign/mit_b0_other.pth" in str(raised.value)
    assert "endpoint_override" not in str(raised.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(s3_server.uri("runs/old/none/mit_b0_final.pth"))
