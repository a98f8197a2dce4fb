"""`python experiments/predict.py CHECKPOINT INPUT --out DIR`: a trained model on new frames.

A user mistake (no checkpoint, no frames, a file that is not a frame) ends in one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Detect objects in .npy RGB-thermal-event frames with a trained checkpoint: "
                    "OUT/detections.json (COCO results: image_id = the frame's file stem, "
                    "category_id = YOLO class + 1, bbox [x, y, w, h] in the frame's pixels, "
                    "score) and OUT/drawings/<stem>.png (RGB | thermal | event).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a full checkpoint, e.g. "
                        "RUN_DIR/mit_b0/checkpoints/best_map_model.pth, or its bucket URI "
                        "(s3://BUCKET/RUNS/NAME/mit_b0/checkpoints/best_map_model.pth)")
    parser.add_argument("input", help="a .npy frame (H, W, 5) or a folder of them")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--score-threshold", type=float, default=0.05,
                        help="lowest score kept in detections.json")
    parser.add_argument("--draw-threshold", type=float, default=0.5,
                        help="lowest score drawn on the pictures")
    parser.add_argument("--min-size", type=int, default=None,
                        help="detector resize, shorter side (default: the checkpoint's)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="detector resize, longer side cap (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda")
    parser.add_argument("--no-drawings", action="store_true", help="write the JSON only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from crossdet_ray.data import DatasetError
    from crossdet_ray.engine.checkpoint import CheckpointError
    from crossdet_ray.engine.predict import PredictConfig, PredictError, predict

    config = PredictConfig(
        checkpoint=args.checkpoint, input=args.input, out=args.out,
        score_threshold=args.score_threshold, draw_threshold=args.draw_threshold,
        min_size=args.min_size, max_size=args.max_size, device=args.device,
        draw=not args.no_drawings)
    try:
        report = predict(config)
    except (PredictError, CheckpointError, DatasetError) as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{report['detections']} detections on {report['frames']} frames: "
          f"{report['detections_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
