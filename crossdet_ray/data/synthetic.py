"""A synthetic RGB-thermal-event detection dataset in CrossAttentionDet's on-disk format.

Writes `OUT/images/<stem>.npy` (H, W, 5) uint8 frames and `OUT/labels/<stem>.txt` YOLO lines,
plus `OUT/synthetic.json` describing how it was made. Built so the thermal + event ("X")
stream measurably matters:

- day scenes: objects stand out in RGB, are warm in thermal and outlined in events;
- night scenes: RGB is dark and low-contrast, objects all but invisible there, while thermal
  and events show them as by day.

Every frame is drawn from its own random stream seeded by (seed, frame index), so the bytes
depend only on the seed and the frame's index: the same (seed, N) gives identical files, and
the first N frames of a larger set are the same files. `RandomState` is used rather than
`default_rng` because numpy freezes its streams across versions.

    python -m crossdet_ray.data.synthetic OUT --num-images 64 --seed 0 [--sizes 64x64 240x320]

`max_objects` and `object_scale` make an easier set than the real-like default (e.g. 1-2 boxes
of 35-55 % of the short side: `--max-objects 2 --object-scale 0.35 0.55`), one a small detector
learns in a few CPU epochs; the learning tests train on such a set. At their defaults they are
left out of synthetic.json, so default datasets keep the bytes they always had.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# (height, width) of the real dataset's frames, the typical ones drawn most often.
DEFAULT_FRAME_SIZES: tuple[tuple[int, int], ...] = (
    (301, 391), (304, 400), (240, 320), (480, 640), (200, 200))
DEFAULT_FRAME_SIZE_WEIGHTS: tuple[float, ...] = (0.3, 0.3, 0.2, 0.1, 0.1)
MIN_FRAME_SIDE = 16
MAX_OBJECTS = 5
# Box heights are drawn log-uniformly between these fractions of the frame's short side.
OBJECT_SCALE: tuple[float, float] = (0.06, 0.3)
METADATA_FILE = "synthetic.json"

DAY, NIGHT = "day", "night"


@dataclass(frozen=True)
class SyntheticConfig:
    num_images: int
    seed: int = 0
    sizes: tuple[tuple[int, int], ...] | None = None  # (height, width) choices; None = real-like
    night_fraction: float = 0.5
    num_classes: int = 1
    max_objects: int = MAX_OBJECTS  # each frame holds 1..max_objects boxes
    object_scale: tuple[float, float] = OBJECT_SCALE  # (smallest, largest) / short side

    def validate(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images={self.num_images}: generate at least one frame")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: use a non-negative seed")
        if not 0.0 <= self.night_fraction <= 1.0:
            raise ValueError(f"night_fraction={self.night_fraction}: must be within [0, 1]")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes}: need at least one class")
        if self.max_objects < 1:
            raise ValueError(f"max_objects={self.max_objects}: need at least one object a frame")
        smallest, largest = self.object_scale
        if not 0.0 < smallest <= largest <= 1.0:
            raise ValueError(f"object_scale={self.object_scale}: need 0 < smallest <= largest "
                             "<= 1 (fractions of the frame's short side)")
        for height, width in self.sizes or ():
            if min(height, width) < MIN_FRAME_SIDE:
                raise ValueError(f"frame size {height}x{width}: each side must be at least "
                                 f"{MIN_FRAME_SIDE} px")


@dataclass(frozen=True)
class SyntheticObject:
    class_id: int
    x: int  # top-left pixel
    y: int
    width: int
    height: int

    def yolo_line(self, frame_height: int, frame_width: int) -> str:
        x_center = (self.x + self.width / 2) / frame_width
        y_center = (self.y + self.height / 2) / frame_height
        return (f"{self.class_id} {x_center:.6f} {y_center:.6f} "
                f"{self.width / frame_width:.6f} {self.height / frame_height:.6f}")


@dataclass(frozen=True)
class SyntheticFrame:
    stem: str
    scene: str  # DAY or NIGHT
    pixels: np.ndarray  # (H, W, 5) uint8
    objects: tuple[SyntheticObject, ...]


def is_night(index: int, night_fraction: float) -> bool:
    """Spread nights evenly over the indices: floor(n * fraction) of the first n frames.

    Deterministic and independent of the dataset's size, so small sets still hold both kinds.
    """
    return math.floor((index + 1) * night_fraction) > math.floor(index * night_fraction)


def frame_stem(index: int, scene: str) -> str:
    return f"{index:06d}_{scene}"


def _frame_random_state(seed: int, index: int) -> np.random.RandomState:
    return np.random.RandomState(np.random.SeedSequence([seed, index]).generate_state(4))


def _smooth_noise(rng: np.random.RandomState, height: int, width: int, cell: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1]: texture with features about `cell` px."""
    coarse = rng.rand(height // cell + 2, width // cell + 2)
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _place_objects(rng: np.random.RandomState, height: int, width: int, num_classes: int,
                   max_objects: int = MAX_OBJECTS,
                   object_scale: tuple[float, float] = OBJECT_SCALE) -> list[SyntheticObject]:
    """1-max_objects boxes, mostly apart (IoU < 0.2); by default sized like the real set's
    (many small ones)."""
    short_side = min(height, width)
    smallest = max(6.0, object_scale[0] * short_side)
    largest = max(smallest + 1.0, object_scale[1] * short_side)
    wanted = rng.randint(1, max_objects + 1)
    objects: list[SyntheticObject] = []
    for _attempt in range(wanted * 10):
        if len(objects) == wanted:
            break
        box_height = int(round(math.exp(rng.uniform(math.log(smallest), math.log(largest)))))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
        box_width = int(min(max(round(box_height * aspect), 4), width - 1))
        box_height = int(min(max(box_height, 4), height - 1))
        x = int(rng.randint(0, width - box_width + 1))
        y = int(rng.randint(0, height - box_height + 1))
        class_id = int(rng.randint(num_classes))
        candidate = SyntheticObject(class_id, x, y, box_width, box_height)
        if all(_iou(candidate, other) < 0.2 for other in objects):
            objects.append(candidate)
    return objects


def _iou(a: SyntheticObject, b: SyntheticObject) -> float:
    overlap_w = min(a.x + a.width, b.x + b.width) - max(a.x, b.x)
    overlap_h = min(a.y + a.height, b.y + b.height) - max(a.y, b.y)
    if overlap_w <= 0 or overlap_h <= 0:
        return 0.0
    inter = overlap_w * overlap_h
    return inter / (a.width * a.height + b.width * b.height - inter)


def _object_shape(obj: SyntheticObject) -> tuple[np.ndarray, np.ndarray]:
    """(mask, radial distance) over the object's box; even classes are ellipses, odd ones
    rounded rectangles, so several classes are told apart by shape as well as heat."""
    ys = (np.arange(obj.height) + 0.5 - obj.height / 2) / (obj.height / 2)
    xs = (np.arange(obj.width) + 0.5 - obj.width / 2) / (obj.width / 2)
    if obj.class_id % 2 == 0:
        distance = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    else:
        distance = np.maximum(np.abs(ys)[:, None], np.abs(xs)[None, :])
    return distance <= 1.0, distance


def _border(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the box edge counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def render_frame(index: int, config: SyntheticConfig) -> SyntheticFrame:
    """Draw frame `index` of the dataset `config` describes."""
    rng = _frame_random_state(config.seed, index)
    scene = NIGHT if is_night(index, config.night_fraction) else DAY
    if config.sizes:
        height, width = config.sizes[rng.randint(len(config.sizes))]
    else:
        choice = rng.choice(len(DEFAULT_FRAME_SIZES), p=DEFAULT_FRAME_SIZE_WEIGHTS)
        height, width = DEFAULT_FRAME_SIZES[choice]
    objects = _place_objects(rng, height, width, config.num_classes, config.max_objects,
                             config.object_scale)
    night = scene == NIGHT

    # Thermal: a cool textured background (cooler at night), warmer towards the ground.
    ambient = rng.uniform(45, 75) if night else rng.uniform(80, 110)
    ground_gradient = np.linspace(0.0, 15.0, height)[:, None]
    thermal = (ambient + ground_gradient + 30.0 * (_smooth_noise(rng, height, width, 24) - 0.5)
               + rng.normal(0.0, 2.0, (height, width)))

    # RGB: by day a bright sky-over-ground scene; by night almost black, flat and noisy.
    if night:
        base = rng.uniform(6, 18)
        rgb = (base + 6.0 * (_smooth_noise(rng, height, width, 32)[..., None] - 0.5)
               + rng.normal(0.0, 2.0, (height, width, 3)))
    else:
        horizon = int(height * rng.uniform(0.3, 0.6))
        sky, ground = rng.uniform(150, 200, 3), rng.uniform(110, 160, 3)
        rgb = np.where((np.arange(height) < horizon)[:, None, None], sky, ground)
        rgb = (rgb + 40.0 * (_smooth_noise(rng, height, width, 16)[..., None] - 0.5)
               + rng.normal(0.0, 4.0, (height, width, 3)))

    # Events: sensor noise everywhere (more in the dark), object outlines drawn below.
    noise_rate = 0.02 if night else 0.008
    events = np.where(rng.rand(height, width) < noise_rate,
                      rng.choice(np.array([128.0, 255.0]), (height, width)), 0.0)

    for obj in objects:
        mask, distance = _object_shape(obj)
        rows = slice(obj.y, obj.y + obj.height)
        cols = slice(obj.x, obj.x + obj.width)
        # Warm body, hottest in the middle; higher classes run a little cooler.
        peak = min(ambient + rng.uniform(90, 130) - 12 * (obj.class_id % 4), 250.0)
        body = peak - 25.0 * np.clip(distance, 0, 1) ** 2
        thermal[rows, cols] = np.where(mask, body, thermal[rows, cols])

        if night:  # a colour within a grey level or two of the dark background
            tint = rng.uniform(-1.5, 1.5, 3)
            rgb[rows, cols] = np.where(mask[..., None], rgb[rows, cols] + tint, rgb[rows, cols])
        else:  # dark or bright, whichever stands out from the scene behind it
            behind = float(rgb[rows, cols].mean())
            dark, bright = rng.uniform(15, 55), rng.uniform(215, 245)
            luminance = dark if rng.rand() < 0.6 else bright
            if abs(luminance - behind) < 60:
                luminance = bright if luminance == dark else dark
            colour = luminance + rng.uniform(-15, 15, 3)
            shaded = colour - 10.0 * np.clip(distance, 0, 1)[..., None]
            noisy = shaded + rng.normal(0.0, 3.0, shaded.shape)
            rgb[rows, cols] = np.where(mask[..., None], noisy, rgb[rows, cols])

        outline = _border(mask) & (rng.rand(*mask.shape) < 0.8)
        polarity = rng.choice(np.array([128.0, 255.0]), mask.shape)
        events[rows, cols] = np.where(outline, polarity, events[rows, cols])

    pixels = np.empty((height, width, 5), dtype=np.uint8)
    pixels[..., :3] = np.clip(np.rint(rgb), 0, 255)
    pixels[..., 3] = np.clip(np.rint(thermal), 0, 255)
    pixels[..., 4] = events
    return SyntheticFrame(frame_stem(index, scene), scene, pixels, tuple(objects))


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as stream:
        stream.write(data)
    os.replace(temporary, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def generate_dataset(out_dir: str | os.PathLike, num_images: int, seed: int = 0,
                     sizes: Sequence[tuple[int, int]] | None = None, night_fraction: float = 0.5,
                     num_classes: int = 1, max_objects: int = MAX_OBJECTS,
                     object_scale: Sequence[float] = OBJECT_SCALE) -> Path:
    """Write `num_images` frames and their labels under `out_dir` (created if needed).

    `sizes`: (height, width) choices, one drawn per frame; None draws the real dataset's sizes.
    `max_objects`, `object_scale`: boxes per frame (1..max_objects) and their height range as
    fractions of the short side; raise the scale and lower the count for an easy set.
    Returns `out_dir` as a Path.
    """
    config = SyntheticConfig(
        num_images=int(num_images), seed=int(seed), night_fraction=float(night_fraction),
        num_classes=int(num_classes),
        sizes=tuple((int(h), int(w)) for h, w in sizes) if sizes else None,
        max_objects=int(max_objects),
        object_scale=(float(object_scale[0]), float(object_scale[1])))
    config.validate()
    out_dir = Path(out_dir)
    images_dir, labels_dir = out_dir / "images", out_dir / "labels"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)

    scene_counts = {DAY: 0, NIGHT: 0}
    num_boxes = 0
    for index in range(config.num_images):
        frame = render_frame(index, config)
        height, width = frame.pixels.shape[:2]
        lines = "".join(obj.yolo_line(height, width) + "\n" for obj in frame.objects)
        _write_atomically(images_dir / f"{frame.stem}.npy", _npy_bytes(frame.pixels))
        _write_atomically(labels_dir / f"{frame.stem}.txt", lines.encode("ascii"))
        scene_counts[frame.scene] += 1
        num_boxes += len(frame.objects)

    described = asdict(config)
    # At their defaults the newer options stay out, so older datasets' synthetic.json is unchanged.
    for name, default in (("max_objects", MAX_OBJECTS), ("object_scale", OBJECT_SCALE)):
        if getattr(config, name) == default:
            del described[name]
    metadata = {"generator": "crossdet_ray.data.synthetic", **described, "num_boxes": num_boxes,
                "num_day": scene_counts[DAY], "num_night": scene_counts[NIGHT]}
    _write_atomically(out_dir / METADATA_FILE,
                      (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode("ascii"))
    logger.info("synthetic dataset %s: %d frames (%d day, %d night), %d boxes, seed %d",
                out_dir, config.num_images, scene_counts[DAY], scene_counts[NIGHT], num_boxes,
                config.seed)
    return out_dir


def _frame_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a frame size as HEIGHTxWIDTH, "
                                         "e.g. 240x320") from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crossdet_ray.data.synthetic",
        description="Write a synthetic RGB-thermal-event dataset (images/*.npy + YOLO "
                    "labels/*.txt), deterministic per seed.")
    parser.add_argument("out", help="output folder (created; files of the same name replaced)")
    parser.add_argument("--num-images", type=int, default=64, help="frames to write (64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--sizes", type=_frame_size, nargs="+", metavar="HxW", default=None,
                        help="frame sizes to draw from, e.g. 64x64 240x320 (default: the real "
                             "dataset's 301x391, 304x400, 240x320, 480x640, 200x200)")
    parser.add_argument("--night-fraction", type=float, default=0.5,
                        help="share of night scenes (0.5)")
    parser.add_argument("--num-classes", type=int, default=1, help="object classes (1)")
    parser.add_argument("--max-objects", type=int, default=MAX_OBJECTS,
                        help=f"at most this many boxes a frame ({MAX_OBJECTS})")
    parser.add_argument("--object-scale", type=float, nargs=2, default=list(OBJECT_SCALE),
                        metavar=("SMALLEST", "LARGEST"),
                        help="box heights as fractions of the short side (%g %g); e.g. "
                             "--max-objects 2 --object-scale 0.35 0.55 for an easy set"
                             % OBJECT_SCALE)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = generate_dataset(args.out, args.num_images, seed=args.seed, sizes=args.sizes,
                               night_fraction=args.night_fraction, num_classes=args.num_classes,
                               max_objects=args.max_objects, object_scale=args.object_scale)
    except ValueError as error:
        parser.error(str(error))
    metadata = json.loads((out / METADATA_FILE).read_text())
    print(f"wrote {metadata['num_images']} frames ({metadata['num_day']} day, "
          f"{metadata['num_night']} night), {metadata['num_boxes']} boxes to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
