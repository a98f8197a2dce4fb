"""Command line: the seed script's flags plus Ray's, parsed into a LaunchConfig and launched.

A user mistake (bad data, bad flag, impossible resources) ends in one line on stderr and a
non-zero exit; only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from crossdet_ray.backbones import BACKBONE_REGISTRY
from crossdet_ray.config import BACKBONES, DEFAULT_PENDING_TIMEOUT_S, MLFLOW_DEFAULT, TrainConfig

EXIT_USER_ERROR = 2

# Named sets of defaults; a flag given on the command line still wins over its preset value.
# quick: the first run on a laptop. All five backbones learn a small easy built-in set (a few
# large objects) at a small resize, so on 2 CPU cores it ends in about 5 minutes with the small
# backbones' test mAP50 clearly above 0; one epoch checkpoint per backbone is kept.
PRESETS: dict[str, dict[str, object]] = {
    "quick": {
        "epochs": 2, "lr": 0.01, "min_size": 64, "max_size": 96,
        "num_workers": 0, "keep_checkpoints": 1, "synthetic_images": 40,
        "synthetic_frame_size": "96x144", "synthetic_objects": "large",
    },
}


def _describe_preset(name: str) -> str:
    return " ".join(f"--{flag.replace('_', '-')} {value}" for flag, value in PRESETS[name].items())


def _frame_size(text: str) -> int | str:
    """--synthetic-frame-size: a side (square frames) or HEIGHTxWIDTH."""
    from crossdet_ray.data.synthetic import MIN_FRAME_SIDE

    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(part.isdigit() and int(part) >= MIN_FRAME_SIDE
                                    for part in parts):
        return int(text) if len(parts) == 1 else f"{int(parts[0])}x{int(parts[1])}"
    raise argparse.ArgumentTypeError(f"{text!r}: give a side (96) or HEIGHTxWIDTH (96x144), "
                                     f"each at least {MIN_FRAME_SIDE} px")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default once: not where the help already says it, nor for a flag
    whose absence means "off" or "none"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "(default" in text or default is None
                or default is False or default is argparse.SUPPRESS):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        return f"{text} (default: {default})"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog=prog,  # None: the name it was started by (all_backbones.py, crossdet-ray)
        description="Train CrossAttentionDet backbones at once, each a Ray Tune trial.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named set of defaults that explicit flags override; quick = "
                             + _describe_preset("quick")
                             + " (all five backbones in about 5 minutes on 2 CPU cores)")
    seed = parser.add_argument_group("training (the reference script's flags)")
    seed.add_argument("--data", default=None,
                      help="data directory with images/ and labels/, or a bucket URI "
                           "(s3://BUCKET/PREFIX, gs://...) each node fetches once (default: the "
                           "built-in synthetic RGB-thermal-event data)")
    seed.add_argument("--epochs", type=int, default=defaults.epochs,
                      help="epochs per backbone")
    seed.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help="images per optimizer step (the global batch, split over "
                           "--workers-per-trial)")
    seed.add_argument("--lr", type=float, default=defaults.lr,
                      help="initial learning rate (SGD, momentum 0.9, weight decay 5e-4)")
    seed.add_argument("--lr-step-size", type=int, default=defaults.lr_step_size,
                      help="StepLR: epochs between learning-rate drops")
    seed.add_argument("--lr-gamma", type=float, default=defaults.lr_gamma,
                      help="StepLR: factor of each drop")
    seed.add_argument("--num-workers", type=int, default=defaults.num_workers,
                      help="data-loading worker processes per trial (0 = load in the "
                           "training process)")
    seed.add_argument("--backbones", nargs="+", default=list(BACKBONES), metavar="NAME",
                      help="backbones to train")
    seed.add_argument("--log-dir", default=defaults.log_dir,
                      help="where runs go: a folder, a shared filesystem, s3:// or gs://")
    seed.add_argument("--min-size", type=int, default=defaults.min_size,
                      help="detector resize: shorter side")
    seed.add_argument("--max-size", type=int, default=defaults.max_size,
                      help="detector resize: longer side cap")
    seed.add_argument("--pretrained", default=None,
                      help="local SegFormer MiT ImageNet weights, loaded into both streams")
    seed.add_argument("--seed", type=int, default=defaults.seed, help="weights/shuffle seed")
    seed.add_argument("--init-from", default=None, metavar="RUN_DIR",
                      help="fine-tune: each backbone starts from RUN_DIR's best_map_model.pth "
                           "(weights only; a fresh optimizer and schedule at --lr)")
    seed.add_argument("--mlflow", nargs="?", const=MLFLOW_DEFAULT, default=None,
                      metavar="TRACKING_URI",
                      help="log every trial as an MLflow run (default URI: "
                           "sqlite:///RUN_DIR/mlflow.db); needs pip install 'crossdet_ray[mlflow]'")
    checkpointed = [name for name, spec in BACKBONE_REGISTRY.items() if spec.checkpoint_on_cuda]
    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--amp", choices=("auto", "bf16", "off"), default=defaults.amp,
                       help="bf16 autocast: auto = on CUDA only")
    speed.add_argument("--activation-checkpointing", choices=("auto", "on", "off"),
                       default=defaults.activation_checkpointing,
                       help="recompute encoder blocks in backward: auto = "
                            f"{', '.join(checkpointed)} on CUDA")
    speed.add_argument("--channels-last", choices=("auto", "on", "off"),
                       default=defaults.channels_last,
                       help="NHWC memory format for the convolutions: auto = on CUDA only")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the encoder (CUDA only; ignored with a warning on "
                            "the CPU)")

    ray_group = parser.add_argument_group("Ray Tune")
    ray_group.add_argument("--gpus-per-trial", default="auto",
                           help="GPUs per trial: a number (0.2 puts five on one GPU), per "
                                "backbone (mit_b4=1,mit_b5=1,default=0.5), or auto")
    ray_group.add_argument("--workers-per-trial", default="auto",
                           help="data-parallel workers per trial (Ray Train; one whole GPU "
                                "each, or a share of the trial's CPUs): a number, per backbone "
                                "(mit_b5=4,default=1), or auto = the trial's whole GPUs, 1 on "
                                "a GPU share or none. --batch-size stays the global batch")
    ray_group.add_argument("--plan-only", action="store_true",
                           help="print the resource plan (per trial: GPUs, workers, CPUs, "
                                "predicted hours), write it to RUN_DIR/plan.json and exit "
                                "without training")
    ray_group.add_argument("--plan-for", default=None, metavar="GPUSxGB",
                           help="plan for a cluster you do not have: 8x80 = 8 GPUs of 80 GB, "
                                "2x4x80 = 2 nodes of 4, 8x80,2x1x24 = both (no Ray is started)")
    ray_group.add_argument("--cpus-per-trial", type=float, default=None,
                           help="CPUs per trial (default: the cluster's CPUs shared out)")
    ray_group.add_argument("--address", default=None,
                           help="the Ray cluster to join (default: RAY_ADDRESS, else the cluster "
                                "`ray start` runs on this node, else a Ray of this run's own); "
                                "local: always a Ray of this run's own")
    ray_group.add_argument("--name", default=None, help="run directory name under --log-dir (default: run_YYYYmmdd_HHMMSS)")
    ray_group.add_argument("--resume", default=None, metavar="RUN_DIR",
                           help="continue an interrupted run from its directory")
    ray_group.add_argument("--max-failures", type=int, default=2,
                           help="restarts of a crashed trial from its last checkpoint; -1: "
                                "unlimited (spot nodes, whose trials are lost with the node)")
    ray_group.add_argument("--lr-grid", nargs="+", type=float, default=[], metavar="M",
                           help="LR search: every backbone x (lr x M)")
    ray_group.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo",
                           help="asha stops unpromising trials early on test mAP")
    ray_group.add_argument("--keep-checkpoints", type=int, default=None, metavar="N",
                           help="keep only the last N epoch checkpoints; the best and final ones stay "
                                "(default: all; 1 when --log-dir is a bucket)")
    ray_group.add_argument("--no-evaluate", action="store_true",
                           help="do not evaluate the finished trials at the end of the run "
                                "(experiments/evaluate.py RUN_DIR does it later)")
    ray_group.add_argument("--skip-disk-check", action="store_true",
                           help="start even when the checkpoints the run will write (estimated "
                                "and logged before it starts) exceed the free space at "
                                "--log-dir")
    ray_group.add_argument("--dashboard-host", default="127.0.0.1",
                           help="interface the local Ray dashboard binds to")
    ray_group.add_argument("--no-dashboard", action="store_true",
                           help="do not start Ray's dashboard for a local run")
    ray_group.add_argument("--autoscaling", action="store_true",
                           help="the cluster adds nodes on demand: do not reject requests the "
                                "current nodes cannot hold; --gpus-per-trial auto plans for the "
                                "GPU node types the autoscaler can launch, not the nodes alive "
                                "now")
    ray_group.add_argument("--pending-timeout", type=float, default=DEFAULT_PENDING_TIMEOUT_S,
                           metavar="SECONDS",
                           help="end the run (exit 2, resumable) when a trial has waited this "
                                "long for a node that can hold it and none came up (the cloud "
                                "could not launch one: quota, capacity); 0 waits for ever "
                                "(default: %(default)g)")
    ray_group.add_argument("--synthetic-images", type=int, default=64,
                           help="frames in the built-in dataset (without --data)")
    ray_group.add_argument("--synthetic-frame-size", type=_frame_size, default=None,
                           metavar="SIDE|HxW",
                           help="frames of this size for the built-in dataset: a side (square) "
                                "or HEIGHTxWIDTH (default: the real dataset's sizes)")
    ray_group.add_argument("--synthetic-objects", choices=("real", "large"), default="real",
                           help="objects of the built-in dataset: real = 1-5 boxes of 6-30%% of "
                                "the short side, like the real data; large = 1-2 boxes of "
                                "35-55%%, learnt within minutes on a CPU")
    ray_group.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                           help="Tune's progress output")
    return parser


def config_from_args(args: argparse.Namespace):
    from crossdet_ray.tune.launcher import LaunchConfig

    train = TrainConfig(
        data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_step_size=args.lr_step_size, lr_gamma=args.lr_gamma, num_workers=args.num_workers,
        backbones=list(args.backbones), log_dir=args.log_dir, min_size=args.min_size,
        max_size=args.max_size, pretrained=args.pretrained, seed=args.seed, amp=args.amp,
        activation_checkpointing=args.activation_checkpointing, compile=args.compile,
        channels_last=args.channels_last,
    )
    return LaunchConfig(
        train=train, name=args.name, gpus_per_trial=args.gpus_per_trial,
        workers_per_trial=args.workers_per_trial,
        cpus_per_trial=args.cpus_per_trial, address=args.address, resume=args.resume,
        max_failures=args.max_failures, lr_grid=list(args.lr_grid), scheduler=args.scheduler,
        keep_checkpoints=args.keep_checkpoints, dashboard=not args.no_dashboard,
        dashboard_host=args.dashboard_host, autoscaling=args.autoscaling,
        synthetic_images=args.synthetic_images, synthetic_frame_size=args.synthetic_frame_size,
        synthetic_objects=args.synthetic_objects, preset=args.preset,
        verbose=args.verbose, skip_disk_check=args.skip_disk_check, plan_only=args.plan_only,
        plan_for=args.plan_for, init_from=args.init_from, mlflow=args.mlflow,
        pending_timeout_s=args.pending_timeout,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a --preset's values as the defaults of the flags not given."""
    parser = build_parser()
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=sorted(PRESETS), default=None)
    known, _ = preset.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray_was_connected = _ray_connected()
    try:
        return _run(args)
    finally:
        # A Ray this call started or joined is left as it was found: called in a process
        # that goes on (a notebook, a test), the next call connects afresh.
        if not ray_was_connected and _ray_connected():
            import ray

            ray.shutdown()


def _ray_connected() -> bool:
    """Whether this process is connected to a Ray, without importing Ray to find out."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _run(args: argparse.Namespace) -> int:
    # Tune warns whenever a callback takes over 0.5 s, which every trial's start-up does on a
    # busy laptop; read when Ray Tune is imported, so set before the launcher brings it in.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from crossdet_ray.data import DatasetError
    from crossdet_ray.tune.launcher import LaunchError, launch
    from crossdet_ray.tune.resources import ResourceError

    try:
        outcome = launch(config_from_args(args))
    except (LaunchError, ResourceError, DatasetError) as error:
        print(f"crossdet_ray: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:
        if not _is_checkpoint_error(error):
            raise
        print(f"crossdet_ray: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    from crossdet_ray.tune.summary import format_table

    if outcome.plan_only:
        from crossdet_ray.tune.planner import Plan, PlannedTrial, format_plan

        plan = dict(outcome.summary["plan"])
        plan["trials"] = [PlannedTrial(**t) for t in plan["trials"]]
        print(format_plan(Plan(**plan)))
        print(f"Plan written to {outcome.run_dir}/plan.json")
        return 0
    if outcome.nothing_to_resume:
        print(f"Nothing to resume: every trial of {outcome.run_dir} finished "
              f"(final_summary.json of {outcome.summary.get('timestamp', '?')}); "
              "no file was changed.")
        return 0
    report = None
    if not args.no_evaluate and not outcome.interrupted and outcome.summary.get("num_succeeded"):
        report = _evaluate_finished_run(outcome)
    print(format_table(outcome.summary))
    if report:
        print(f"Evaluation report: {report}")
    print(f"Run directory: {outcome.run_dir}")
    summary_path = outcome.summary.get("summary_path")
    if summary_path and not summary_path.startswith(outcome.run_dir):
        print(f"Summary written to {summary_path} (it did not fit in the run directory)",
              file=sys.stderr)
    if outcome.summary.get("unplaceable"):
        names = ", ".join(t["trial"] for t in outcome.summary["unplaceable"])
        print(f"crossdet_ray: error: no node could be launched for {names} within "
              f"--pending-timeout (the report is above); continue with --resume "
              f"{outcome.run_dir}", file=sys.stderr)
    elif outcome.interrupted:
        print(f"Interrupted: continue with --resume {outcome.run_dir}", file=sys.stderr)
    return outcome.exit_code


def _is_checkpoint_error(error: Exception) -> bool:
    """A CheckpointError (a damaged --resume/--init-from file) without importing its module
    up front: it imports torch, which the driver otherwise never needs; only code that has
    imported the module can have raised one."""
    checkpoint = sys.modules.get("crossdet_ray.engine.checkpoint")
    return checkpoint is not None and isinstance(error, checkpoint.CheckpointError)


def _evaluate_finished_run(outcome) -> str | None:
    """The run ends with its report: every trial's best-mAP checkpoint evaluated, and timed
    alone, as `experiments/evaluate.py RUN_DIR` would, on the cluster the run used; a run in a
    bucket gets its report there (each task downloads only the checkpoint it scores). The
    summary's inference figures become those timed alone (the training-time ones were taken
    while trials shared the device); returns the report's location."""
    from crossdet_ray.analysis import EvaluationError, evaluate, plan_evaluation
    from crossdet_ray.engine.storage import RunStorage
    from crossdet_ray.tune.summary import apply_evaluation_timing, write_summary_files

    run_dir = outcome.run_uri or outcome.run_dir

    try:
        evaluation = evaluate(plan_evaluation(run_dir))
    except EvaluationError as error:
        print(f"crossdet_ray: evaluation skipped: {error}", file=sys.stderr)
        return None
    summary = apply_evaluation_timing(outcome.summary, evaluation.rows)
    try:
        write_summary_files(RunStorage.from_uri(run_dir), summary)
    except Exception as error:  # a full disk: the summary from training stays
        print(f"crossdet_ray: could not update final_summary.json with the evaluation's "
              f"timings: {error}", file=sys.stderr)
    return evaluation.report_path


if __name__ == "__main__":
    sys.exit(main())
