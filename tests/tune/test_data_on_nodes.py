"""A `--data` folder that the trial's node lacks: one clear failure, at once, never retried."""

from __future__ import annotations

import json
import shutil

import pytest

from crossdet_ray.tune import launcher
from crossdet_ray.tune.failures import FAILURES_FILE

from .helpers import run_in_process, small_run, training_info

pytestmark = pytest.mark.ray


def test_a_data_folder_missing_on_the_trials_node_fails_it_unretried(tiny_dataset, tmp_path,
                                                                    monkeypatch, capsys):
    data = tmp_path / "rgbx"
    shutil.copytree(tiny_dataset, data)
    connect = launcher.connect_ray

    def lose_the_data_then_connect(config):
        # The driver's preflight saw the folder; the node the trial lands on has none, as an
        # autoscaled GPU node lacks a folder copied to the head only.
        shutil.rmtree(data)
        return connect(config)

    monkeypatch.setattr(launcher, "connect_ray", lose_the_data_then_connect)
    result = run_in_process(capsys, *small_run(str(data), tmp_path / "logs", "lost", 3,
                                               "--max-failures", "3"))

    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "lost"
    info = training_info(run_dir / "test_mit")
    assert info["status"] == "failed" and info["failure_kind"] == "data"
    error = info["error"]
    assert f"--data {data} does not exist on node " in error
    assert "s3://" in error and "same path on every node" in error
    # One attempt: --max-failures 3 was not spent on a failure a restart cannot mend.
    assert len(json.loads((run_dir / "test_mit" / FAILURES_FILE).read_text())) == 1
    summary = json.loads((run_dir / "final_summary.json").read_text())
    (row,) = summary["results"]
    assert row["status"] == "failed" and row["failure_kind"] == "data"
    assert "does not exist on node" in row["error"]
    assert "does not exist on node" in result.stdout  # the closing table


def test_a_malformed_bucket_dataset_stops_the_command_before_ray_starts(s3_server, tiny_dataset,
                                                                       tmp_path, capsys):
    import ray

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    label = sorted((broken / "labels").glob("*.txt"))[1]
    label.write_text("7 0.5 0.5\n")  # three numbers short
    s3_server.upload(broken, "broken")

    result = run_in_process(capsys, *small_run(s3_server.uri("broken"), tmp_path / "logs",
                                               "never", 1))

    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("crossdet_ray: error: ")
    assert f"s3://{s3_server.BUCKET}/broken/labels/{label.name}" in line
    assert "Traceback" not in result.stderr
    assert not ray.is_initialized() and not (tmp_path / "logs" / "never").exists()
