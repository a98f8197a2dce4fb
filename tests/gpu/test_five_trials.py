"""The command as users run it on one GPU box: five backbones as trials at 0.2 GPU each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossdet_ray.config import BACKBONES

from ..tune.helpers import training_info

ROOT = Path(__file__).resolve().parents[2]


def _first_visible_gpu() -> str:
    # Ray must see exactly one GPU, or fractional trials may spread over several.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def test_five_trials_share_one_gpu_at_a_fifth_each(tiny_dataset, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": _first_visible_gpu()}
    env.pop("RAY_ADDRESS", None)  # a local Ray on this machine, not somebody's cluster
    command = [sys.executable, str(ROOT / "experiments" / "all_backbones.py"),
               "--gpus-per-trial", "0.2", "--epochs", "1", "--data", tiny_dataset,
               "--min-size", "64", "--max-size", "64", "--num-workers", "0",
               "--log-dir", str(tmp_path / "logs"), "--name", "shared_gpu",
               "--no-dashboard", "--no-evaluate", "--verbose", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    run_dir = tmp_path / "logs" / "shared_gpu"
    summary = json.loads((run_dir / "final_summary.json").read_text())
    assert summary["num_trials"] == 5
    assert summary["num_succeeded"] == 5, [(r["trial"], r["status"], r["error"])
                                           for r in summary["results"]]
    gpu_ids = set()
    for backbone in BACKBONES:
        info = training_info(run_dir / backbone)
        assert info["status"] == "completed", backbone
        assert info["device"] == "cuda", f"{backbone} trained on {info['device']}"
        assert info["resources"]["gpu"] == pytest.approx(0.2)
        assert len(info["gpu_ids"]) == 1, info["gpu_ids"]
        gpu_ids.update(info["gpu_ids"])
    assert len(gpu_ids) == 1, f"the trials were given different GPUs: {gpu_ids}"
