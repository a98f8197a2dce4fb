"""A run whose data and directory live in S3 (a real S3-compatible server, moto's, on
127.0.0.1): interrupted (SIGTERM, then Ctrl-C), resumed, and ended with its evaluation report
in the bucket."""

from __future__ import annotations

import csv
import io
import json
import os
import signal

import pytest

from .helpers import run, signal_once_logged, start

pytestmark = pytest.mark.ray
BUCKET = "crossdet-runs"


def test_run_and_resume_with_data_and_run_directory_in_s3(s3_server, tiny_dataset, tmp_path,
                                                          monkeypatch):
    client = s3_server.client
    monkeypatch.setenv("CROSSDET_CACHE", str(tmp_path / "node_cache"))
    frames = [k for k in s3_server.upload(tiny_dataset, "data/tiny") if "/images/" in k]
    log_dir, run_uri = s3_server.uri("runs"), s3_server.uri("runs/cloud")
    prefix = "runs/cloud/"
    args = ["--data", s3_server.uri("data/tiny"), "--backbones", "test_mit", "--epochs", "4", "--min-size", "64",
            "--max-size", "64", "--num-workers", "0", "--log-dir", log_dir, "--name", "cloud",
            "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--keep-checkpoints", "2",
            "--no-dashboard", "--no-evaluate", "--verbose", "0"]
    epochs_csv = prefix + "test_mit/logs/epoch_metrics.csv"

    def logged_epochs() -> list[str]:
        if epochs_csv not in s3_server.keys(prefix + "test_mit/"):
            return []
        return [r["epoch"] for r in csv.DictReader(io.StringIO(s3_server.text(epochs_csv)))]

    driver = start(args, tmp_path, "first")
    try:
        # The trigger is the log row itself: a row promises its epoch is safe.
        # SIGTERM, as `ray job stop` sends (drained as Ctrl-C once is: the crash tests' run),
        # then Ctrl-C before the drain can end: a second signal stops at once. (Two different
        # signals: two of the same may reach the process as one.)
        signal_once_logged(driver, lambda: len(logged_epochs()), 1, signal.SIGTERM)
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=180) == 143, driver.stderr[-3000:]
    finally:
        driver.kill()
    assert "letting every trial finish" in driver.stderr
    assert "again: stopping now" in driver.stderr, driver.stderr[-3000:]
    assert "--resume" in driver.stderr
    first_summary = json.loads(s3_server.text(prefix + "final_summary.json"))
    assert first_summary["interrupted"] is True
    # Read once the run has stopped: the drain may have logged the epoch it was saving.
    done = logged_epochs()
    assert done == [str(e) for e in range(1, len(done) + 1)] and len(done) < 4

    # Resumed with the closing evaluation: the report of a bucket run is written in the bucket.
    resumed = run(["--resume", run_uri, "--no-dashboard", "--verbose", "0"], tmp_path, "resume")
    assert resumed.process.returncode == 0, resumed.stderr[-3000:]

    keys = s3_server.keys(prefix)
    for name in ("run_config.json", "final_summary.json", "summary.csv", "summary.parquet",
                 "training_curves.png", "test_mit/logs/epoch_metrics.csv",
                 "test_mit/logs/batch_metrics.csv", "test_mit/logs/training_info.json",
                 "test_mit/checkpoints/best_model.pth", "test_mit/checkpoints/test_mit_final.pth",
                 "test_mit/checkpoints/test_mit_final_complete.pth"):
        assert prefix + name in keys, name
    epoch_files = [k for k in keys if "/checkpoints/epoch_" in k]
    assert len(epoch_files) == 2 and epoch_files[-1].split("/")[-1].startswith("epoch_004_")
    assert not [k for k in keys if ".tmp-" in k]
    assert logged_epochs() == ["1", "2", "3", "4"]
    batches = [(r["epoch"], r["batch"]) for r in
               csv.DictReader(io.StringIO(s3_server.text(prefix + "test_mit/logs/batch_metrics.csv")))]
    assert len(batches) == len(set(batches)) and {e for e, _ in batches} == {"1", "2", "3", "4"}
    losses = {r["avg_loss"] for r in
              csv.DictReader(io.StringIO(s3_server.text(epochs_csv)))}
    assert len(losses) == 4, "the run did not train"
    info = json.loads(s3_server.text(prefix + "test_mit/logs/training_info.json"))
    assert info["status"] == "completed"
    # Exactly after the last logged epoch: nothing the logs showed was trained again.
    assert info["resumed_at_epochs"] == [len(done) + 1]
    assert info["final_model_path"].startswith(f"s3://{BUCKET}/{prefix}")
    summary = json.loads(s3_server.text(prefix + "final_summary.json"))
    assert summary["num_succeeded"] == 1
    assert summary["interrupted_by"] is None and first_summary["interrupted_by"] == "SIGTERM"

    # The data: fetched once into this node's cache by the first run, re-used by the resumed
    # trial and by the evaluation; recorded with the listing's fingerprint.
    assert {s3_server.full_downloads(k) for k in frames} == {1}
    run_config = json.loads(s3_server.text(prefix + "run_config.json"))
    assert run_config["data"]["kind"] == "remote"
    assert run_config["data"]["uri"] == s3_server.uri("data/tiny")
    listing = json.loads(s3_server.text(prefix + "dataset_listing.json"))
    assert run_config["data"]["fingerprint"] == listing["fingerprint"]
    assert info["dataset_fetch"]["reused"] is True  # the resumed attempt's record
    assert info["dataset_fetch"]["fingerprint"] == listing["fingerprint"]

    evaluation = prefix + "evaluation/"
    for name in ("report.html", "results.csv", "results.json", "pr_curves.png"):
        assert evaluation + name in keys, name
    rows = list(csv.DictReader(io.StringIO(s3_server.text(evaluation + "results.csv"))))
    assert [r["status"] for r in rows] == ["ok"]
    assert f"Evaluation report: s3://{BUCKET}/{evaluation}report.html" in resumed.stdout
