"""The engine's detector and the plain eager one (every speed switch off: explicit attention,
torchvision's RoIAlign) compute the same training step.

In float32 their first-step losses differ by up to ~4e-4 relative (benchmarks/
epoch_throughput.py): summation order moves scores by ~1e-7, and the RPN's top-k and NMS then
keep different proposals. In float64 the rounding is too small to flip those choices, so the
two must agree to rounding: proposals, every loss and every parameter's gradient."""

import torch

from crossdet_ray.models import build_detector


def training_step(model, images, targets):
    """Losses, proposals and gradients of one step, with the samplers' draws fixed."""
    proposals = []
    hook = model.rpn.register_forward_hook(
        lambda module, inputs, output: proposals.extend(p.detach() for p in output[0]))
    torch.manual_seed(5)
    losses = model(images, targets)
    hook.remove()
    model.zero_grad()
    sum(losses.values()).backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                 if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, proposals, gradients


def test_engine_and_eager_detectors_agree_in_float64():
    torch.manual_seed(0)
    engine = build_detector("test_mit", num_classes=3, min_size=96, max_size=160)
    eager = build_detector("test_mit", num_classes=3, min_size=96, max_size=160,
                           fused_attention=False, vectorized_roi_align=False)
    eager.load_state_dict(engine.state_dict())
    engine.double().train()
    eager.double().train()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(5, 96, 128, generator=generator, dtype=torch.float64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 20.0, 120.0, 80.0]],
                                      dtype=torch.float64),
                "labels": torch.tensor([1, 2])} for _ in range(2)]

    engine_losses, engine_proposals, engine_gradients = training_step(engine, images, targets)
    eager_losses, eager_proposals, eager_gradients = training_step(eager, images, targets)

    for name, value in eager_losses.items():
        assert abs(engine_losses[name] - value) <= 1e-10 * abs(value), name
    for ours, theirs in zip(engine_proposals, eager_proposals, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    assert engine_gradients.keys() == eager_gradients.keys()
    for name, gradient in eager_gradients.items():
        torch.testing.assert_close(engine_gradients[name], gradient, rtol=1e-9, atol=1e-12,
                                   msg=name)
