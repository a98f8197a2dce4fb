"""What happens between two epochs: loader workers persist, the order is the one it always was,
and each epoch's checkpoint file holds that epoch's state although its CPU copy is reused."""

import os
import threading

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from crossdet_ray.engine import train as train_module
from crossdet_ray.engine.checkpoint import BackgroundWriter, SnapshotBuffers
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.engine.train import fit, seed_epoch_order

from tests.engine.test_background_checkpoints import _checkpoint, _metrics, _writer


def _flat(loader):
    return [int(i) for batch in loader for i in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_order_is_what_a_fresh_shuffling_loader_draws(workers):
    data = list(range(11))
    generator, shuffle_generator = torch.Generator(), torch.Generator()
    loader = DataLoader(data, batch_size=2, sampler=RandomSampler(data, generator=shuffle_generator),
                        generator=generator, num_workers=workers, collate_fn=list,
                        persistent_workers=workers > 0)
    for seed in (7, 8, 9, 8):
        # The loader fit used before workers persisted: a fresh iterator each epoch.
        reference = torch.Generator().manual_seed(seed)
        expected = _flat(DataLoader(data, batch_size=2, shuffle=True, generator=reference,
                                    collate_fn=list))
        seed_epoch_order(generator, shuffle_generator, seed)
        assert _flat(loader) == expected


class _PidRecording(torch.utils.data.Dataset):
    """Wraps a dataset; each item fetched leaves a file named after the fetching process."""

    def __init__(self, inner, folder):
        self.inner, self.folder = inner, folder
        self.num_classes = inner.num_classes

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        (self.folder / f"{os.getpid()}").touch()
        return self.inner[index]


class _Tiny(torch.nn.Module):
    """A stand-in detector: losses in training, no detections in evaluation."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets=None):
        if self.training:
            loss = self.weight * torch.stack([i.float().mean() for i in images]).mean()
            return {k: loss for k in train_module.LOSS_COMPONENTS}
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                 "scores": torch.zeros(0)} for _ in images]


def test_loader_workers_start_once_for_all_epochs(tiny_train_config, monkeypatch, tmp_path):
    build = train_module.build_datasets
    train_pids, test_pids = tmp_path / "train", tmp_path / "test"
    train_pids.mkdir(), test_pids.mkdir()

    def recording_datasets(config, data_dir):
        train_set, test_set = build(config, data_dir)
        return _PidRecording(train_set, train_pids), _PidRecording(test_set, test_pids)

    monkeypatch.setattr(train_module, "build_datasets", recording_datasets)
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: _Tiny())
    monkeypatch.setattr(train_module, "count_parameters", lambda m: 1)
    config = tiny_train_config.replace(epochs=3, num_workers=1)
    fit(config, "mit_b0", config.data)
    # One worker process each served all three epochs (restarted workers: three each).
    # measure_inference reads the test frames in this process, so it is left out.
    workers = {p.name for p in test_pids.iterdir()} - {str(os.getpid())}
    assert len(list(train_pids.iterdir())) == 1
    assert len(workers) == 1
    assert str(os.getpid()) not in {p.name for p in train_pids.iterdir()}


def test_each_epoch_file_holds_its_own_epoch_though_the_copy_is_reused(tmp_path):
    writer = _writer(RunStorage.from_uri(str(tmp_path)))
    weight = torch.ones(3)
    for epoch in (1, 2, 3):
        weight.fill_(float(epoch))
        writer.on_epoch_end(_metrics(epoch, loss=1.0 / epoch), _checkpoint(epoch, weight))
        weight.fill_(-1.0)  # training goes on in place while the file is written
    writer.wait_for_checkpoints()
    files = sorted((tmp_path / "checkpoints").glob("epoch_*.pth"))
    assert len(files) == 3
    for epoch, path in enumerate(files, start=1):
        saved = torch.load(path, weights_only=True)  # a complete, loadable file
        assert saved["epoch"] == epoch
        assert torch.equal(saved["model_state_dict"]["w"], torch.full((3,), float(epoch)))
        assert torch.equal(saved["optimizer_state_dict"]["state"][0]["momentum_buffer"],
                           torch.full((3,), 2.0 * epoch))
    assert (tmp_path / "checkpoints" / "best_model.pth").samefile(files[-1])


def test_snapshot_buffers_are_reused_and_follow_shape_changes():
    buffers = SnapshotBuffers()
    live = {"a": torch.arange(4.0), "b": [torch.zeros(2)], "n": 3}
    first = buffers.take(live)
    live["a"].add_(10)
    assert torch.equal(first["a"], torch.arange(4.0)) and first["n"] == 3
    second = buffers.take(live)
    assert second["a"] is first["a"] and torch.equal(second["a"], torch.arange(4.0) + 10)
    live["a"] = torch.ones(5)  # another shape gets its own buffer
    assert torch.equal(buffers.take(live)["a"], torch.ones(5))


def test_the_writer_thread_runs_at_the_lowest_priority_and_training_threads_do_not():
    seen = []
    writer = BackgroundWriter()
    writer.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    writer.close()
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19


def test_test_loader_workers_are_forked_before_the_first_step(tiny_train_config, monkeypatch):
    """Forked at the first evaluation they would share the step's retained memory, and the
    next epoch would copy every page it writes; forked before the first step, they share
    little more than the weights."""
    import multiprocessing

    children_at_first_step: list[int] = []

    class FirstStepListener(train_module.NullListener):
        def on_batch_end(self, metrics):
            if not children_at_first_step:
                children_at_first_step.append(len(multiprocessing.active_children()))

    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: _Tiny())
    monkeypatch.setattr(train_module, "count_parameters", lambda m: 1)
    config = tiny_train_config.replace(epochs=1, num_workers=2)
    fit(config, "mit_b0", config.data, listener=FirstStepListener())
    assert children_at_first_step == [4]  # two training and two test loader workers
