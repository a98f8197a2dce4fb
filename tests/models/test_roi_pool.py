"""The vectorised multi-scale RoIAlign gives torchvision's outputs and gradients."""

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from crossdet_ray.models.roi_pool import VectorizedMultiScaleRoIAlign

NAMES = ["0", "1", "2", "3", "pool"]


def _features(generator, height=64, width=96, channels=8):
    shapes = [(height // 4 >> i, width // 4 >> i) for i in range(4)]
    shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return OrderedDict((n, torch.randn(2, channels, h, w, generator=generator,
                                       requires_grad=True)) for n, (h, w) in zip(NAMES, shapes))


def _boxes(generator, count, height=64, width=96):
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) - 4
    size = torch.rand(count, 2, generator=generator) ** 2 * 120 + 0.2  # tiny to larger than the image
    boxes = torch.cat([corner, corner + size], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(-2, width + 2)  # a few just outside the image
    boxes[:, 1::2] = boxes[:, 1::2].clamp(-2, height + 2)
    return boxes


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), ((5, 3), 1), (4, 3)])
def test_outputs_and_gradients_equal_torchvision(output_size, sampling_ratio):
    generator = torch.Generator().manual_seed(0)
    features = _features(generator)
    boxes = [_boxes(generator, 60), _boxes(generator, 45)]
    image_shapes = [(64, 96), (60, 90)]
    results = []
    for pool_type in (MultiScaleRoIAlign, VectorizedMultiScaleRoIAlign):
        for feature in features.values():
            feature.grad = None
        pool = pool_type(NAMES, output_size, sampling_ratio)
        pooled = pool(features, boxes, image_shapes)
        pooled.backward(torch.linspace(-1, 1, pooled.numel()).view_as(pooled))
        results.append((pooled.detach(), [f.grad.clone() for f in features.values()]))
    (expected, expected_grads), (actual, actual_grads) = results
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_boxes_gives_an_empty_batch():
    features = _features(torch.Generator().manual_seed(1))
    pooled = VectorizedMultiScaleRoIAlign(NAMES, 7, 2)(
        features, [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 96), (64, 96)])
    assert pooled.shape == (0, 8, 7, 7)


def test_detector_uses_it_by_default_and_the_switch_restores_torchvision():
    from crossdet_ray.models import build_detector

    fast = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64)
    plain = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64,
                           vectorized_roi_align=False)
    assert type(fast.roi_heads.box_roi_pool) is VectorizedMultiScaleRoIAlign
    assert type(plain.roi_heads.box_roi_pool) is MultiScaleRoIAlign
