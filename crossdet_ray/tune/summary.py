"""The cross-backbone summary: final_summary.json, a table with rankings, CSV/Parquet, curves.

It is built from the files every trial wrote to the run directory (training_info.json and
epoch_metrics.csv), plus Tune's verdict on each trial, so it is the same for a fresh run, a
resumed run and a run whose trials ran on other machines.
"""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime
from typing import Any

import pandas as pd
from tabulate import tabulate

from crossdet_ray.engine.run_logs import dumps_json
from crossdet_ray.engine.storage import RunStorage

logger = logging.getLogger(__name__)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

SUMMARY_COLUMNS = (
    "trial", "backbone", "lr", "status", "error", "params", "epochs_completed", "best_epoch",
    "best_loss", "final_loss", "map", "map50", "map75", "train_images_per_sec",
    "infer_ms_per_image", "fps", "total_time_sec", "device", "node", "node_id", "resources",
    "best_model_path", "final_model_path", "final_complete_path",
)


def _tune_verdicts(results) -> dict[str, dict[str, Any]]:
    """Per trial name: Tune's error (if any) for the trials in a ResultGrid."""
    verdicts: dict[str, dict[str, Any]] = {}
    if results is None:
        return verdicts
    for result in results:
        name = (result.config or {}).get("trial", {}).get("name")
        if name is None:
            continue
        error = result.error
        verdicts[name] = {"error": None if error is None else f"{type(error).__name__}: {error}"}
    return verdicts


def _trial_row(run_storage: RunStorage, spec: dict[str, Any], verdict: dict[str, Any] | None,
               tune_status: str | None) -> tuple[dict[str, Any], pd.DataFrame | None]:
    trial_storage = run_storage.child(spec["name"])
    info: dict[str, Any] = {}
    if trial_storage.exists("logs/training_info.json"):
        info = json.loads(trial_storage.read_text("logs/training_info.json"))
    epochs = None
    if trial_storage.exists("logs/epoch_metrics.csv"):
        epochs = pd.read_csv(io.BytesIO(trial_storage.read_bytes("logs/epoch_metrics.csv")))

    status = info.get("status", "not_started")
    # The trial's own record names the cause plainly; Tune's wraps it (RayTaskError(...)).
    error = info.get("error") or (verdict or {}).get("error")
    if error:
        error = ANSI_ESCAPE.sub("", error)
    if error and status != "completed":
        status = "failed"
    elif status in ("running", "not_started") and tune_status in ("PENDING", "RUNNING", "PAUSED"):
        status = "interrupted"  # resumable with --resume
    elif status == "running":
        status = "stopped"  # Tune ended it before its last epoch: ASHA's early stop

    best = {}
    if epochs is not None and len(epochs) and info.get("best_epoch"):
        match = epochs[epochs["epoch"] == info["best_epoch"]]
        if len(match):
            best = match.iloc[0].to_dict()
    speeds = epochs["images_per_sec"].dropna() if epochs is not None and len(epochs) else []
    row = {
        "trial": spec["name"], "backbone": spec["backbone"], "lr": spec["lr"], "status": status,
        "error": error.splitlines()[0] if error else None,
        "params": info.get("model_parameters"),
        "epochs_completed": int(epochs["epoch"].max()) if epochs is not None and len(epochs) else 0,
        "best_epoch": info.get("best_epoch"), "best_loss": info.get("best_loss"),
        "final_loss": float(epochs["avg_loss"].iloc[-1]) if epochs is not None and len(epochs) else None,
        "map": _number(best.get("map")), "map50": _number(best.get("map50")),
        "map75": _number(best.get("map75")),
        "train_images_per_sec": info.get("train_images_per_sec",
                                         float(speeds.mean()) if len(speeds) else None),
        "infer_ms_per_image": info.get("infer_ms_per_image"), "fps": info.get("fps"),
        "total_time_sec": info.get("total_time_sec",
                                   float(epochs["epoch_time_sec"].sum()) if epochs is not None
                                   and len(epochs) else None),
        "device": info.get("device"), "node": info.get("node"),
        "node_id": info.get("node_id"), "attempts_resumed_at": info.get("resumed_at_epochs", []),
        "resources": info.get("resources"),
        "best_model_path": info.get("best_model_path"),
        "final_model_path": info.get("final_model_path"),
        "final_complete_path": info.get("final_complete_path"),
    }
    if epochs is not None:
        epochs = epochs.assign(trial=spec["name"])
    return row, epochs


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN -> None


def build_final_summary(run_storage: RunStorage, run_config: dict[str, Any], results,
                        wall_time_sec: float,
                        tune_statuses: dict[str, str] | None = None) -> dict[str, Any]:
    saved = json.loads(run_storage.read_text("run_config.json"))
    verdicts = _tune_verdicts(results)
    rows, curves = [], []
    for spec in saved["trials"]:
        row, epochs = _trial_row(run_storage, spec, verdicts.get(spec["name"]),
                                 (tune_statuses or {}).get(spec["name"]))
        rows.append(row)
        if epochs is not None:
            curves.append(epochs)
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

    return {"accuracy_map": ranked("map", True),
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
    """The LR whose trial reached the highest mAP (the lowest loss where mAP is missing)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] not in ("completed", "stopped"):
            continue
        key = (row["map"] if row["map"] is not None else -1.0,
               -(row["best_loss"] if row["best_loss"] is not None else float("inf")))
        current = best.get(row["backbone"])
        if current is None or key > current["_key"]:
            best[row["backbone"]] = {"lr": row["lr"], "trial": row["trial"], "map": row["map"],
                                     "best_loss": row["best_loss"], "_key": key}
    return {b: {k: v for k, v in entry.items() if k != "_key"} for b, entry in best.items()}


def format_table(summary: dict[str, Any]) -> str:
    headers = ("trial", "status", "params", "epochs", "best loss", "mAP", "mAP50", "img/s train",
               "ms/img infer", "device", "node")
    table = [
        (r["trial"], r["status"], f"{r['params'] / 1e6:.1f}M" if r["params"] else "-",
         r["epochs_completed"], _fmt(r["best_loss"]), _fmt(r["map"]), _fmt(r["map50"]),
         _fmt(r["train_images_per_sec"], 2), _fmt(r["infer_ms_per_image"], 1),
         r["device"] or "-", r["node"] or "-")
        for r in summary["results"]
    ]
    lines = [tabulate(table, headers=headers, tablefmt="github"), ""]
    ranks = summary["rankings"]
    rows = summary["results"]
    lines.append("Accuracy ranking (mAP):   "
                 + _ranking_line(ranks["accuracy_map"], rows, "map", digits=3))
    lines.append("Speed ranking (train img/s): "
                 + _ranking_line(ranks["training_speed_images_per_sec"], rows,
                                 "train_images_per_sec", digits=2))
    for backbone, best in summary.get("best_lr_per_backbone", {}).items():
        lines.append(f"Best LR for {backbone}: {best['lr']:g} ({best['trial']})")
    lines.append(f"{summary['num_succeeded']} of {summary['num_trials']} trials succeeded, "
                 f"{summary['num_failed']} failed; wall time {summary['total_wall_time_sec']:.1f}s")
    for row in summary["results"]:
        if row["status"] == "failed":
            lines.append(f"FAILED {row['trial']}: {row['error']}")
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_summary_files(run_storage: RunStorage, summary: dict[str, Any]) -> None:
    curves = summary.pop("_curves", None)
    run_storage.write_text("final_summary.json", dumps_json(summary))
    frame = pd.DataFrame(summary["results"], columns=list(SUMMARY_COLUMNS))
    frame["resources"] = frame["resources"].map(lambda r: json.dumps(r) if r else None)
    run_storage.write_text("summary.csv", frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    run_storage.write_bytes("summary.parquet", buffer.getvalue())
    if curves is not None and len(curves):
        run_storage.write_bytes("training_curves.png", _curves_png(curves))


def _curves_png(curves: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    figure, (loss_axis, map_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for trial, frame in curves.groupby("trial", sort=True):
        frame = frame.sort_values("epoch")
        loss_axis.plot(frame["epoch"], frame["avg_loss"], marker="o", label=trial)
        if "map" in frame and frame["map"].notna().any():
            map_axis.plot(frame["epoch"], frame["map"], marker="o", label=trial)
    loss_axis.set(title="Training loss", xlabel="epoch", ylabel="average loss")
    map_axis.set(title="Test mAP (COCO 0.50:0.95)", xlabel="epoch", ylabel="mAP")
    for axis in (loss_axis, map_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
