"""A run whose directory lives in S3: a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import EPOCHS_LOGGED_ONCE_TUNE_HOLDS_A_CHECKPOINT, poll_until

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "crossdet-runs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
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


def test_run_and_resume_with_the_run_directory_in_s3(s3_server, tiny_dataset):
    client, port = s3_server
    log_dir = (f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
               "&region=us-east-1")
    run_uri = (f"s3://{BUCKET}/runs/cloud?endpoint_override=127.0.0.1:{port}&scheme=http"
               "&region=us-east-1")
    prefix = "runs/cloud/"
    command = [sys.executable, str(ROOT / "experiments" / "all_backbones.py")]
    args = ["--data", tiny_dataset, "--backbones", "mit_b0", "--epochs", "4", "--min-size", "64",
            "--max-size", "64", "--num-workers", "0", "--log-dir", log_dir, "--name", "cloud",
            "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--keep-checkpoints", "2",
            "--no-dashboard", "--verbose", "0"]
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env=env)
    epochs_csv = prefix + "mit_b0/logs/epoch_metrics.csv"

    def epochs_logged() -> int:
        if epochs_csv not in _keys(client, prefix + "mit_b0/"):
            return 0
        return len(list(csv.DictReader(io.StringIO(_text(client, epochs_csv)))))

    if not poll_until(lambda: epochs_logged() >= EPOCHS_LOGGED_ONCE_TUNE_HOLDS_A_CHECKPOINT,
                      timeout=240, interval=0.2, process=process):
        process.kill()
        pytest.fail(f"the run ended early: {process.communicate()[1][-3000:]}")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "--resume" in stderr

    resumed = subprocess.run(command + ["--resume", run_uri, "--no-dashboard", "--verbose", "0"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    keys = _keys(client, prefix)
    for name in ("run_config.json", "final_summary.json", "summary.csv", "summary.parquet",
                 "training_curves.png", "mit_b0/logs/epoch_metrics.csv",
                 "mit_b0/logs/batch_metrics.csv", "mit_b0/logs/training_info.json",
                 "mit_b0/checkpoints/best_model.pth", "mit_b0/checkpoints/mit_b0_final.pth",
                 "mit_b0/checkpoints/mit_b0_final_complete.pth"):
        assert prefix + name in keys, name
    epoch_files = [k for k in keys if "/checkpoints/epoch_" in k]
    assert len(epoch_files) == 2 and epoch_files[-1].split("/")[-1].startswith("epoch_004_")
    assert not [k for k in keys if ".tmp-" in k]
    rows = list(csv.DictReader(io.StringIO(_text(client, prefix + "mit_b0/logs/epoch_metrics.csv"))))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    info = json.loads(_text(client, prefix + "mit_b0/logs/training_info.json"))
    assert info["status"] == "completed" and min(info["resumed_at_epochs"]) >= 2
    assert info["final_model_path"].startswith(f"s3://{BUCKET}/{prefix}")
    summary = json.loads(_text(client, prefix + "final_summary.json"))
    assert summary["num_succeeded"] == 1
