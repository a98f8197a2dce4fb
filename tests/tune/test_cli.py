"""The command as users run it: a subprocess, its exit code, its stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .helpers import assert_epochs_once, epoch_rows, poll_until, training_info

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def _command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "all_backbones.py"), *args]


def _env() -> dict[str, str]:
    """The test's own local Ray, never a cluster a developer's RAY_ADDRESS names."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=_env())


def _small(tiny_dataset, log_dir, *extra):
    return ("--data", tiny_dataset, "--backbones", "mit_b0", "--min-size", "64",
            "--max-size", "64", "--num-workers", "0", "--log-dir", str(log_dir),
            "--no-dashboard", "--verbose", "0", *extra)


def _assert_one_clear_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


def test_bad_data_stops_with_the_file_named(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    np.save(data / "images" / "f1.npy", np.zeros((32, 32, 5), np.uint8))
    (data / "labels" / "f1.txt").write_text("0 0.5 0.5 0.2 0.2\nzero 0.5 0.5\n")
    result = _run(*_small(str(data), tmp_path / "logs"), timeout=120)
    _assert_one_clear_error(result, "f1.txt")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_missing_data_folder(tmp_path):
    result = _run(*_small(str(tmp_path / "nowhere"), tmp_path / "logs"), timeout=120)
    _assert_one_clear_error(result, "nowhere")


@pytest.mark.parametrize("flags, fragment", [
    (("--gpus-per-trial", "lots"), "--gpus-per-trial"),
    (("--backbones", "mit_b9"), "mit_b9"),
    (("--epochs", "0"), "--epochs"),
])
def test_bad_flag_values(tiny_dataset, tmp_path, flags, fragment):
    result = _run(*_small(tiny_dataset, tmp_path / "logs"), *flags, timeout=120)
    _assert_one_clear_error(result, fragment)


def test_gpu_request_without_gpu_fails_fast(tiny_dataset, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    result = subprocess.run(_command(*_small(tiny_dataset, tmp_path / "logs"),
                                     "--gpus-per-trial", "1"),
                            capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    _assert_one_clear_error(result, "no GPU", "--gpus-per-trial 0")
    assert time.perf_counter() - started < 120


def test_resume_after_sigint_trains_no_epoch_twice(tiny_dataset, tmp_path):
    run_dir = tmp_path / "logs" / "interrupted"
    args = _small(tiny_dataset, tmp_path / "logs", "--name", "interrupted", "--epochs", "4",
                  "--gpus-per-trial", "0", "--cpus-per-trial", "1")
    args = tuple(a for a in args if a != "--no-dashboard")  # this run shows its dashboard
    process = subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env=_env())
    trial = run_dir / "mit_b0"
    # The trigger is the log row itself: a row promises its epoch is safe.
    if not poll_until(lambda: len(epoch_rows(trial)) >= 1, timeout=240, interval=0.05,
                      process=process):
        process.kill()
        pytest.fail(f"the run ended before it could be interrupted: {process.communicate()[1]}")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-3000:]
    assert "--resume" in stderr
    # A local run starts Ray's dashboard on the loopback interface only, and says where.
    assert "Ray dashboard: http://127.0.0.1:" in stderr
    done_before = [int(r["epoch"]) for r in epoch_rows(trial)]
    assert done_before == list(range(1, len(done_before) + 1))
    assert len(done_before) < 4, "the run finished before the interrupt"
    assert training_info(trial)["epochs_completed"] == len(done_before)

    result = _run("--resume", str(run_dir), "--no-dashboard", "--verbose", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_epochs_once(trial, 4)
    info = training_info(trial)
    assert info["status"] == "completed"
    # Exactly after the last logged epoch: nothing the logs showed was trained again.
    assert info["resumed_at_epochs"] == [len(done_before) + 1]
    assert (run_dir / "final_summary.json").is_file()
