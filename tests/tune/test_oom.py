"""Out of memory and killed trials through the real command: said as such, exit 1, and every
file written (final_summary.json, the trial's logs/error.txt and training_info.json)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .helpers import poll_until, training_info

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def _command(tiny_dataset: str, log_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "all_backbones.py"), "--data",
            tiny_dataset, "--backbones", "test_mit", "--min-size", "64", "--max-size", "64",
            "--num-workers", "0", "--max-failures", "0", "--log-dir", str(log_dir), "--name", "r",
            "--no-dashboard", "--no-evaluate", *extra]


@pytest.fixture
def ray_env():
    """The command's environment with a Ray of its own: no RAY_ADDRESS, and a private Ray
    temp dir, where no `ray start` cluster of this machine is recorded for ray.init() to join
    (measured: without it, the command joined another test's cluster). Short, for Ray's
    socket paths."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")

    def make(**extra: str) -> dict[str, str]:
        env = {**os.environ, **extra, "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        return env

    yield make
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _summary_row(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "final_summary.json").read_text())
    assert summary["num_trials"] == 1 and summary["num_succeeded"] == 0
    assert summary["num_failed"] == 1
    return summary["results"][0]


@pytest.mark.timeout(300)
def test_a_trial_killed_by_rays_memory_monitor_is_out_of_memory(tiny_dataset, tmp_path,
                                                                ray_env):
    # The node is always above 1% of its memory in use, so the memory monitor kills the trial
    # as it starts.
    env = ray_env(RAY_memory_usage_threshold="0.01", RAY_memory_monitor_refresh_ms="100")
    result = subprocess.run(_command(tiny_dataset, tmp_path / "logs", "--epochs", "1"),
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=280)
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "r"
    row = _summary_row(run_dir)
    assert (row["status"], row["failure_kind"]) == ("failed", "out_of_memory")
    assert row["failure_reason"] == "out of memory (Ray's memory monitor killed the trial)"
    assert ("FAILED test_mit: out of memory (Ray's memory monitor killed the trial) \u2014 try "
            "--batch-size 1, ") in result.stdout
    trial = run_dir / "test_mit"
    assert "killed due to the node running low on memory" in (
        trial / "logs" / "error.txt").read_text()
    info = training_info(trial)
    assert (info["status"], info["failure_kind"]) == ("failed", "out_of_memory")
    assert "running low on memory" in info["error"]


@pytest.mark.timeout(300)
def test_a_trial_killed_in_its_second_epoch_is_failed_and_summarised(tiny_dataset, tmp_path,
                                                                     ray_env):
    # SIGKILL, as the kernel's out-of-memory killer sends it, once epoch 1 is logged.
    process = subprocess.Popen(_command(tiny_dataset, tmp_path / "logs", "--epochs", "3"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=ray_env())
    trial = tmp_path / "logs" / "r" / "test_mit"

    def epoch_1_logged() -> bool:
        return training_info(trial).get("epochs_completed") == 1

    if not poll_until(epoch_1_logged, timeout=240, interval=0.05, process=process):
        process.kill()
        pytest.fail(f"the run ended before epoch 1 was logged: {process.communicate()[1][-3000:]}")
    os.kill(training_info(trial)["pid"], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    row = _summary_row(tmp_path / "logs" / "r")
    assert (row["status"], row["failure_kind"], row["epochs_completed"]) == ("failed", "killed", 1)
    assert "FAILED test_mit: the trial's process died abruptly" in stdout
    assert "The actor died unexpectedly" in (trial / "logs" / "error.txt").read_text()
    info = training_info(trial)
    assert (info["status"], info["failure_kind"]) == ("failed", "killed")
    assert info["best_epoch"] == 1  # what the trial wrote itself stays
