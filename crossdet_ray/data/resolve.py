"""Where a trial finds its data: the user's folder, a bucket's dataset fetched once into the
node's cache, or the built-in synthetic set.

The synthetic set is deterministic per (size, seed), so a node that lacks it (a fresh cloud
worker) makes the same bytes itself instead of copying them from the driver. A bucket dataset
is checked against the listing the driver's preflight took (data/remote.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from crossdet_ray.data.errors import DatasetError
from crossdet_ray.data.remote import FetchRecord, RemoteListing, fetch_remote_dataset
from crossdet_ray.data.synthetic import generate_dataset

logger = logging.getLogger(__name__)

def default_cache() -> Path:
    """CROSSDET_CACHE, else ~/.cache/crossdet_ray: read when used, so the environment of the
    process that makes the dataset counts, not that of whoever imported this module first."""
    return Path(os.environ.get("CROSSDET_CACHE", Path.home() / ".cache" / "crossdet_ray"))


# What `--synthetic-objects` names: the real-like default (1-5 boxes of 6-30 % of the short
# side), or a few large ones a small detector learns within minutes on a CPU (the quick start).
SYNTHETIC_OBJECTS: dict[str, dict[str, Any]] = {
    "real": {},
    "large": {"max_objects": 2, "object_scale": (0.35, 0.55)},
}


def synthetic_spec(num_images: int, seed: int, frame_size: int | str | None = None,
                   objects: str = "real") -> dict[str, Any]:
    """`frame_size`: None (the real dataset's sizes), a side (square frames) or "HxW"."""
    spec = {"kind": "synthetic", "num_images": num_images, "seed": seed, "frame_size": frame_size}
    if objects != "real":  # left out at the default, so older run_config.json files still match
        spec["objects"] = objects
    return spec


def frame_sizes(frame_size: int | str | None) -> list[tuple[int, int]] | None:
    """(height, width) choices for the generator from a spec's frame_size."""
    if frame_size is None:
        return None
    if isinstance(frame_size, int) or str(frame_size).isdigit():
        return [(int(frame_size), int(frame_size))]
    height, width = (int(part) for part in str(frame_size).lower().split("x"))
    return [(height, width)]


def folder_spec(path: str) -> dict[str, Any]:
    return {"kind": "folder", "path": str(Path(path).expanduser().resolve())}


def remote_spec(listing: RemoteListing) -> dict[str, Any]:
    """A bucket dataset: its URI and the fingerprint of the listing every node checks against
    (the listing itself is a run file, DATASET_LISTING_FILE: too big for Tune's config)."""
    return {"kind": "remote", "uri": listing.uri, "fingerprint": listing.fingerprint,
            "files": len(listing.files), "bytes": listing.total_bytes}


class DataNotOnNodeError(DatasetError):
    """A `--data` folder this node does not have: no restart of the trial can mend that."""


def check_folder_here(path: str, node: str | None = None) -> None:
    """DataNotOnNodeError unless `path` holds a dataset's images/ on this node."""
    images = Path(path) / "images"
    if images.is_dir() and any(images.iterdir()):
        return
    state = "is empty" if Path(path).is_dir() else "does not exist"
    node = node or socket.gethostname()
    raise DataNotOnNodeError(
        f"--data {path} {state} on node {node}: every node that runs a trial opens the dataset "
        "at that path. Either pass a bucket URI (--data s3://BUCKET/PREFIX or gs://...), "
        "which each node fetches once into its cache, or mount one filesystem at the same path "
        "on every node (README: \"Your data on a cluster\")")


def synthetic_dir(spec: dict[str, Any], cache: Path | None = None) -> Path:
    size = spec.get("frame_size")
    suffix = f"_{size}px" if size else ""
    objects = spec.get("objects", "real")
    if objects != "real":
        suffix += f"_{objects}"
    cache = default_cache() if cache is None else cache
    return cache / f"synthetic_n{spec['num_images']}_seed{spec['seed']}{suffix}"


def ensure_dataset(spec: dict[str, Any], cache: Path | None = None) -> str:
    """The path of a folder or synthetic dataset on this node (see `node_dataset`)."""
    return node_dataset(spec, cache)[0]


def node_dataset(spec: dict[str, Any], cache: Path | None = None,
                 listing: RemoteListing | None = None,
                 node: str | None = None) -> tuple[str, FetchRecord | None]:
    """(path on this node, how a bucket dataset got there) of the dataset a spec names.

    A folder is checked to be here (DataNotOnNodeError names `node` when not); a bucket's
    (`listing`: the run's DATASET_LISTING_FILE) is fetched once into the node's cache; the
    synthetic one is generated when missing.
    """
    cache = default_cache() if cache is None else cache
    if spec["kind"] == "folder":
        check_folder_here(spec["path"], node)
        return spec["path"], None
    if spec["kind"] == "remote":
        if listing is None or listing.fingerprint != spec["fingerprint"]:
            raise DatasetError(f"--data {spec['uri']}: the run's dataset listing is missing or "
                               "is another dataset's; start the run again")
        record = fetch_remote_dataset(listing, cache)
        logger.info("%s", record.describe())
        return record.path, record
    return _synthetic_dataset(spec, cache), None


def _synthetic_dataset(spec: dict[str, Any], cache: Path) -> str:
    target = synthetic_dir(spec, cache)
    if (target / "labels").is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Generate beside the target and rename: trials starting together on one node never
    # see (or make) a half-written dataset.
    logger.info("generating the built-in synthetic dataset once, into %s (later runs reuse it)",
                target)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    generate_dataset(staging, spec["num_images"], seed=spec["seed"],
                     sizes=frame_sizes(spec.get("frame_size")),
                     **SYNTHETIC_OBJECTS[spec.get("objects", "real")])
    try:
        os.rename(staging, target)
    except OSError:  # another trial won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
