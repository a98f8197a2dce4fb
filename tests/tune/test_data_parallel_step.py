"""A 2-worker data-parallel step changes the weights as a 1-worker step on the same batch.

The two workers run on Ray Train (gloo on the CPU) through the same `ray_worker_group` the
trials use: Ray Train's process group, `prepare_model`'s DDP and `prepare_data_loader`'s
distributed sampler, then the engine's own `train_one_epoch`. The reference is one process
taking the whole global batch of 2.

For the two to be equal, the loss must not depend on how the batch is split. Faster R-CNN's
losses are means over the anchors and RoIs its samplers keep; here the samplers keep every
candidate (huge per-image sample sizes, no ignored IoU band, NMS that removes nothing, more
proposals than post_nms_top_n on every frame), both frames have the same size and the same
number of boxes, so every frame contributes the same count and the mean of the two workers'
means is the global mean. Drop-path is off (its masks are random per sample). The fusion
modules' BatchNorms take the global batch's statistics (engine/parallel.py), as on one process.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.ray

FRAME = 128
GLOBAL_BATCH = 2
LR = 0.01
ROUNDING_NOISE = 1e-9  # a weight update this small is float32 noise (see below)
# Samplers and NMS that keep every candidate (see the module docstring).
KEEP_EVERYTHING = dict(
    min_size=FRAME, max_size=FRAME,
    rpn_fg_iou_thresh=0.5, rpn_bg_iou_thresh=0.5,
    rpn_batch_size_per_image=10**7, rpn_positive_fraction=0.5, rpn_nms_thresh=1.0,
    rpn_pre_nms_top_n_train=10**5, rpn_post_nms_top_n_train=10**5,
    box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=10**7,
)


def _batch():
    """Two different frames of one size, each with two boxes."""
    generator = torch.Generator().manual_seed(7)
    samples = []
    for boxes in ([[10, 12, 60, 70], [70, 20, 120, 90]], [[5, 40, 50, 110], [64, 64, 100, 126]]):
        image = torch.rand(5, FRAME, FRAME, generator=generator)
        samples.append((image, {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                "labels": torch.tensor([1, 1])}))
    return samples


def _model():
    from crossdet_ray.models import build_detector
    from crossdet_ray.models.mit import DropPath

    torch.manual_seed(0)
    model = build_detector("test_mit", num_classes=2, **KEEP_EVERYTHING)
    for module in model.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    return model


def _one_step(model, group, samples):
    """One optimizer step over the whole batch; returns the weight change per parameter."""
    from torch.utils.data import DataLoader

    from crossdet_ray.data import collate_detection
    from crossdet_ray.engine.parallel import unwrap
    from crossdet_ray.engine.train import NullListener, train_one_epoch

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrapped = group.distribute(model)
    loader = group.prepare_loader(DataLoader(
        samples, batch_size=group.per_worker_batch(GLOBAL_BATCH), shuffle=False,
        collate_fn=collate_detection))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    sums = train_one_epoch(wrapped, optimizer, loader, torch.device("cpu"), epoch=1,
                           listener=NullListener(), group=group)
    after = unwrap(wrapped).state_dict()
    return {k: (after[k] - before[k]) for k in before}, sums


def _worker(config):
    from crossdet_ray.tune.data_parallel import ray_worker_group

    torch.set_num_threads(1)
    group = ray_worker_group(torch.device("cpu"))
    update, sums = _one_step(_model(), group, _batch())
    if group.is_main:
        torch.save({"update": update, "sums": sums, "world_size": group.world_size,
                    "per_worker_batch": group.per_worker_batch(GLOBAL_BATCH)}, config["out"])


@pytest.fixture(scope="module")
def two_worker_update(tmp_path_factory):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("ddp") / "update.pt"
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        TorchTrainer(
            _worker, train_loop_config={"out": str(out)},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(storage_path=str(out.parent / "train"),
                                           name="equal_update"),
        ).fit()
    finally:
        ray.shutdown()
    return torch.load(out, weights_only=False)


def test_two_workers_take_half_the_batch_each(two_worker_update):
    assert two_worker_update["world_size"] == 2
    assert two_worker_update["per_worker_batch"] == 1
    assert two_worker_update["sums"]["images"] == GLOBAL_BATCH  # logged as the global batch


def test_a_two_worker_step_changes_the_weights_as_a_one_worker_step(two_worker_update):
    from crossdet_ray.engine.parallel import single_process

    torch.set_num_threads(1)
    reference, reference_sums = _one_step(_model(), single_process(), _batch())
    ddp = two_worker_update["update"]
    assert ddp.keys() == reference.keys()
    weights = _model().state_dict()
    changed = worst = 0.0
    for name, expected in reference.items():
        if not expected.is_floating_point():
            continue
        changed = max(changed, expected.abs().max().item())
        if expected.abs().max() <= ROUNDING_NOISE:
            # A gradient that is zero in exact arithmetic (a bias right before a BatchNorm,
            # which removes it) leaves rounding noise only: the update must be as small.
            assert ddp[name].abs().max() <= ROUNDING_NOISE, name
            continue
        # An update is after - before of float32 weights: it cannot be resolved finer than a
        # few units in the last place of the weight itself, whatever the parallelism.
        ulps = 4 * torch.finfo(torch.float32).eps * weights[name].abs()
        tolerance = 1e-3 * expected.norm() + ulps.norm()
        worst = max(worst, ((ddp[name] - expected).norm() / tolerance).item())
    assert changed > 1e-4, "the step did not change the weights: nothing was compared"
    assert worst < 1, (f"the 2-worker update differs from the 1-worker one by {worst:.2f}x the "
                       "tolerance (1e-3 of the update's norm + 4 ulps of the weights)")
    # The logged loss is the mean of the workers' means, which here is the global mean.
    assert two_worker_update["sums"]["loss"] == pytest.approx(reference_sums["loss"], rel=1e-5)


def test_half_the_batch_alone_gives_a_different_update(two_worker_update):
    """The comparison above can fail: a worker that stepped on its own half without the
    other's gradients (no all-reduce) moves the weights differently."""
    from crossdet_ray.engine.parallel import single_process

    torch.set_num_threads(1)
    model = _model()
    half = _batch()[:1]
    from torch.utils.data import DataLoader

    from crossdet_ray.data import collate_detection
    from crossdet_ray.engine.train import NullListener, train_one_epoch

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    train_one_epoch(model, optimizer, DataLoader(half, batch_size=1,
                                                 collate_fn=collate_detection),
                    torch.device("cpu"), epoch=1, listener=NullListener(),
                    group=single_process())
    alone = {k: model.state_dict()[k] - before[k] for k in before}
    ddp = two_worker_update["update"]
    name = "backbone.fpn.layer_blocks.0.0.weight"
    assert not torch.allclose(alone[name], ddp[name], rtol=1e-2, atol=1e-7)
