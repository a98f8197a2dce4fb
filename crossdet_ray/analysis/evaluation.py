"""Evaluate every trial of a run (or a folder of checkpoints) with Ray, then write the tables,
pictures and report.

Accuracy passes run as Ray tasks all at once, each with the share its trial trained with;
then each trial is timed alone, one task after another, so no trial's speed is measured while
others compete for its device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import ray

from crossdet_ray.tune.connection import RayConnectionError, connect_ray

from crossdet_ray.analysis.plots import (
    pareto_front,
    pareto_png,
    pr_curves_png,
    training_curves_png,
)
from crossdet_ray.analysis.report import render_report
from crossdet_ray.analysis.sources import (
    EvaluationError,
    EvaluationPlan,
    TrialSource,
    finite_number,
    plan_evaluation,
)
from crossdet_ray.analysis.tasks import TrialJob, accuracy_pass, timing_pass
from crossdet_ray.engine.run_logs import _csv_text as csv_text
from crossdet_ray.engine.run_logs import dumps_json
from crossdet_ray.engine.storage import RunStorage

logger = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "trial", "backbone", "checkpoint", "epoch", "params", "model_size_mb", "map", "map50",
    "map75", "map_small", "map_medium", "map_large", "ar100", "infer_ms_per_image", "fps",
    "peak_memory_mb",
)
EXTRA_COLUMNS = ("status", "error", "device", "frames")
PER_CLASS_COLUMNS = ("trial", "class_id", "ap", "ap50")
CLOSE_TO_BEST = 0.01  # "within 1 mAP point": mAP is a fraction here
REPORT_FILE = "report.html"


@dataclass
class EvaluationOutcome:
    out_dir: str
    report_path: str
    rows: list[dict[str, Any]]
    choice: dict[str, Any]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def evaluate_run(run_dir: str, *, data: str | None = None, checkpoint: str = "best_map",
                 out: str | None = None, min_size: int | None = None,
                 max_size: int | None = None, checkpoint_pattern: str | None = None,
                 address: str | None = None) -> str:
    """Evaluate a finished run; returns the path of its report.html.

    For the training command's last step: Ray is reused when already initialised. Raises
    EvaluationError for a user mistake; failed trials are in the report and results.
    """
    return evaluate(plan_evaluation(run_dir, data=data, checkpoint=checkpoint, out=out,
                                    min_size=min_size, max_size=max_size,
                                    checkpoint_pattern=checkpoint_pattern),
                    address=address).report_path


def evaluate(plan: EvaluationPlan, address: str | None = None) -> EvaluationOutcome:
    try:
        started_ray = connect_ray(address).started_here
    except RayConnectionError as error:
        raise EvaluationError(str(error)) from error
    try:
        jobs = _jobs(plan)
        accuracy = _accuracy_passes(jobs)
        timing = _timing_passes(jobs, accuracy)
    finally:
        if started_ray:
            ray.shutdown()
    return write_outputs(plan, accuracy, timing)


# -- Ray -----------------------------------------------------------------------------------
def _fit_to_cluster(trial: TrialSource, trials: int) -> tuple[float, float]:
    """The trial's (cpu, gpu) share, within what the cluster has: a run trained on GPUs is
    evaluated on the CPU of a machine without one (with a warning), never left waiting. A
    checkpoint from a folder (no recorded share) gets an equal part of the cluster."""
    total = ray.cluster_resources()
    total_cpu, total_gpu = float(total.get("CPU", 1.0)), float(total.get("GPU", 0.0))
    cpu = trial.cpu if trial.cpu is not None else max(total_cpu / trials, 1.0)
    cpu = min(cpu, total_cpu) or 0.5
    if trial.gpu is None:
        return cpu, min(total_gpu / trials, 1.0)
    if trial.gpu > total_gpu:
        logger.warning("%s trained with %g GPU but this Ray cluster has %g: evaluating it on "
                       "the CPU", trial.name, trial.gpu, total_gpu)
        return cpu, 0.0
    return cpu, trial.gpu


def _jobs(plan: EvaluationPlan) -> dict[str, TrialJob | TrialSource]:
    """A job per trial with a checkpoint; the others stay TrialSources (with their error)."""
    jobs: dict[str, TrialJob | TrialSource] = {}
    for trial in plan.trials:
        if trial.checkpoint is None:
            jobs[trial.name] = trial
            continue
        cpu, gpu = _fit_to_cluster(trial, len(plan.trials))
        jobs[trial.name] = TrialJob(
            name=trial.name, checkpoint=trial.checkpoint, data_dir=plan.data_dir,
            split=plan.split, test_size=plan.test_size, split_seed=plan.split_seed,
            min_size=plan.min_size, max_size=plan.max_size, cpu=cpu, gpu=gpu,
            batch_size=plan.batch_size, data_listing=plan.data_listing)
    return jobs


def _remote(function, job: TrialJob):
    # max_calls=1: a fresh worker process per task, so its peak memory is this model's and a
    # GPU's memory is handed back when it ends.
    return ray.remote(max_calls=1, max_retries=0)(function).options(
        num_cpus=job.cpu, num_gpus=job.gpu).remote(job)


def _error_text(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".strip()


def _accuracy_passes(jobs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    refs = {name: _remote(accuracy_pass, job) for name, job in jobs.items()
            if isinstance(job, TrialJob)}
    results: dict[str, dict[str, Any]] = {}
    for name, job in jobs.items():
        if not isinstance(job, TrialJob):
            results[name] = {"error": job.error, "backbone": job.backbone}
            continue
        try:
            results[name] = ray.get(refs[name])
            logger.info("%s: mAP %.4f, mAP50 %.4f on %d frames", name,
                        results[name]["metrics"]["map"], results[name]["metrics"]["map50"],
                        results[name]["frames"])
        except Exception as error:  # a checkpoint that does not load, a crash: this trial only
            results[name] = {"error": _error_text(error)}
            logger.error("%s: evaluation failed: %s", name, results[name]["error"])
    return results


def _timing_passes(jobs: dict[str, Any], accuracy: dict[str, dict[str, Any]]
                   ) -> dict[str, dict[str, Any]]:
    timing: dict[str, dict[str, Any]] = {}
    for name, job in jobs.items():  # one at a time: each trial has its device to itself
        if not isinstance(job, TrialJob) or "error" in accuracy[name]:
            continue
        try:
            timing[name] = ray.get(_remote(timing_pass, job))
        except Exception as error:
            accuracy[name] = {**accuracy[name], "error": f"timing: {_error_text(error)}"}
    return timing


# -- outputs -------------------------------------------------------------------------------
def _row(plan: EvaluationPlan, trial: TrialSource, result: dict[str, Any],
         timed: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS + EXTRA_COLUMNS)
    row.update({"trial": trial.name, "backbone": result.get("backbone") or trial.backbone,
                "checkpoint": trial.checkpoint, "epoch": trial.epoch})
    if "metrics" in result:
        row.update(result["metrics"])
        row.update({k: result[k] for k in ("params", "model_size_mb", "device", "frames",
                                           "resources", "accuracy_window")})
        if result.get("epoch") is not None:
            row["epoch"] = result["epoch"]
    if timed:
        row.update({k: timed[k] for k in ("infer_ms_per_image", "fps", "peak_memory_mb",
                                          "timing_window")})
    row["error"] = result.get("error")
    row["status"] = "failed" if row["error"] else "ok"
    return row


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Pareto choice: the most accurate trial, and the fastest within 1 mAP point of it."""
    scored = [r for r in rows if r["status"] == "ok" and r["map"] is not None]
    if not scored:
        return {"most_accurate": None, "fastest_close_to_best": None, "pareto_front": []}
    best = max(scored, key=lambda r: (r["map"], -(r["infer_ms_per_image"] or math.inf)))
    close = [r for r in scored if r["map"] >= best["map"] - CLOSE_TO_BEST - 1e-12]
    fastest = min(close, key=lambda r: (r["infer_ms_per_image"] or math.inf, -r["map"]))
    points = {r["trial"]: (r["infer_ms_per_image"], r["map"]) for r in scored
              if r["infer_ms_per_image"] is not None}
    return {"most_accurate": best["trial"], "fastest_close_to_best": fastest["trial"],
            "pareto_front": pareto_front(points)}


def _training_curves(plan: EvaluationPlan, accuracy: dict[str, dict[str, Any]]
                     ) -> dict[str, dict[str, list]]:
    """From each trial's epoch_metrics.csv, else from its checkpoint's saved history."""
    curves = {}
    for trial in plan.trials:
        rows = trial.epoch_rows or []
        if rows:
            curves[trial.name] = {
                "epoch": [int(r["epoch"]) for r in rows],
                "map": [finite_number(r.get("map")) for r in rows],
                "loss": [finite_number(r.get("avg_loss")) for r in rows]}
            continue
        history = accuracy.get(trial.name, {}).get("history") or {}
        losses = history.get("epoch_losses") or []
        if losses:
            curves[trial.name] = {"epoch": list(range(1, len(losses) + 1)),
                                  "map": [finite_number(v) for v in history.get("map") or []],
                                  "loss": [finite_number(v) for v in losses]}
    return curves


def write_outputs(plan: EvaluationPlan, accuracy: dict[str, dict[str, Any]],
                  timing: dict[str, dict[str, Any]]) -> EvaluationOutcome:
    out = RunStorage.from_uri(plan.out_dir)
    out.makedirs()
    rows = [_row(plan, t, accuracy[t.name], timing.get(t.name)) for t in plan.trials]
    choice = choose(rows)
    ok = {r["trial"]: accuracy[r["trial"]] for r in rows if r["status"] == "ok"}

    per_class = [{"trial": name, "class_id": int(category) - 1, **values}
                 for name, result in ok.items()
                 for category, values in sorted(result["per_class"].items(),
                                                key=lambda item: int(item[0]))]
    drawings: dict[str, list[dict[str, Any]]] = {}
    for name, result in ok.items():
        out.write_text(f"predictions/{name}.json", json.dumps(result["predictions"]))
        drawings[name] = []
        for drawing in result["drawings"]:
            relative = f"detections/{name}/{drawing['frame']}.png"
            out.write_bytes(relative, drawing["png"])
            drawings[name].append({**{k: v for k, v in drawing.items() if k != "png"},
                                   "path": relative})

    pictures = {
        "pr_curves.png": pr_curves_png({n: (r["pr_recall"], r["pr_precision"])
                                        for n, r in ok.items()}),
        "pareto.png": pareto_png({r["trial"]: (r["infer_ms_per_image"], r["map"])
                                  for r in rows if r["status"] == "ok"}),
    }
    curves = _training_curves(plan, accuracy)
    if curves:
        pictures["curves.png"] = training_curves_png(curves)
    for file_name, png in pictures.items():
        out.write_bytes(file_name, png)

    out.write_text("results.csv", csv_text(RESULT_COLUMNS + EXTRA_COLUMNS, rows))
    out.write_text("per_class_ap.csv", csv_text(PER_CLASS_COLUMNS, per_class))
    summary = {
        "source": plan.source, "data": plan.data_dir, "split": plan.split,
        "checkpoint": plan.checkpoint_choice, "min_size": plan.min_size,
        "max_size": plan.max_size, "trials": rows, "choice": choice,
        "per_class_ap": per_class, "detections": drawings,
        "frame_errors": {name: result["frame_errors"] for name, result in ok.items()},
        "plan": {k: v for k, v in dataclasses.asdict(plan).items()
                 if k not in ("trials", "data_listing")},
    }
    out.write_text("results.json", dumps_json(summary))
    out.write_text(REPORT_FILE, render_report(summary, pictures, out))
    report_path = out.uri(REPORT_FILE)
    logger.info("evaluation report: %s", report_path)
    return EvaluationOutcome(out_dir=plan.out_dir, report_path=report_path, rows=rows,
                             choice=choice)
