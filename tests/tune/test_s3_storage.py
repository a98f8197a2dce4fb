"""A run whose directory lives in S3: a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
import socket

import pytest

from .helpers import run, signal_once_logged, start

pytestmark = pytest.mark.ray
BUCKET = "crossdet-runs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    import boto3
    from moto import server as moto_server
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client, port
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _text(client, key: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def test_run_and_resume_with_the_run_directory_in_s3(s3_server, tiny_dataset, tmp_path):
    client, port = s3_server
    log_dir = (f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
               "&region=us-east-1")
    run_uri = (f"s3://{BUCKET}/runs/cloud?endpoint_override=127.0.0.1:{port}&scheme=http"
               "&region=us-east-1")
    prefix = "runs/cloud/"
    args = ["--data", tiny_dataset, "--backbones", "test_mit", "--epochs", "4", "--min-size", "64",
            "--max-size", "64", "--num-workers", "0", "--log-dir", log_dir, "--name", "cloud",
            "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--keep-checkpoints", "2",
            "--no-dashboard", "--no-evaluate", "--verbose", "0"]
    epochs_csv = prefix + "test_mit/logs/epoch_metrics.csv"

    def logged_epochs() -> list[str]:
        if epochs_csv not in _keys(client, prefix + "test_mit/"):
            return []
        return [r["epoch"] for r in csv.DictReader(io.StringIO(_text(client, epochs_csv)))]

    driver = start(args, tmp_path, "first")
    try:
        # The trigger is the log row itself: a row promises its epoch is safe.
        signal_once_logged(driver, lambda: len(logged_epochs()), 1)
        assert driver.wait(timeout=180) == 130, driver.stderr[-3000:]
    finally:
        driver.kill()
    assert "--resume" in driver.stderr
    # Read once the run has stopped: the drain may have logged the epoch it was saving.
    done = logged_epochs()
    assert done == [str(e) for e in range(1, len(done) + 1)] and len(done) < 4

    resumed = run(["--resume", run_uri, "--no-dashboard", "--no-evaluate", "--verbose", "0"], tmp_path, "resume")
    assert resumed.process.returncode == 0, resumed.stderr[-3000:]

    keys = _keys(client, prefix)
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
               csv.DictReader(io.StringIO(_text(client, prefix + "test_mit/logs/batch_metrics.csv")))]
    assert len(batches) == len(set(batches)) and {e for e, _ in batches} == {"1", "2", "3", "4"}
    losses = {r["avg_loss"] for r in
              csv.DictReader(io.StringIO(_text(client, epochs_csv)))}
    assert len(losses) == 4, "the run did not train"
    info = json.loads(_text(client, prefix + "test_mit/logs/training_info.json"))
    assert info["status"] == "completed"
    # Exactly after the last logged epoch: nothing the logs showed was trained again.
    assert info["resumed_at_epochs"] == [len(done) + 1]
    assert info["final_model_path"].startswith(f"s3://{BUCKET}/{prefix}")
    summary = json.loads(_text(client, prefix + "final_summary.json"))
    assert summary["num_succeeded"] == 1
