"""What a run takes from, or gives to, the world around it: `--init-from` (the weights of an
earlier run) and `--mlflow` (every trial as an MLflow run).

Both are resolved before Ray starts, so a wrong run directory or a missing MLflow ends the
command with one line, and nothing started.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow.fs as pafs

from crossdet_ray.config import MLFLOW_DEFAULT
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.run_files import BEST_MAP_FILE, INFO_FILE, RUN_CONFIG_FILE


class FollowUpError(ValueError):
    """--init-from or --mlflow cannot be honoured; the launcher turns it into a LaunchError."""


def _source_trials(run: RunStorage) -> list[dict[str, Any]]:
    """The source run's trials: from its run_config.json, else its folders (a backbone's
    folder is named after it)."""
    try:
        return json.loads(run.read_text(RUN_CONFIG_FILE))["trials"]
    except (OSError, ValueError, KeyError):
        selector = pafs.FileSelector(run.root, allow_not_found=True)
        return [{"name": posixpath.basename(info.path), "backbone": posixpath.basename(info.path)}
                for info in sorted(run.filesystem.get_file_info(selector), key=lambda i: i.path)
                if info.type == pafs.FileType.Directory]


def _info(trial: RunStorage) -> dict[str, Any]:

    try:
        return json.loads(trial.read_text(INFO_FILE))
    except (OSError, ValueError):  # none, or damaged: the trial is still a candidate
        return {}


def _best_map(trial: RunStorage) -> float:
    value = _info(trial).get("best_map")
    return float(value) if value is not None else float("-inf")


def resolve_init_weights(run_dir: str, backbones: list[str]) -> dict[str, dict[str, Any]]:
    """{backbone: {"path", "trial", "best_map", "best_map_epoch"}} of `run_dir`'s (a folder
    or a bucket URI) best_map_model.pth for every backbone; among an LR grid's trials, the
    best one's. "path" is a location every node opens: a path, or the URI with its options."""

    source = RunStorage.from_uri(run_dir.rstrip("/") if "://" in run_dir else run_dir)
    try:
        is_run = source.filesystem.get_file_info(source.root).type == pafs.FileType.Directory \
            or source.exists(RUN_CONFIG_FILE)
    except OSError as error:
        raise FollowUpError(f"--init-from: {source.uri()} cannot be read ({error})") from error
    if not is_run:
        raise FollowUpError(f"--init-from: {run_dir} is not a directory; pass a finished run's "
                            "directory (or its bucket URI), e.g. training_logs/run_20251107_120000")
    trials = _source_trials(source)
    chosen: dict[str, dict[str, Any]] = {}
    missing = []
    for backbone in backbones:
        candidates = [t["name"] for t in trials if t.get("backbone") == backbone
                      and source.child(t["name"]).exists(BEST_MAP_FILE)]
        if not candidates:
            missing.append(backbone)
            continue
        name = max(candidates, key=lambda n: _best_map(source.child(n)))
        info = _info(source.child(name))
        chosen[backbone] = {"path": source.child(name).full_uri(BEST_MAP_FILE), "trial": name,
                            "best_map": info.get("best_map"),
                            "best_map_epoch": info.get("best_map_epoch")}
    if missing:
        raise FollowUpError(
            f"--init-from: {source.uri()} has no {BEST_MAP_FILE} for {', '.join(missing)} (it "
            f"has one for: {', '.join(chosen) or 'no backbone'}); leave those out of "
            "--backbones, or train them first")
    return chosen


def mlflow_tracking_uri(requested: str, run_dir: str, run_is_local: bool) -> str:
    """The tracking URI for `--mlflow [URI]`; without one, a SQLite file in the run."""
    if requested != MLFLOW_DEFAULT:
        return requested
    if not run_is_local:
        raise FollowUpError(f"--mlflow: the run directory {run_dir} is not on a local disk, so "
                            "it cannot hold the default sqlite database; name a tracking "
                            "server, e.g. --mlflow http://mlflow-host:5000")
    return f"sqlite:///{run_dir}/mlflow.db"


def mlflow_callback(tracking_uri: str, experiment_name: str, run_dir: str):
    """Ray Tune's MLflow logger: one MLflow run per trial, its config as params, every
    reported epoch's metrics (step = epoch), the run directory as a tag."""
    try:
        import mlflow  # noqa: F401  (the callback imports it lazily; fail here, clearly)
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError as error:
        raise FollowUpError(f"--mlflow needs MLflow, which is not installed ({error}); "
                            "install it with: pip install 'crossdet_ray[mlflow]'") from error

    class EpochMetricsCallback(MLflowLoggerCallback):
        """Tune's result repeats the trial's config; it is logged once, as params, not as a
        metric per epoch."""

        def log_trial_result(self, iteration, trial, result):
            super().log_trial_result(iteration, trial,
                                     {k: v for k, v in result.items() if k != "config"})

    return EpochMetricsCallback(tracking_uri=tracking_uri, experiment_name=experiment_name,
                                tags={"run_dir": run_dir})
