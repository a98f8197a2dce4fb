"""The engine's one two-epoch fit, shared by the tests that only read what it produced."""

from __future__ import annotations

import copy

import pytest


class Recorder:
    """A listener keeping everything fit() hands out: the start info, each batch's and epoch's
    metrics, a snapshot of each epoch's checkpoint, and the summary."""

    def __init__(self):
        self.info, self.summary = None, None
        self.batches, self.epochs, self.checkpoints = [], [], []

    @property
    def weights(self) -> dict:
        """The last epoch's model weights."""
        return self.checkpoints[-1]["model_state_dict"]

    def on_train_start(self, info):
        self.info = info

    def on_batch_end(self, metrics):
        self.batches.append(metrics)

    def on_epoch_end(self, metrics, checkpoint):
        self.epochs.append(metrics)
        # The dict holds live tensors (as torch's state_dict does): keep a snapshot.
        self.checkpoints.append(copy.deepcopy(checkpoint))

    def on_train_end(self, summary, checkpoint):
        self.summary = summary


@pytest.fixture(scope="session")
def two_epoch_fit(tmp_path_factory):
    """(config, Recorder, summary): the test backbone, two epochs on 12 frames of 64 px, StepLR
    halving the lr after each epoch."""
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.train import fit
    from crossdet_ray.data.synthetic import generate_dataset

    data = tmp_path_factory.mktemp("engine_data")
    generate_dataset(data, 12, seed=0, sizes=[(64, 64)])
    config = TrainConfig(data=str(data), epochs=2, batch_size=2, num_workers=0,
                         backbones=["test_mit"], min_size=64, max_size=64, lr_step_size=1,
                         lr_gamma=0.5, seed=0)
    recorder = Recorder()
    summary = fit(config, "test_mit", str(data), listener=recorder)
    losses = [m.avg_loss for m in recorder.epochs]
    assert len(losses) == 2 and losses[0] != losses[1], f"the fit did not train: {losses}"
    return config, recorder, summary
