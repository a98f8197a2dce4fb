"""`experiments/evaluate.py RUN_DIR`: flags -> an evaluation plan -> Ray -> report.

Exit codes: 0 every trial evaluated, 1 some trial failed (it is in the report), 2 a user
mistake (one line on stderr, nothing started).
"""

from __future__ import annotations

import argparse
import logging
import sys

from crossdet_ray.analysis.sources import CHECKPOINT_CHOICES, DEFAULT_PATTERN

EXIT_USER_ERROR = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (its default prints the usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="evaluate.py",
        description="Evaluate every trial of a crossdet_ray run (or a folder of CrossAttentionDet "
                    "checkpoints) as Ray tasks: COCO metrics, speed, pictures and report.html.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory (with run_config.json), its bucket URI "
                             "(s3://BUCKET/RUNS/NAME, gs://...; the report is written there), "
                             "or a folder of checkpoints")
    parser.add_argument("--data", default=None,
                        help="evaluate every labelled frame of this dataset (a folder with images/ "
                             "and labels/, or a bucket URI) instead of the run's own test split")
    parser.add_argument("--checkpoint", default="best_map",
                        help=f"which checkpoint of each trial: {' | '.join(CHECKPOINT_CHOICES)} "
                             "(best_map: highest test mAP; best: lowest loss; final: last epoch)")
    parser.add_argument("--checkpoint-pattern", default=None,
                        help="for a folder of checkpoints: a glob under RUN_DIR, e.g. "
                             f"'*/checkpoints/best_model.pth' (default {DEFAULT_PATTERN!r})")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/evaluation)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="detector resize, shorter side (default: the run's)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="detector resize, longer side cap (default: the run's)")
    parser.add_argument("--address", default=None,
                        help="a running Ray cluster (default: RAY_ADDRESS, else the cluster "
                             "`ray start` runs on this node, else a Ray of its own; `local`: "
                             "always a Ray of its own)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from crossdet_ray.analysis.evaluation import evaluate
    from crossdet_ray.analysis.sources import EvaluationError, plan_evaluation
    from crossdet_ray.data import DatasetError

    try:
        plan = plan_evaluation(args.run_dir, data=args.data, checkpoint=args.checkpoint,
                               out=args.out, min_size=args.min_size, max_size=args.max_size,
                               checkpoint_pattern=args.checkpoint_pattern)
        outcome = evaluate(plan, address=args.address)
    except (EvaluationError, DatasetError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    for row in outcome.rows:
        if row["status"] == "ok":
            print(f"{row['trial']:<24} mAP {row['map']:.4f}  mAP50 {row['map50']:.4f}  "
                  f"{row['infer_ms_per_image']:.1f} ms/image")
        else:
            print(f"{row['trial']:<24} FAILED: {row['error']}")
    if outcome.choice["most_accurate"]:
        print(f"Most accurate: {outcome.choice['most_accurate']}; fastest within 1 mAP point "
              f"of the best: {outcome.choice['fastest_close_to_best']}")
    print(f"Report: {outcome.report_path}")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
