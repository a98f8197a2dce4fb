"""The GPU figures docs/performance.md lacks, in one run on a CUDA machine.

    python benchmarks/gpu_report.py                                   # everything, 800x1333
    python benchmarks/gpu_report.py --parts steps --backbones mit_b0 --steps 5

- Training step time per backbone, fp32 (`--amp off`) against bf16 (`--amp bf16`); the other
  switches stay at their CUDA defaults (channels_last on, activation checkpointing on for
  mit_b4/b5). A batch of `--batch-size` random 5-channel frames of min-size x max-size, already
  on the GPU, goes through the engine's model, fused SGD and autocast. `--warmup` steps run
  first, then `--steps` timed steps, each between two torch.cuda.synchronize calls; the median
  is reported.
- Peak memory per backbone and precision: torch.cuda.max_memory_allocated from before the model
  is built to the last timed step (weights, gradients, momentum and activations).
- Five at once against one by one, on the same synthetic data (`--images`, `--epochs`):
  one by one is `engine.fit` per backbone in this process, as the reference script trained
  them; at once is the real command, `experiments/all_backbones.py --gpus-per-trial 0.2`, in a
  subprocess that sees only the first GPU, timed from start to exit (Ray's start-up included).

Prints each step measurement as it completes, then the tables; writes
benchmarks/results/gpu_report.json after each measurement, so a run cut short keeps its
figures. Without CUDA it exits with one line
and code 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from common import add_run_arguments, run_train_config, write_results

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": "off", "bf16": "bf16"}  # report name -> TrainConfig.amp
NO_CUDA = ("gpu_report: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
           "run `.venv/bin/python benchmarks/gpu_report.py` on a CUDA machine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "benchmarks/results/gpu_report.json")
    # The figures docs/performance.md asks for are at the reference's resize, not the CPU's.
    parser.set_defaults(min_size=800)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--parts", nargs="+", choices=("steps", "wall"), default=["steps", "wall"])
    parser.add_argument("--gpus-per-trial", type=float, default=0.2,
                        help="each trial's share of the GPU in the at-once run")
    return parser


def gpu_description(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "bf16_supported": torch.cuda.is_bf16_supported()}


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measure_steps(config, backbone: str, device: torch.device, warmup: int,
                  steps: int) -> dict[str, Any]:
    """Median training step time and peak memory of one backbone at one precision."""
    from crossdet_ray.engine.train import build_model, build_optimizer, use_amp

    _free_gpu()
    torch.cuda.reset_peak_memory_stats(device)
    model = optimizer = None
    try:
        model = build_model(config, backbone, num_classes=2, device=device).to(device)
        optimizer, _ = build_optimizer(config, model)
        amp = use_amp(config, device)
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(5, config.min_size, config.max_size, generator=generator).to(device)
                  for _ in range(config.batch_size)]
        boxes = torch.tensor([[0.1, 0.15, 0.3, 0.6], [0.5, 0.2, 0.7, 0.7], [0.75, 0.1, 0.95, 0.9]])
        boxes = boxes * torch.tensor([config.max_size, config.min_size] * 2)
        targets = [{"boxes": boxes.to(device),
                    "labels": torch.ones(len(boxes), dtype=torch.int64, device=device)}
                   for _ in range(config.batch_size)]
        model.train()

        def step() -> float:
            # The engine's step (train_one_epoch), without the data transfer and logging.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        for _ in range(warmup):
            step()
        times, losses = [], []
        for _ in range(steps):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            losses.append(step())
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return {"step_sec": statistics.median(times), "step_times_sec": times,
                "images_per_sec": config.batch_size / statistics.median(times),
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "final_loss": losses[-1], "amp_bf16": amp}
    except torch.cuda.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}",
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    finally:
        del model, optimizer
        _free_gpu()


def one_by_one(config, data_dir: str, out: Path) -> dict[str, float]:
    """Each backbone's fit, one after another in this process, with the seed-layout files."""
    from crossdet_ray.engine.run_logs import SeedLogWriter
    from crossdet_ray.engine.storage import RunStorage
    from crossdet_ray.engine.train import fit

    times = {}
    for backbone in config.backbones:
        _free_gpu()
        start = time.perf_counter()
        writer = SeedLogWriter(RunStorage.from_uri(str(out / backbone)), backbone,
                               config.to_dict())
        fit(config, backbone, data_dir, listener=writer)
        times[backbone] = time.perf_counter() - start
    _free_gpu()
    return times


def at_once_command(args: argparse.Namespace, data_dir: str, log_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "all_backbones.py"),
            "--gpus-per-trial", f"{args.gpus_per_trial:g}", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--data", data_dir,
            "--min-size", str(args.min_size),
            "--max-size", str(run_train_config(args).max_size), "--num-workers", "0",
            "--backbones", *args.backbones, "--log-dir", str(log_dir), "--name", "at_once",
            "--no-dashboard", "--verbose", "0"]


def at_once(args: argparse.Namespace, data_dir: str, log_dir: Path) -> dict[str, Any]:
    env = {**os.environ}
    # One GPU: the point is the trials sharing it, not Ray spreading them over several.
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    result = subprocess.run(at_once_command(args, data_dir, log_dir), capture_output=True,
                            text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    record: dict[str, Any] = {"wall_sec": wall, "exit_code": result.returncode, "trials": {}}
    summary_file = log_dir / "at_once" / "final_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        record["summary_wall_sec"] = summary.get("total_wall_time_sec")
        record["trials"] = {r["trial"]: {k: r.get(k) for k in ("status", "total_time_sec",
                                                                "device", "resources", "error")}
                            for r in summary["results"]}
    if result.returncode != 0:
        record["stderr_tail"] = result.stderr[-4000:]
    return record


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(steps: dict[str, dict[str, dict]], wall: dict[str, Any] | None,
                  shape: str) -> str:
    """The tables: per-backbone step time and memory, then the wall-time comparison."""
    lines = []
    if steps:
        rows = []
        for backbone, by_precision in steps.items():
            fp32, bf16 = by_precision.get("fp32", {}), by_precision.get("bf16", {})
            speedup = (f"{fp32['step_sec'] / bf16['step_sec']:.2f}x"
                       if "step_sec" in fp32 and "step_sec" in bf16 else "-")
            rows.append((backbone,
                         _fmt(fp32.get("step_sec")) if "error" not in fp32 else "OOM",
                         _fmt(bf16.get("step_sec")) if "error" not in bf16 else "OOM",
                         speedup, _fmt(fp32.get("peak_memory_gib"), 2),
                         _fmt(bf16.get("peak_memory_gib"), 2)))
        lines.append(tabulate(rows, headers=("backbone", f"fp32 s/step @{shape}", "bf16 s/step",
                                             "bf16 speed-up", "fp32 peak GiB", "bf16 peak GiB"),
                              tablefmt="github", disable_numparse=True))
    if wall:
        sequential, together = wall.get("one_by_one_sec", {}), wall.get("at_once", {})
        trials = together.get("trials", {})
        rows = [(b, _fmt(t, 1), _fmt(trials.get(b, {}).get("total_time_sec"), 1))
                for b, t in sequential.items()]
        total = sum(sequential.values())
        at_once_wall = together.get("wall_sec")
        rows.append(("total / wall", _fmt(total, 1), _fmt(at_once_wall, 1)))
        rows.append(("speed-up", "", f"{total / at_once_wall:.2f}x" if at_once_wall else "-"))
        if lines:
            lines.append("")
        lines.append(tabulate(rows, headers=("backbone", "one by one: fit s",
                                             "at once: trial's fit s"),
                              tablefmt="github", disable_numparse=True))
        if together.get("exit_code"):
            lines.append(f"the at-once command exited {together['exit_code']}; its stderr is in "
                         "the JSON (wall.at_once.stderr_tail)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda")
    shape = f"{args.min_size}x{run_train_config(args).max_size}"

    steps: dict[str, dict[str, dict]] = {}
    if "steps" in args.parts:
        for backbone in args.backbones:
            steps[backbone] = {}
            for name, amp in PRECISIONS.items():
                config = run_train_config(args, batch_size=args.batch_size, device="cuda", amp=amp)
                record = measure_steps(config, backbone, device, args.warmup, args.steps)
                steps[backbone][name] = record
                # A long report can be cut short (a lease, a timeout): show and keep each figure.
                print(f"{backbone} {name}: " + (record["error"] if "error" in record else
                      f"{record['step_sec']:.3f} s/step, peak {record['peak_memory_gib']:.2f} GiB"),
                      flush=True)
                write_results(args, gpu=gpu_description(device), shape=shape, steps=steps,
                              wall=None)

    wall = None
    if "wall" in args.parts:
        from crossdet_ray.data.resolve import ensure_dataset, synthetic_spec

        data_dir = ensure_dataset(synthetic_spec(args.images, 0))
        config = run_train_config(args, data=data_dir, batch_size=args.batch_size, device="cuda")
        with tempfile.TemporaryDirectory() as tmp:
            sequential = one_by_one(config, data_dir, Path(tmp) / "one_by_one")
            together = at_once(args, data_dir, Path(tmp) / "logs")
        wall = {"one_by_one_sec": sequential, "one_by_one_total_sec": sum(sequential.values()),
                "at_once": together,
                "speedup": sum(sequential.values()) / together["wall_sec"]}

    print(format_report(steps, wall, shape))
    write_results(args, gpu=gpu_description(device), shape=shape, steps=steps, wall=wall)
    print(f"written: {args.output}")
    if wall and wall["at_once"]["exit_code"] != 0:
        print(f"gpu_report: the at-once command failed (exit {wall['at_once']['exit_code']})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
