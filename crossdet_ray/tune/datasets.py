"""Where a trial finds its data: the user's folder, or the built-in synthetic set.

The synthetic set is deterministic per (size, seed), so a node that lacks it (a fresh cloud
worker) makes the same bytes itself instead of copying them from the driver.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from crossdet_ray.synthetic import generate_dataset

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


def synthetic_dir(spec: dict[str, Any], cache: Path | None = None) -> Path:
    size = spec.get("frame_size")
    suffix = f"_{size}px" if size else ""
    objects = spec.get("objects", "real")
    if objects != "real":
        suffix += f"_{objects}"
    cache = default_cache() if cache is None else cache
    return cache / f"synthetic_n{spec['num_images']}_seed{spec['seed']}{suffix}"


def ensure_dataset(spec: dict[str, Any], cache: Path | None = None) -> str:
    """Path of the dataset a spec names, generating the synthetic one when it is missing."""
    if spec["kind"] == "folder":
        return spec["path"]
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
