"""The network against the reference manifest, and its forward/backward on tiny frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossdet_ray.models import BACKBONE_NAMES, build_detector, count_parameters, get_encoder

# A copy of ../shared/reference/state_dict_manifest.json: the reference's keys and shapes.
MANIFEST = Path(__file__).resolve().parent / "state_dict_manifest.json"
EXPECTED_PARAMETERS = {"mit_b0": 27_786_433, "mit_b1": 60_014_945, "mit_b2": 82_104_673,
                       "mit_b4": 155_397_473, "mit_b5": 196_598_113}


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())["backbones"]


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(5, 64, 64, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 30.0, 20.0, 60.0]]),
                "labels": torch.tensor([1, 1])}]
    return images, targets


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_matches_the_reference_and_trains(backbone, manifest):
    torch.manual_seed(0)
    model = build_detector(backbone, num_classes=2, min_size=64, max_size=64)
    assert count_parameters(model) == EXPECTED_PARAMETERS[backbone]
    assert count_parameters(model) == manifest[backbone]["parameters"]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest[backbone]["state_dict"]

    model.train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    encoder = model.backbone.encoder
    for stream_conv in (encoder.patch_embed1.proj, encoder.extra_patch_embed1.proj):
        assert stream_conv.weight.grad is not None and stream_conv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_unknown_backbone_lists_the_five():
    with pytest.raises(ValueError, match="mit_b0, mit_b1, mit_b2, mit_b4, mit_b5"):
        build_detector("mit_b3", num_classes=2)


def test_fused_attention_gives_the_eager_features():
    torch.manual_seed(0)
    fused = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64).eval()
    eager = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64,
                           fused_attention=False).eval()
    eager.load_state_dict(fused.state_dict())
    frames = torch.rand(2, 5, 96, 128)
    with torch.no_grad():
        a, b = fused.backbone(frames), eager.backbone(frames)
    assert list(a) == ["0", "1", "2", "3", "pool"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert a["0"].shape == (2, 256, 24, 32) and a["pool"].shape == (2, 256, 2, 2)


def test_saved_state_dict_reloads_strictly_with_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64).eval()
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    other = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64).eval()
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)["model_state_dict"]
    other.load_state_dict(state, strict=True)
    frames = torch.rand(1, 5, 64, 64)
    with torch.no_grad():
        for key, value in model.backbone(frames).items():
            assert torch.equal(value, other.backbone(frames)[key])


def test_encoder_stage_shapes():
    encoder = get_encoder("mit_b1").eval()
    with torch.no_grad():
        outputs = encoder(torch.rand(1, 3, 64, 96), torch.rand(1, 2, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(1, 64, 16, 24), (1, 128, 8, 12),
                                                 (1, 320, 4, 6), (1, 512, 2, 3)]
