import pytest

from crossdet_ray.config import TrainConfig
from crossdet_ray.tune.launcher import (LaunchConfig, LaunchError, start_order, trial_specs,
                                        validate)


def test_trials_are_named_by_backbone_and_grid_lr():
    assert [s.name for s in trial_specs(["mit_b0", "mit_b1"], 0.005, [])] == ["mit_b0", "mit_b1"]
    grid = trial_specs(["mit_b0", "mit_b1"], 0.005, [0.5, 1.0, 2.0])
    assert len(grid) == 6
    assert [s.name for s in grid[:3]] == ["mit_b0_lr0.0025", "mit_b0_lr0.005", "mit_b0_lr0.01"]
    assert grid[0].lr == pytest.approx(0.0025) and grid[0].backbone == "mit_b0"


def test_largest_backbones_start_first_and_lr_grids_stay_together():
    specs = trial_specs(["mit_b0", "mit_b2", "mit_b5", "mit_b1", "mit_b4"], 0.005, [])
    assert [s.name for s in start_order(specs)] == ["mit_b5", "mit_b4", "mit_b2", "mit_b1",
                                                    "mit_b0"]
    grid = start_order(trial_specs(["mit_b0", "mit_b1"], 0.005, [0.5, 2.0]))
    assert [s.name for s in grid] == ["mit_b1_lr0.0025", "mit_b1_lr0.01", "mit_b0_lr0.0025",
                                      "mit_b0_lr0.01"]


@pytest.mark.parametrize("changes, message", [
    ({"backbones": ["mit_b3"]}, "unknown mit_b3"),
    ({"epochs": 0}, "--epochs"),
    ({"batch_size": 0}, "--batch-size"),
    ({"lr": -1.0}, "--lr"),
    ({"min_size": 900, "max_size": 800}, "--min-size"),
    ({"num_workers": -1}, "--num-workers"),
])
def test_bad_training_flags(changes, message):
    with pytest.raises(LaunchError, match=message):
        validate(LaunchConfig(train=TrainConfig(**changes)))


@pytest.mark.parametrize("changes, message", [
    ({"lr_grid": [0.5, 0]}, "--lr-grid"),
    ({"max_failures": -2}, "--max-failures"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints"),
])
def test_bad_ray_flags(changes, message):
    with pytest.raises(LaunchError, match=message):
        validate(LaunchConfig(**changes))


def test_unlimited_restarts_are_accepted():
    validate(LaunchConfig(max_failures=-1))  # spot nodes: no preemption uses up the retries


def test_launch_config_round_trips_through_plain_dicts():
    config = LaunchConfig(train=TrainConfig(epochs=3, backbones=["mit_b1"]), lr_grid=[0.5, 2])
    again = LaunchConfig.from_dict(config.to_dict())
    assert again == config
