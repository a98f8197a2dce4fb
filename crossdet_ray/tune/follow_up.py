"""What a run takes from, or gives to, the world around it: `--init-from` (the weights of an
earlier run) and `--mlflow` (every trial as an MLflow run).

Both are resolved before Ray starts, so a wrong run directory or a missing MLflow ends the
command with one line, and nothing started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crossdet_ray.config import MLFLOW_DEFAULT


class FollowUpError(ValueError):
    """--init-from or --mlflow cannot be honoured; the launcher turns it into a LaunchError."""


def _source_trials(run_dir: Path) -> list[dict[str, Any]]:
    """The source run's trials: from its run_config.json, else its folders (a backbone's
    folder is named after it)."""
    try:
        return json.loads((run_dir / "run_config.json").read_text())["trials"]
    except (OSError, ValueError, KeyError):
        return [{"name": p.name, "backbone": p.name} for p in sorted(run_dir.iterdir())
                if p.is_dir()]


def _info(trial_dir: Path) -> dict[str, Any]:
    from crossdet_ray.engine.run_logs import INFO_FILE  # (run_logs imports torch: only here)

    try:
        return json.loads((trial_dir / INFO_FILE).read_text())
    except (OSError, ValueError):  # none, or damaged: the trial is still a candidate
        return {}


def _best_map(trial_dir: Path) -> float:
    value = _info(trial_dir).get("best_map")
    return float(value) if value is not None else float("-inf")


def resolve_init_weights(run_dir: str, backbones: list[str]) -> dict[str, dict[str, Any]]:
    """{backbone: {"path", "trial", "best_map", "best_map_epoch"}} of `run_dir`'s
    best_map_model.pth for every backbone; among an LR grid's trials, the best one's."""
    from crossdet_ray.engine.run_logs import BEST_MAP_FILE  # (imports torch: only for --init-from)

    source = Path(run_dir).expanduser().resolve()
    if not source.is_dir():
        raise FollowUpError(f"--init-from: {run_dir} is not a directory; pass a finished run's "
                            "directory, e.g. training_logs/run_20251107_120000")
    trials = _source_trials(source)
    chosen: dict[str, dict[str, Any]] = {}
    missing = []
    for backbone in backbones:
        candidates = [t["name"] for t in trials if t.get("backbone") == backbone
                      and (source / t["name"] / BEST_MAP_FILE).is_file()]
        if not candidates:
            missing.append(backbone)
            continue
        name = max(candidates, key=lambda n: _best_map(source / n))
        info = _info(source / name)
        chosen[backbone] = {"path": str(source / name / BEST_MAP_FILE), "trial": name,
                            "best_map": info.get("best_map"),
                            "best_map_epoch": info.get("best_map_epoch")}
    if missing:
        raise FollowUpError(
            f"--init-from: {source} has no {BEST_MAP_FILE} for {', '.join(missing)} (it has "
            f"one for: {', '.join(chosen) or 'no backbone'}); leave those out of --backbones, "
            "or train them first")
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
