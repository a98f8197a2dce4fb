"""The disk a run needs is said before it starts, and a run that cannot fit is refused."""

from __future__ import annotations

import pytest

from crossdet_ray.backbones import BACKBONE_NAMES, BACKBONE_REGISTRY
from crossdet_ray.config import TrainConfig
from crossdet_ray.tune import disk, launcher
from crossdet_ray.tune.launcher import LaunchConfig, LaunchError, trial_specs


def _config(tmp_path, **changes) -> LaunchConfig:
    return LaunchConfig(train=TrainConfig(epochs=30, log_dir=str(tmp_path / "logs")), **changes)


def test_every_epoch_of_all_five_is_what_the_seed_run_writes():
    trials = {b: b for b in BACKBONE_NAMES}
    estimate = disk.estimate_run_bytes(trials, epochs=30, keep_checkpoints=None)
    # 30 epoch files of weights + momentum and one weights-only file per backbone.
    params = sum(spec.parameters for spec in BACKBONE_REGISTRY.values())
    assert estimate.total_bytes == pytest.approx(params * (30 * 8 + 4), rel=0.01)
    assert estimate.total_bytes > 120e9  # the seed's 30 epochs keep ~125 GB of checkpoints
    kept = disk.estimate_run_bytes(trials, epochs=30, keep_checkpoints=1)
    assert kept.epoch_files_per_trial == 3  # the newest, and the best-loss and best-mAP ones
    assert kept.total_bytes == pytest.approx(params * (3 * 8 + 4), rel=0.01)


def test_a_run_that_does_not_fit_is_refused_naming_the_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "free_bytes", lambda path: 5 * 10**9)
    config = _config(tmp_path)
    specs = trial_specs(config.train.backbones, config.train.lr, [])
    with pytest.raises(LaunchError) as refused:
        launcher.check_disk_space(config, specs)
    message = str(refused.value)
    assert "--log-dir" in message and "--keep-checkpoints 1" in message
    assert "5.00 GB is free" in message
    assert not (tmp_path / "logs").exists()  # refused before anything was made
    # The same run keeping one epoch per trial fits 20 GB; --skip-disk-check starts anyway.
    monkeypatch.setattr(launcher, "free_bytes", lambda path: 20 * 10**9)
    launcher.check_disk_space(_config(tmp_path, keep_checkpoints=1), specs)
    monkeypatch.setattr(launcher, "free_bytes", lambda path: 10**6)
    launcher.check_disk_space(_config(tmp_path, skip_disk_check=True), specs)


def test_the_estimate_is_logged_with_the_free_space(tmp_path, caplog):
    config = _config(tmp_path, keep_checkpoints=2)
    with caplog.at_level("INFO", logger="crossdet_ray.tune.launcher"):
        launcher.check_disk_space(config, trial_specs(["mit_b0"], 0.005, []))
    (line,) = [r.getMessage() for r in caplog.records if "will write about" in r.getMessage()]
    assert "4 epoch checkpoint(s) kept per trial" in line and "GB is free at" in line
