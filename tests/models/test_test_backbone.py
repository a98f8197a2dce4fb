"""The registry's test variant, `test_mit`, as timm's `test_vit`: the real network code path at a
tiny size, accepted wherever a backbone name is, and never part of a default run."""

from __future__ import annotations

import io
import re

import pytest
import torch

from crossdet_ray.backbones import BACKBONE_NAMES, BACKBONE_REGISTRY, get_backbone, relative_cost
from crossdet_ray.models.detector import CrossAttentionBackbone
from crossdet_ray.models.fusion import FFM, FRM

NAME = "test_mit"


def test_it_builds_the_same_network_at_a_tiny_size(detector):
    model = detector(NAME)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == get_backbone(NAME).parameters < 1_000_000
    # Both streams, FRM and FFM at each of the four stages, the FPN, Faster R-CNN's heads.
    encoder = model.backbone.encoder
    assert isinstance(model.backbone, CrossAttentionBackbone)
    for stage in range(1, 5):
        assert len(getattr(encoder, f"block{stage}")) == 1
        assert len(getattr(encoder, f"extra_block{stage}")) == 1
    assert [type(m) for m in encoder.FRMs] == [FRM] * 4
    assert [type(m) for m in encoder.FFMs] == [FFM] * 4
    assert model.backbone.out_channels == get_backbone(NAME).fpn_channels
    assert model.roi_heads.box_head.fc7.out_features == get_backbone(NAME).box_head_size
    # A checkpoint with SGD's momentum (twice the weights) is a few MB, not mit_b0's 222 MB.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(),
                "momentum": [torch.zeros_like(p) for p in model.parameters()]}, buffer)
    assert len(buffer.getvalue()) < 6e6


def test_it_trains_a_step_and_predicts_boxes_in_the_frame(detector):
    model = detector(NAME).train()
    frames = [torch.rand(5, 64, 80, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])}
               for _ in frames]
    losses = model(frames, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    encoder = model.backbone.encoder
    for module in (encoder.patch_embed1, encoder.extra_patch_embed1, encoder.FRMs[0],
                   encoder.FFMs[3]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        (output, _) = model(frames)
    boxes = output["boxes"]
    assert len(boxes) and (boxes[:, 0::2] <= 80).all() and (boxes[:, 1::2] <= 64).all()


def test_it_is_named_explicitly_or_not_at_all():
    from crossdet_ray.cli import build_parser, parse_args
    from crossdet_ray.config import TrainConfig

    assert NAME in BACKBONE_REGISTRY and NAME not in BACKBONE_NAMES
    assert NAME not in TrainConfig().backbones
    assert NAME not in parse_args([]).backbones
    assert NAME not in build_parser().format_help()
    with pytest.raises(ValueError) as error:
        get_backbone("mit_b3")
    assert NAME not in str(error.value)
    assert parse_args(["--backbones", NAME]).backbones == [NAME]


def test_the_command_the_planner_and_inference_accept_it():
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.inference import backbone_from_name
    from crossdet_ray.tune.launcher import LaunchConfig, validate
    from crossdet_ray.tune.planner import Workload, cpu_hours

    validate(LaunchConfig(train=TrainConfig(backbones=[NAME], epochs=1)))
    assert backbone_from_name("runs/x/test_mit_final.pth") == NAME
    assert backbone_from_name("runs/x/mit_b0_final.pth") == "mit_b0"
    # Its stated cost: far below mit_b0's, as its measured step time says.
    assert 0 < relative_cost(NAME) < 0.2
    workload = Workload(train_frames=32, epochs=2, batch_size=2, min_size=64, amp="off",
                        activation_checkpointing="off")
    assert 0 < cpu_hours(NAME, workload, 1) < cpu_hours("mit_b0", workload, 1)
    assert re.fullmatch(r"test_\w+", NAME)
