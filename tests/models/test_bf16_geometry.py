"""bf16 autocast at the reference's 800x1333: bf16 convs and matmuls, float32 box geometry."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator

from crossdet_ray.models import CrossAttentionBackbone, build_detector, get_encoder
from crossdet_ray.models.detector import ANCHOR_SIZES, FEATURE_NAMES, IMAGE_MEAN, IMAGE_STD
from crossdet_ray.models.roi_pool import VectorizedMultiScaleRoIAlign

SIZES = {"min_size": 800, "max_size": 1333}
LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector("mit_b0", num_classes=2, **SIZES)


@pytest.fixture(scope="module")
def frame():
    """One 5x600x800 frame: resized to 800x1066, padded to 800x1088."""
    return torch.rand(5, 600, 800, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def targets():
    return [{"boxes": torch.tensor([[100.0, 120.0, 380.5, 333.3], [410.2, 200.7, 777.9, 590.1]]),
             "labels": torch.tensor([1, 1])}]


def record_outputs(module: torch.nn.Module, into: dict, name: str):
    def hook(_module, inputs, output):
        into[name] = (inputs, output)
    return module.register_forward_hook(hook)


@pytest.fixture(scope="module")
def autocast_inference(model, frame):
    """What the RPN, its anchor generator and the RoI pool saw and gave in one bf16 forward."""
    seen: dict = {}
    hooks = [record_outputs(model.rpn, seen, "rpn"),
             record_outputs(model.rpn.anchor_generator, seen, "anchors"),
             record_outputs(model.roi_heads.box_roi_pool, seen, "roi_pool"),
             record_outputs(model.backbone, seen, "features")]
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            seen["detections"] = model([frame])[0]
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def off_the_bf16_grid(coordinates: torch.Tensor) -> float:
    """The fraction of coordinates above 512 px that bfloat16 cannot hold (it steps by 4 px)."""
    large = coordinates[coordinates > 512]
    assert large.numel() >= 50  # enough boxes reach the right half of the frame to judge
    return (large != large.bfloat16().float()).float().mean().item()


def test_proposals_roi_boxes_and_detections_are_float32_off_the_bf16_grid(autocast_inference):
    features = autocast_inference["features"][1]
    assert features["0"].dtype == torch.bfloat16  # the encoder and FPN still run in bf16

    proposals = autocast_inference["rpn"][1][0][0]
    roi_boxes = autocast_inference["roi_pool"][0][1][0]
    detections = autocast_inference["detections"]["boxes"]
    for boxes in (proposals, roi_boxes, detections):
        assert boxes.dtype == torch.float32
    assert autocast_inference["detections"]["scores"].dtype == torch.float32
    # Before the fix every one of these sat on bf16's grid (fraction 0.0).
    assert off_the_bf16_grid(proposals) > 0.8
    assert off_the_bf16_grid(roi_boxes) > 0.8
    assert off_the_bf16_grid(detections) > 0.8


def test_anchors_are_float32_and_exact_under_autocast(model, autocast_inference):
    (image_list, feature_maps), anchors = autocast_inference["anchors"]
    assert feature_maps[0].dtype == torch.bfloat16
    assert anchors[0].dtype == torch.float32
    assert all(cell.dtype == torch.float32 for cell in model.rpn.anchor_generator.cell_anchors)

    # The last anchor of each level, worked out from Faster R-CNN's definition: the bottom-right
    # cell's corner, aspect ratio h/w = 2, half-sizes rounded to whole pixels.
    padded_height, padded_width = image_list.tensors.shape[-2:]
    expected, indices, first = [], [], 0
    for (size,), feature_map in zip(ANCHOR_SIZES, feature_maps):
        rows, columns = feature_map.shape[-2:]
        x = (columns - 1) * (padded_width // columns)
        y = (rows - 1) * (padded_height // rows)
        half_width, half_height = round(size / math.sqrt(2) / 2), round(size * math.sqrt(2) / 2)
        expected.append([x - half_width, y - half_height, x + half_width, y + half_height])
        first += rows * columns * 3
        indices.append(first - 1)
    assert anchors[0][indices].tolist() == expected
    assert expected[-1] == [843, 370, 1205, 1094]  # neither 843 nor 1205 exists in bf16


def test_training_losses_under_autocast_match_float32(model, frame, targets, monkeypatch):
    seen: dict = {}
    hooks = [record_outputs(model.rpn.head.bbox_pred, seen, "rpn_conv"),
             record_outputs(model.rpn.head, seen, "rpn_head"),
             record_outputs(model.roi_heads.box_predictor.bbox_pred, seen, "predictor_linear"),
             record_outputs(model.roi_heads.box_predictor, seen, "predictor")]
    target_dtypes = []
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
        def recording_encode(reference_boxes, proposals, encode=coder.encode):
            encoded = encode(reference_boxes, proposals)
            target_dtypes.extend(t.dtype for t in encoded)
            return encoded
        monkeypatch.setattr(coder, "encode", recording_encode)

    # Training mode moves the fusion blocks' BatchNorm statistics; the module's other tests
    # need the weights as built.
    as_built = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    losses = {}
    try:
        for amp in (False, True):
            torch.manual_seed(7)  # the same drop-path masks and anchor/RoI samples in both
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                losses[amp] = model([frame], targets)
    finally:
        for hook in hooks:
            hook.remove()
        model.load_state_dict(as_built)
        model.eval()

    assert seen["rpn_conv"][1].dtype == torch.bfloat16  # the heads' convs and linears stay bf16
    assert seen["predictor_linear"][1].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in seen["rpn_head"][1][1])  # deltas into smooth-L1
    assert all(t.dtype == torch.float32 for t in seen["predictor"][1])
    assert target_dtypes and all(dtype == torch.float32 for dtype in target_dtypes)
    for name in LOSSES:
        assert losses[True][name].dtype == torch.float32
        # bf16 features round at 2^-8 (0.4%) and the losses average over many terms; bf16
        # geometry had loss_rpn_box_reg off by 57% on this batch.
        torch.testing.assert_close(losses[True][name], losses[False][name], rtol=2e-2, atol=0)


def test_without_autocast_the_network_is_torchvisions_own(model, frame):
    """The same seed gives the same weights as torchvision's own parts, and the same outputs."""
    torch.manual_seed(0)
    plain = FasterRCNN(
        CrossAttentionBackbone(get_encoder("mit_b0")), num_classes=2,
        rpn_anchor_generator=AnchorGenerator(sizes=ANCHOR_SIZES,
                                             aspect_ratios=((0.5, 1.0, 2.0),) * 5),
        box_roi_pool=VectorizedMultiScaleRoIAlign(featmap_names=FEATURE_NAMES, output_size=7,
                                                  sampling_ratio=2),
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), **SIZES).eval()
    ours, theirs = model.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []

    model.eval()
    with torch.no_grad():
        expected, found = plain([frame])[0], model([frame])[0]
    assert len(found["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(found[key], expected[key])
