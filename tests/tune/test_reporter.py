"""A restarted trial resumes from its pointer, or from the newest complete epoch file."""

import json

from ray import tune

from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.tune.reporter import POINTER_FILE, resume_checkpoint


def _pointer(tmp_path, epoch):
    directory = tmp_path / f"pointer_{epoch}"
    directory.mkdir()
    (directory / POINTER_FILE).write_text(json.dumps({
        "epoch": epoch, "backbone": "mit_b0",
        "path": f"checkpoints/epoch_{epoch:03d}_loss_0.5000.pth"}))
    return tune.Checkpoint.from_directory(str(directory))


def test_resume_reads_the_file_the_pointer_names(tmp_path):
    trial = RunStorage.from_uri(str(tmp_path / "trial"))
    trial.save_torch({"epoch": 3}, "checkpoints/epoch_003_loss_0.5000.pth")
    trial.save_torch({"epoch": 2}, "checkpoints/epoch_002_loss_0.6000.pth")
    assert resume_checkpoint(_pointer(tmp_path, 3), trial) == {"epoch": 3}


def test_resume_falls_back_when_the_pointed_write_never_finished(tmp_path):
    trial = RunStorage.from_uri(str(tmp_path / "trial"))
    trial.save_torch({"epoch": 1}, "checkpoints/epoch_001_loss_0.9000.pth")
    trial.save_torch({"epoch": 2}, "checkpoints/epoch_002_loss_0.6000.pth")
    assert resume_checkpoint(_pointer(tmp_path, 3), trial) == {"epoch": 2}


def test_resume_starts_afresh_without_any_complete_epoch_file(tmp_path):
    trial = RunStorage.from_uri(str(tmp_path / "trial"))
    trial.makedirs("checkpoints")
    assert resume_checkpoint(_pointer(tmp_path, 1), trial) is None
