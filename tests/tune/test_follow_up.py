"""After a run: `--init-from` fine-tunes from it, `--mlflow` logs every trial to MLflow.

One command serves both (a module fixture): an LR grid of two test_mit trials, both started
from the best_map_model.pth of a source run the engine trained on the easy set, logged to
MLflow's default SQLite database in the run. The source is trained without Ray (the same
files in the same layout) to keep the module to one Ray start.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .helpers import ROOT, assert_trained, command, epoch_rows, ray_env, run, run_in_process, training_info

pytestmark = pytest.mark.ray

# The easy set of test_learning.py (one or two large warm objects a frame), smaller.
FRAMES, FRAME_SIZE, MAX_OBJECTS, OBJECT_SCALE = 30, (96, 144), 2, (0.35, 0.55)
MIN_SIZE, MAX_SIZE, LR = 64, 96, 0.01
SOURCE_EPOCHS, EPOCHS = 2, 2
LR_GRID = ("1", "0.5")
TRIALS = ("test_mit_lr0.01", "test_mit_lr0.005")


@pytest.fixture(scope="module")
def easy_dataset(tmp_path_factory) -> Path:
    from crossdet_ray.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("follow_up_data"), FRAMES, seed=0,
                            sizes=[FRAME_SIZE], max_objects=MAX_OBJECTS,
                            object_scale=OBJECT_SCALE)


@pytest.fixture(scope="module")
def source_run(easy_dataset, tmp_path_factory) -> Path:
    """A finished test_mit of SOURCE_EPOCHS epochs in the run layout, trained by the engine."""
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.run_logs import SeedLogWriter
    from crossdet_ray.engine.storage import RunStorage
    from crossdet_ray.engine.train import fit

    run_dir = tmp_path_factory.mktemp("source_run")
    config = TrainConfig(data=str(easy_dataset), epochs=SOURCE_EPOCHS, lr=LR, num_workers=0,
                         backbones=["test_mit"], min_size=MIN_SIZE, max_size=MAX_SIZE)
    writer = SeedLogWriter(RunStorage.from_uri(str(run_dir / "test_mit")), "test_mit",
                           config.to_dict())
    fit(config, "test_mit", str(easy_dataset), listener=writer)
    assert_trained(run_dir / "test_mit")
    return run_dir


@pytest.fixture(scope="module")
def fine_tuned(easy_dataset, source_run, tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("follow_up_logs")
    args = ["--data", str(easy_dataset), "--backbones", "test_mit",
            "--min-size", str(MIN_SIZE), "--max-size", str(MAX_SIZE), "--num-workers", "0",
            "--epochs", str(EPOCHS), "--lr", str(LR), "--lr-grid", *LR_GRID,
            "--init-from", str(source_run), "--mlflow",
            "--gpus-per-trial", "0", "--cpus-per-trial", "1",
            "--log-dir", str(log_dir), "--name", "tuned", "--no-dashboard", "--no-evaluate", "--verbose", "0"]
    result = run(args, log_dir / "output", "tuned", timeout=500)
    assert result.process.returncode == 0, result.stderr[-3000:]
    for trial in TRIALS:
        assert_trained(log_dir / "tuned" / trial)
    return log_dir / "tuned"


def test_init_from_starts_at_the_trained_models_loss(source_run, fine_tuned):
    """Epoch 1 of a fine-tuning run trains the source's weights: its loss is near the
    source's last epoch, far below what a fresh model's first epoch costs (the source's own
    epoch 1: the same data, seed and lr from fresh weights)."""
    source = [float(r["avg_loss"]) for r in epoch_rows(source_run / "test_mit")]
    fresh_first, trained_last = source[0], source[-1]
    assert trained_last < 0.7 * fresh_first, f"the source did not learn: {source}"
    for trial in TRIALS:
        first = float(epoch_rows(fine_tuned / trial)[0]["avg_loss"])
        # Nearer the trained model's loss than the fresh one's, by a wide margin.
        assert first < (fresh_first + trained_last) / 2, (trial, first, source)


def test_init_from_is_recorded(source_run, fine_tuned):
    source_file = source_run / "test_mit" / "checkpoints" / "best_map_model.pth"
    source_info = training_info(source_run / "test_mit")
    saved = json.loads((fine_tuned / "run_config.json").read_text())
    assert saved["init_from"] == str(source_run)
    recorded = saved["init_weights"]["test_mit"]
    assert recorded["path"] == str(source_file.resolve())
    assert recorded["best_map_epoch"] == source_info["best_map_epoch"]
    for trial in TRIALS:
        info = training_info(fine_tuned / trial)
        assert info["init_from"] == {"path": str(source_file.resolve()),
                                     "epoch": source_info["best_map_epoch"]}
        # A fresh schedule at this run's lr, not the source's optimizer state.
        assert float(epoch_rows(fine_tuned / trial)[0]["learning_rate"]) == pytest.approx(
            info["lr"])


def test_mlflow_holds_one_run_per_trial_with_map50_per_epoch(source_run, fine_tuned):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{fine_tuned}/mlflow.db")
    experiment = client.get_experiment_by_name("crossdet_ray")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_name"] for r in runs) == sorted(TRIALS)
    for mlflow_run in runs:
        trial = mlflow_run.data.tags["trial_name"]
        assert mlflow_run.data.tags["run_dir"] == str(fine_tuned)
        assert mlflow_run.info.status == "FINISHED"
        params = mlflow_run.data.params
        assert params["trial/backbone"] == "test_mit" and params["trial/name"] == trial
        assert float(params["trial/lr"]) == training_info(fine_tuned / trial)["lr"]
        assert params["train/epochs"] == str(EPOCHS)
        assert params["flags/lr_grid"] == str([float(m) for m in LR_GRID])
        assert params["flags/init_from"] == str(source_run)
        metrics = mlflow_run.data.metrics
        assert {"map", "map50", "avg_loss", "learning_rate"} <= set(metrics)
        assert not [k for k in metrics if k.startswith("config/")]  # params, not metrics
        history = client.get_metric_history(mlflow_run.info.run_id, "map50")
        rows = epoch_rows(fine_tuned / trial)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        # The values are the logged rows' (MLflow stores doubles, the CSV prints reprs).
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [float(r["map50"]) for r in rows], abs=1e-12)


# -- mistakes stop before anything starts ------------------------------------------------------
def _run_fast(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env or ray_env())


def _assert_one_line_exit_2(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_init_from_a_run_without_the_backbone(tiny_dataset, tmp_path, capsys):
    source = tmp_path / "source"
    (source / "test_mit" / "checkpoints").mkdir(parents=True)
    (source / "test_mit" / "checkpoints" / "best_map_model.pth").write_bytes(b"x")
    result = run_in_process(capsys, "--data", tiny_dataset, "--backbones", "test_mit", "mit_b1",
                       "--init-from", str(source), "--log-dir", str(tmp_path / "logs"),
                       "--no-dashboard", "--no-evaluate")
    _assert_one_line_exit_2(result, "--init-from", "mit_b1", "best_map_model.pth")
    assert not (tmp_path / "logs").exists()  # nothing started
    result = run_in_process(capsys, "--data", tiny_dataset, "--init-from", str(tmp_path / "nowhere"),
                       "--log-dir", str(tmp_path / "logs"), "--no-dashboard", "--no-evaluate")
    _assert_one_line_exit_2(result, "--init-from", "nowhere")


def test_mlflow_missing_is_one_clear_line(tiny_dataset, tmp_path):
    blocker = tmp_path / "blocker" / "mlflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'mlflow'\")\n")
    env = ray_env()
    env["PYTHONPATH"] = f"{blocker.parent}:{env.get('PYTHONPATH', '')}"
    result = _run_fast("--data", tiny_dataset, "--mlflow", "--log-dir", str(tmp_path / "logs"),
                       "--no-dashboard", "--no-evaluate", env=env)
    _assert_one_line_exit_2(result, "--mlflow", "pip install 'crossdet_ray[mlflow]'")
    assert not (tmp_path / "logs").exists()


def test_grid_source_gives_each_backbone_its_best_trial(tmp_path):
    from crossdet_ray.tune.follow_up import resolve_init_weights

    trials = [{"name": "test_mit_lr0.01", "backbone": "test_mit", "lr": 0.01},
              {"name": "test_mit_lr0.1", "backbone": "test_mit", "lr": 0.1}]
    (tmp_path / "run_config.json").write_text(json.dumps({"trials": trials}))
    for trial, best_map in (("test_mit_lr0.01", 0.4), ("test_mit_lr0.1", 0.2)):
        (tmp_path / trial / "checkpoints").mkdir(parents=True)
        (tmp_path / trial / "checkpoints" / "best_map_model.pth").write_bytes(b"x")
        (tmp_path / trial / "logs").mkdir()
        (tmp_path / trial / "logs" / "training_info.json").write_text(
            json.dumps({"best_map": best_map, "best_map_epoch": 3}))
    chosen = resolve_init_weights(str(tmp_path), ["test_mit"])
    assert chosen["test_mit"]["trial"] == "test_mit_lr0.01"
    assert chosen["test_mit"]["path"].endswith("test_mit_lr0.01/checkpoints/best_map_model.pth")
