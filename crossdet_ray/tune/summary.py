"""The cross-backbone summary: final_summary.json, a table with rankings, CSV/Parquet, curves.

It is built from the files every trial wrote to the run directory (training_info.json and
epoch_metrics.csv), plus Tune's verdict on each trial, so it is the same for a fresh run, a
resumed run and a run whose trials ran on other machines. `summarise_run` writes it whatever
happened to the run, and `run_exit_code` says how the command ends.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from crossdet_ray.engine.json_files import dumps_json
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.run_files import (EPOCH_LOG, FINAL_SUMMARY_FILE, RUN_CONFIG_FILE,
                                    SUMMARY_CSV_FILE, SUMMARY_PARQUET_FILE,
                                    TRAINING_CURVES_FILE)
from crossdet_ray.tune.failures import (
    ANSI_ESCAPE,
    UNFINISHED,
    TrialVerdict,
    classify_failure,
    error_text,
    first_line,
    headline,
    read_info,
    record_failures,
    tune_verdicts,
)

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "trial", "backbone", "lr", "status", "error", "failure_kind", "failure_reason", "params",
    "epochs_completed", "best_epoch", "best_loss", "final_loss", "map", "map50", "map75",
    "best_map_epoch", "best_map", "best_map50", "best_map75", "train_images_per_sec",
    "infer_ms_per_image", "fps", "inference_measured", "inference_concurrent_trials",
    "infer_ms_per_image_during_training", "total_time_sec", "predicted_hours", "measured_hours",
    "device", "node", "node_id", "resources", "best_model_path", "best_map_model_path",
    "final_model_path", "final_complete_path",
)
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
EXIT_UNPLACEABLE = 2  # a trial no node could hold, and none was launched (--pending-timeout)
MEASURED_ALONE = "alone (evaluation)"


def summarise_run(run_storage: RunStorage, run_config: dict[str, Any], results,
                  wall_time_sec: float, interrupted: bool = False,
                  run_error: BaseException | None = None,
                  terminated: bool = False,
                  unplaceable: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Record each errored trial's failure in its files, then build and write the summary.

    Never raises: whatever ended the run (a trial killed for memory, `tuner.fit()` raising),
    final_summary.json is written, with what went wrong in `run_error`. `results` is the
    ResultGrid, or None when `tuner.fit()` did not return one.
    """
    problems = [f"{type(run_error).__name__}: {first_line(str(run_error)) or ''}".rstrip(": ")
                ] if run_error is not None else []
    verdicts = tune_verdicts(run_storage, results)
    specs = _trial_specs(run_storage, verdicts)
    record_failures(run_storage, specs, verdicts, run_config.get("train"))
    try:
        summary = build_final_summary(run_storage, run_config, verdicts, wall_time_sec, specs)
    except Exception as error:  # a bug or unreadable files: still leave a summary
        logger.exception("could not build the run's summary from %s", run_storage.uri())
        problems.append(f"summary incomplete: {type(error).__name__}: {first_line(str(error))}")
        summary = _bare_summary(run_storage, run_config, specs, verdicts, wall_time_sec)
    # Tune saves the unfinished trials of a stopped run as PENDING (a SIGINT returns normally).
    summary["interrupted"] = interrupted or any(
        r["status"] == "interrupted" or (r["status"] != "completed" and getattr(
            verdicts.get(r["trial"]), "status", None) in UNFINISHED)
        for r in summary["results"])
    summary["run_error"] = "; ".join(problems) or None
    # SIGTERM (`ray job stop`, a batch scheduler) drains as Ctrl-C does; only the exit differs.
    summary["interrupted_by"] = ("SIGTERM" if terminated else "SIGINT") if summary[
        "interrupted"] else None
    if unplaceable:  # --pending-timeout stopped the run: trials no node could hold
        summary["unplaceable"] = unplaceable
        summary["interrupted_by"] = "pending_timeout"
    try:
        write_summary_files(run_storage, summary)
    except Exception:
        logger.exception("could not write every summary file in %s", run_storage.uri())
        summary.pop("_curves", None)
        _write_summary_where_it_fits(run_storage, summary)
    return summary


def _write_summary_where_it_fits(run_storage: RunStorage, summary: dict[str, Any]) -> None:
    """final_summary.json in the run directory, or (a full disk, a lost bucket) in the
    system's temporary folder; `summary["summary_path"]` says where it went."""
    summary["summary_path"] = run_storage.uri(FINAL_SUMMARY_FILE)
    try:
        run_storage.write_text(FINAL_SUMMARY_FILE, dumps_json(summary))
        return
    except Exception as error:
        reason = first_line(str(error))
    name = posixpath.basename(run_storage.root.rstrip("/")) or "run"
    fallback = Path(tempfile.gettempdir()) / f"crossdet_ray_{name}_final_summary.json"
    summary["summary_path"] = str(fallback)
    try:
        RunStorage.from_uri(str(fallback.parent)).write_text(fallback.name, dumps_json(summary))
    except Exception:
        logger.exception("could not write the run's summary anywhere")
        summary["summary_path"] = None
        return
    logger.warning("could not write final_summary.json in %s (%s): wrote it to %s instead",
                   run_storage.uri(), reason, fallback)


def run_exit_code(summary: dict[str, Any]) -> int:
    """1 when the run itself failed; 2 when trials waited past --pending-timeout for a node
    that never came; 130 when it was interrupted by Ctrl-C, 143 by SIGTERM (all three
    resumable); 1 when any
    trial did not finish (ASHA's early stop is a finish); else 0."""
    if summary.get("run_error"):
        return EXIT_FAILED
    if summary.get("unplaceable"):
        return EXIT_UNPLACEABLE
    if summary.get("interrupted"):
        return EXIT_TERMINATED if summary.get("interrupted_by") == "SIGTERM" else EXIT_INTERRUPTED
    finished = {"completed"}
    if (summary.get("run_config") or {}).get("scheduler") == "asha":
        finished.add("stopped")
    if any(r["status"] not in finished for r in summary["results"]):
        return EXIT_FAILED
    return EXIT_OK


def _trial_specs(run_storage: RunStorage, verdicts: dict[str, TrialVerdict]
                 ) -> list[dict[str, Any]]:
    """The run's trials in the user's order, from run_config.json (Tune's names without it)."""
    try:
        return json.loads(run_storage.read_text(RUN_CONFIG_FILE))["trials"]
    except (OSError, ValueError, KeyError) as error:
        logger.warning("cannot read the trials of %s: %s", run_storage.uri(RUN_CONFIG_FILE),
                       error)
        return [{"name": n, "backbone": n.split("_lr")[0], "lr": None} for n in verdicts]


def _bare_summary(run_storage, run_config, specs, verdicts, wall_time_sec) -> dict[str, Any]:
    rows = [{"trial": s["name"], "backbone": s["backbone"], "lr": s["lr"],
             "status": _bare_status(verdicts.get(s["name"])), "error": None} for s in specs]
    return {"run_config": run_config, "run_dir": run_storage.uri(),
            "total_wall_time_sec": wall_time_sec, "num_trials": len(rows),
            "num_succeeded": sum(r["status"] == "completed" for r in rows),
            "num_failed": sum(r["status"] == "failed" for r in rows),
            "num_stopped": 0, "results": rows,
            "rankings": {"accuracy_map": [], "training_speed_images_per_sec": [],
                         "inference_ms_per_image": []},
            "best_lr_per_backbone": {},
            "timestamp": datetime.now().isoformat(timespec="seconds")}


def _bare_status(verdict: TrialVerdict | None) -> str:
    status = verdict.status if verdict else None
    return {"TERMINATED": "completed", "ERROR": "failed"}.get(
        status, "interrupted" if status in UNFINISHED else "not_started")


def _trial_row(run_storage: RunStorage, spec: dict[str, Any], verdict: TrialVerdict | None,
               train: dict[str, Any] | None = None, predicted_hours: float | None = None
               ) -> tuple[dict[str, Any], pd.DataFrame | None, dict[str, Any]]:
    """The trial's summary row, its epoch rows and its training_info.json."""
    trial_storage = run_storage.child(spec["name"])
    info = read_info(trial_storage) or {}
    epochs = None
    if trial_storage.exists(EPOCH_LOG):
        epochs = pd.read_csv(io.BytesIO(trial_storage.read_bytes(EPOCH_LOG)))

    verdict = verdict or TrialVerdict()
    status = info.get("status", "not_started")
    # The trial's own record names the cause plainly; Tune's wraps it (RayTaskError(...)).
    error = info.get("error") or error_text(verdict.error)
    if error:
        error = ANSI_ESCAPE.sub("", error)
    if status != "completed" and (error or verdict.status == "ERROR"):
        status = "failed"  # also a trial Tune errored before it wrote a word
    elif status in ("running", "not_started") and verdict.status in UNFINISHED:
        status = "interrupted"  # resumable with --resume
    elif status == "running":
        status = "stopped"  # Tune ended it before its last epoch: ASHA's early stop
    failure = None
    if status == "failed":
        failure = classify_failure(info.get("error"), verdict.error, verdict.error_text,
                                   train=train)

    best = _epoch_row(epochs, info.get("best_epoch"))
    # The highest test mAP, from the rows themselves: they are the committed epochs, which a
    # trial killed before its training_info.json caught up may hold more of.
    best_map_epoch = None
    if epochs is not None and len(epochs) and "map" in epochs and epochs["map"].notna().any():
        best_map_epoch = int(epochs.loc[epochs["map"].idxmax(), "epoch"])
    best_map = _epoch_row(epochs, best_map_epoch)
    speeds = epochs["images_per_sec"].dropna() if epochs is not None and len(epochs) else []
    row = {
        "trial": spec["name"], "backbone": spec["backbone"], "lr": spec["lr"], "status": status,
        "error": headline(error),
        "failure_kind": info.get("failure_kind") or (failure.kind if failure else None),
        "failure_reason": info.get("failure_reason") or (failure.reason if failure else None),
        "advice": info.get("advice") or (failure.advice if failure else None),
        "params": info.get("model_parameters"),
        "epochs_completed": int(epochs["epoch"].max()) if epochs is not None and len(epochs) else 0,
        "best_epoch": info.get("best_epoch"), "best_loss": info.get("best_loss"),
        "final_loss": float(epochs["avg_loss"].iloc[-1]) if epochs is not None and len(epochs) else None,
        "map": _number(best.get("map")), "map50": _number(best.get("map50")),
        "map75": _number(best.get("map75")),
        # Each trial's best-accuracy epoch: what the accuracy ranking compares.
        "best_map_epoch": best_map_epoch, "best_map": _number(best_map.get("map")),
        "best_map50": _number(best_map.get("map50")),
        "best_map75": _number(best_map.get("map75")),
        "train_images_per_sec": info.get("train_images_per_sec",
                                         float(speeds.mean()) if len(speeds) else None),
        # Timed at the end of training, while other trials may have shared the device: the
        # end-of-run evaluation replaces it with a figure taken alone (apply_evaluation_timing).
        "infer_ms_per_image": _number(info.get("infer_ms_per_image")),
        "fps": _number(info.get("fps")),
        "inference_measured": None, "inference_concurrent_trials": None,
        "infer_ms_per_image_during_training": _number(info.get("infer_ms_per_image")),
        "total_time_sec": info.get("total_time_sec",
                                   float(epochs["epoch_time_sec"].sum()) if epochs is not None
                                   and len(epochs) else None),
        # The planner's prediction beside the measurement, so the cost model can be corrected.
        "predicted_hours": predicted_hours,
        "device": info.get("device"), "node": info.get("node"),
        "node_id": info.get("node_id"), "attempts_resumed_at": info.get("resumed_at_epochs", []),
        "resources": info.get("resources"),
        "best_model_path": info.get("best_model_path"),
        "best_map_model_path": info.get("best_map_model_path"),
        "final_model_path": info.get("final_model_path"),
        "final_complete_path": info.get("final_complete_path"),
    }
    row["measured_hours"] = (round(row["total_time_sec"] / 3600, 4)
                             if row["total_time_sec"] is not None else None)
    if epochs is not None:
        epochs = epochs.assign(trial=spec["name"])
    return row, epochs, info


# -- how each inference figure was measured ----------------------------------------------------
def _span(info: dict[str, Any]) -> tuple[float | None, float | None]:
    """(start, end) epoch seconds of a trial's last attempt; end None when it never recorded
    one (killed, interrupted)."""
    def first(*keys: str) -> float | None:
        values = [_number(info.get(k)) for k in keys]
        return next((v for v in values if v is not None), None)

    return first("fit_started_at", "train_started_at"), first("train_finished_at", "failed_at")


def concurrent_trials(trial: str, infos: dict[str, dict[str, Any]]) -> int | None:
    """How many other trials were running on `trial`'s node while its inference was timed at
    the end of training (None: the window or the others' times are not recorded).

    A trial counts when its recorded span [fit start, finish or failure] overlaps the timing
    window; one with no recorded end counts if it started before the window ended. Trials on
    another node (both node ids known and different) share nothing and are not counted.
    """
    info = infos.get(trial) or {}
    window = info.get("infer_window")
    if not window or len(window) != 2:
        return None
    begin, finish = float(window[0]), float(window[1])
    node = info.get("node_id")
    count = 0
    for name, other in infos.items():
        if name == trial or not other:
            continue
        if node and other.get("node_id") and other["node_id"] != node:
            continue
        start, end = _span(other)
        if start is None:
            continue  # never started training
        if start <= finish and (end is None or end >= begin):
            count += 1
    return count


def training_timing_label(concurrent: int | None) -> str:
    if concurrent is None:
        return "during training (other trials running then: unknown)"
    if concurrent == 0:
        return "during training, no other trial running on its node"
    return (f"during training, shared with {concurrent} concurrent "
            f"trial{'s' if concurrent != 1 else ''} on its node")


def label_training_timing(rows: list[dict[str, Any]], infos: dict[str, dict[str, Any]]) -> None:
    """Say of each training-time inference figure how many trials shared its node then."""
    for row in rows:
        if row.get("infer_ms_per_image") is None:
            continue
        concurrent = concurrent_trials(row["trial"], infos)
        row["inference_concurrent_trials"] = concurrent
        row["inference_measured"] = training_timing_label(concurrent)


def apply_evaluation_timing(summary: dict[str, Any], evaluation_rows: list[dict[str, Any]]
                            ) -> dict[str, Any]:
    """Put the end-of-run evaluation's inference figures, each timed with the trial alone on
    its device, in place of the ones taken during training (kept in
    `infer_ms_per_image_during_training`), and rank by them. A trial the evaluation could
    not time keeps its training-time figure and label. Returns `summary`, changed in place."""
    timed = {r["trial"]: r for r in evaluation_rows
             if r.get("status") == "ok" and _number(r.get("infer_ms_per_image")) is not None}
    for row in summary["results"]:
        alone = timed.get(row["trial"])
        if alone is None:
            continue
        row["infer_ms_per_image"] = _number(alone["infer_ms_per_image"])
        row["fps"] = _number(alone.get("fps"))
        row["inference_measured"] = MEASURED_ALONE
        row["inference_concurrent_trials"] = 0
    summary["rankings"] = rankings(summary["results"])
    return summary


def planned_hours(run_config: dict[str, Any]) -> dict[str, float]:
    """Each trial's predicted hours from the plan run_config.json keeps (none: no plan)."""
    plan = run_config.get("plan") or {}
    return {t["trial"]: t["predicted_hours"] for t in plan.get("trials", [])}


def _epoch_row(epochs: pd.DataFrame | None, epoch: int | None) -> dict[str, Any]:
    if epochs is None or not len(epochs) or not epoch:
        return {}
    match = epochs[epochs["epoch"] == epoch]
    return match.iloc[0].to_dict() if len(match) else {}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN -> None


def build_final_summary(run_storage: RunStorage, run_config: dict[str, Any],
                        verdicts: dict[str, TrialVerdict], wall_time_sec: float,
                        specs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if specs is None:
        specs = _trial_specs(run_storage, verdicts)
    rows, curves, infos = [], [], {}
    predicted = planned_hours(run_config)
    for spec in specs:
        row, epochs, infos[spec["name"]] = _trial_row(
            run_storage, spec, verdicts.get(spec["name"]), run_config.get("train"),
            predicted.get(spec["name"]))
        rows.append(row)
        if epochs is not None:
            curves.append(epochs)
    label_training_timing(rows, infos)
    succeeded = [r for r in rows if r["status"] == "completed"]
    summary = {
        "run_config": run_config,
        "run_dir": run_storage.uri(),
        "total_wall_time_sec": wall_time_sec,
        "num_trials": len(rows),
        "num_succeeded": len(succeeded),
        "num_failed": sum(r["status"] == "failed" for r in rows),
        "num_stopped": sum(r["status"] in ("stopped", "interrupted", "not_started") for r in rows),
        "results": rows,
        "rankings": rankings(rows),
        "best_lr_per_backbone": best_lr_per_backbone(rows) if run_config.get("lr_grid") else {},
        "timestamp": datetime.now().isoformat(timespec="seconds"),
    }
    summary["_curves"] = pd.concat(curves, ignore_index=True) if curves else None
    return summary


def rankings(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    def ranked(key: str, reverse: bool) -> list[str]:
        scored = [r for r in rows if r.get(key) is not None]
        return [r["trial"] for r in sorted(scored, key=lambda r: r[key], reverse=reverse)]

    return {"accuracy_map": ranked("best_map", True),
            "training_speed_images_per_sec": ranked("train_images_per_sec", True),
            "inference_ms_per_image": ranked("infer_ms_per_image", False)}


def _ranking_line(order: list[str], rows: list[dict[str, Any]], key: str, digits: int) -> str:
    """`a > b = c`: trials whose values print the same (to `digits`) are tied, not ranked."""
    values = {r["trial"]: round(r[key], digits) for r in rows if r.get(key) is not None}
    groups: list[tuple[float, list[str]]] = []
    for trial in order:
        if groups and groups[-1][0] == values[trial]:
            groups[-1][1].append(trial)
        else:
            groups.append((values[trial], [trial]))
    return " > ".join(" = ".join(trials) for _, trials in groups) or "-"


def best_lr_per_backbone(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The LR whose trial reached the highest mAP at any epoch (the lowest loss where mAP is
    missing)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] not in ("completed", "stopped"):
            continue
        key = (row["best_map"] if row.get("best_map") is not None else -1.0,
               -(row["best_loss"] if row["best_loss"] is not None else float("inf")))
        current = best.get(row["backbone"])
        if current is None or key > current["_key"]:
            best[row["backbone"]] = {"lr": row["lr"], "trial": row["trial"],
                                     "map": row.get("best_map"),
                                     "best_map_epoch": row.get("best_map_epoch"),
                                     "best_loss": row["best_loss"], "_key": key}
    return {b: {k: v for k, v in entry.items() if k != "_key"} for b, entry in best.items()}


def format_table(summary: dict[str, Any]) -> str:
    # Both bests with their epochs: the seed's lowest loss (best_model.pth) and the highest
    # test mAP (best_map_model.pth), with that epoch's mAP50.
    headers = ("trial", "status", "params", "epochs", "best loss (ep)", "best mAP (ep)",
               "mAP50 (best mAP ep)", "img/s train", "ms/img infer", "device", "node")
    table = [
        (r["trial"], r["status"], f"{r['params'] / 1e6:.1f}M" if r["params"] else "-",
         r["epochs_completed"], _with_epoch(r["best_loss"], r.get("best_epoch")),
         _with_epoch(r.get("best_map"), r.get("best_map_epoch")), _fmt(r.get("best_map50")),
         _fmt(r["train_images_per_sec"], 2), _infer_cell(r),
         r["device"] or "-", r["node"] or "-")
        for r in summary["results"]
    ]
    lines = [tabulate(table, headers=headers, tablefmt="github"), ""]
    ranks = summary["rankings"]
    rows = summary["results"]
    lines.append("Accuracy ranking (best test mAP, each trial at its best-mAP epoch): "
                 + _ranking_line(ranks["accuracy_map"], rows, "best_map", digits=3))
    lines.append("Speed ranking (train img/s): "
                 + _ranking_line(ranks["training_speed_images_per_sec"], rows,
                                 "train_images_per_sec", digits=2))
    lines.append(_inference_ranking_line(ranks.get("inference_ms_per_image", []), rows))
    for backbone, best in summary.get("best_lr_per_backbone", {}).items():
        lines.append(f"Best LR for {backbone}: {best['lr']:g} ({best['trial']}, by best mAP)")
    lines.append(f"{summary['num_succeeded']} of {summary['num_trials']} trials succeeded, "
                 f"{summary['num_failed']} failed; wall time {summary['total_wall_time_sec']:.1f}s")
    for row in summary["results"]:
        if row["status"] == "failed":
            lines.append(failed_line(row))
    if summary.get("run_error"):
        lines.append(f"RUN FAILED: {summary['run_error']}")
    return "\n".join(lines)


def _shared(row: dict[str, Any]) -> bool:
    """A figure timed during training (while others may have run), not alone."""
    return row.get("infer_ms_per_image") is not None and \
        row.get("inference_measured") != MEASURED_ALONE


def _infer_cell(row: dict[str, Any]) -> str:
    """`12.3` timed alone; `12.3*` timed during training, with other trials running."""
    cell = _fmt(row.get("infer_ms_per_image"), 1)
    return cell + "*" if _shared(row) else cell


def _inference_ranking_line(order: list[str], rows: list[dict[str, Any]]) -> str:
    """The ranking by inference ms/image, saying how its figures were measured."""
    ranked = [r for r in rows if r.get("infer_ms_per_image") is not None]
    shared = [r for r in ranked if _shared(r)]
    if not shared:
        how = "each trial timed alone by the evaluation"
    else:
        counts = [r.get("inference_concurrent_trials") for r in shared]
        where = "* = " if len(shared) < len(ranked) else ""
        if any(c for c in counts if c is not None):
            how = (f"{where}timed at the end of training while up to "
                   f"{max(c for c in counts if c is not None)} other trials shared the node: "
                   "not comparable; experiments/evaluate.py times each alone")
        elif None in counts:
            how = (f"{where}timed at the end of training, perhaps while other trials ran: "
                   "experiments/evaluate.py times each alone")
        else:
            how = f"{where}timed at the end of training, no other trial running"
    return (f"Inference ranking (ms/image, fastest first; {how}): "
            + _ranking_line(order, rows, "infer_ms_per_image", digits=1))


def failed_line(row: dict[str, Any]) -> str:
    """`FAILED mit_b0: out of memory (...) — try --batch-size 1, ...`: one line per trial."""
    reason = row.get("failure_reason") or row.get("error") or "failed"
    advice = row.get("advice")
    return f"FAILED {row['trial']}: {reason}" + (f" \u2014 {advice}" if advice else "")


def _with_epoch(value: Any, epoch: Any) -> str:
    return "-" if value is None else f"{value:.4f} ({epoch})"


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_summary_files(run_storage: RunStorage, summary: dict[str, Any]) -> None:
    curves = summary.pop("_curves", None)
    run_storage.write_text(FINAL_SUMMARY_FILE, dumps_json(summary))
    frame = pd.DataFrame(summary["results"], columns=list(SUMMARY_COLUMNS))
    frame["resources"] = frame["resources"].map(lambda r: json.dumps(r) if r else None)
    run_storage.write_text(SUMMARY_CSV_FILE, frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    run_storage.write_bytes(SUMMARY_PARQUET_FILE, buffer.getvalue())
    if curves is not None and len(curves):
        run_name = posixpath.basename(run_storage.root)
        run_storage.write_bytes(TRAINING_CURVES_FILE, _curves_png(curves, run_name))


def _curves_png(curves: pd.DataFrame, run_name: str) -> bytes:
    """The run's training_curves.png: the evaluation's training-curves picture (analysis/plots)
    of the trials' epoch rows."""
    from crossdet_ray.analysis.plots import training_curves_png  # matplotlib: only when drawn

    by_trial = {}
    for trial, frame in curves.groupby("trial", sort=True):
        frame = frame.sort_values("epoch")
        maps = frame["map"] if "map" in frame else pd.Series([None] * len(frame))
        by_trial[str(trial)] = {
            "epoch": [int(e) for e in frame["epoch"]],
            "loss": [None if pd.isna(v) else float(v) for v in frame["avg_loss"]],
            "map": [None if pd.isna(v) else float(v) for v in maps]}
    return training_curves_png(by_trial, title=f"{run_name}: training curves", size=(12, 4.5))
