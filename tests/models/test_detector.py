"""The network against the reference manifest, and its forward/backward on tiny frames."""

from __future__ import annotations

import pytest
import torch

from crossdet_ray.models import (
    BACKBONE_NAMES,
    MIT_VARIANTS,
    build_detector,
    count_parameters,
    get_encoder,
)

# The training guide's figures (27.8M ... 196.6M), exactly, with one object class.
EXPECTED_PARAMETERS = {"mit_b0": 27_786_433, "mit_b1": 60_014_945, "mit_b2": 82_104_673,
                       "mit_b4": 155_397_473, "mit_b5": 196_598_113}
LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_the_five_backbones():
    assert BACKBONE_NAMES == ("mit_b0", "mit_b1", "mit_b2", "mit_b4", "mit_b5")
    assert set(MIT_VARIANTS) == set(BACKBONE_NAMES) | {"test_mit"}  # the test variant too


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_parameter_count_matches_the_reference(backbone, detector, manifest):
    assert manifest["num_classes"] == 2
    count = count_parameters(detector(backbone))
    assert count == EXPECTED_PARAMETERS[backbone]
    assert count == manifest["backbones"][backbone]["parameters"]


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_state_dict_keys_and_shapes_match_the_reference(backbone, detector, manifest):
    ours = {k: list(v.shape) for k, v in detector(backbone).state_dict().items()}
    expected = manifest["backbones"][backbone]["state_dict"]
    assert sorted(set(expected) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(expected)) == []  # unexpected
    assert ours == expected


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_trains_and_detects(backbone, detector, random_batch):
    model = detector(backbone)
    model.train()
    model.zero_grad(set_to_none=True)
    images, targets = random_batch()
    losses = model(images, targets)
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    encoder = model.backbone.encoder
    for stream_conv in (encoder.patch_embed1.proj, encoder.extra_patch_embed1.proj):
        assert stream_conv.weight.grad is not None and stream_conv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for found in detections:
        assert set(found) == {"boxes", "labels", "scores"}
        assert found["boxes"].shape[1:] == (4,) and len(found["labels"]) == len(found["scores"])


def test_unknown_backbone_lists_the_five():
    with pytest.raises(ValueError, match="mit_b0, mit_b1, mit_b2, mit_b4, mit_b5"):
        build_detector("mit_b3", num_classes=2)
    with pytest.raises(ValueError, match="mit_b0, mit_b1, mit_b2, mit_b4, mit_b5"):
        get_encoder("resnet50")


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
        # float32 rounding differs between the kernels; judge it against the features' spread
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4 * a[key].std().item())
    assert a["0"].shape == (2, 256, 24, 32) and a["pool"].shape == (2, 256, 2, 2)


def test_reference_style_checkpoint_reloads_strictly_with_identical_outputs(tmp_path, detector,
                                                                           random_batch):
    model = detector("mit_b0").eval()
    checkpoint = {"epoch": 3, "backbone": "mit_b0", "model_state_dict": model.state_dict(),
                  "loss": 1.0, "best_loss": 1.0, "best_epoch": 3}
    torch.save(checkpoint, tmp_path / "best_model.pth")

    torch.manual_seed(123)  # a different init, so equality below comes from the checkpoint
    fresh = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64).eval()
    state = torch.load(tmp_path / "best_model.pth", weights_only=True)["model_state_dict"]
    fresh.load_state_dict(state, strict=True)
    images, _ = random_batch(seed=5)
    with torch.no_grad():
        ours, theirs = model.backbone(torch.stack(images)), fresh.backbone(torch.stack(images))
        for key in ours:
            assert torch.equal(ours[key], theirs[key])
        for a, b in zip(model(images), fresh(images)):
            for key in a:
                assert torch.equal(a[key], b[key])


def test_encoder_stage_shapes_and_channel_check():
    encoder = get_encoder("mit_b1").eval()
    with torch.no_grad():
        outputs = encoder(torch.rand(1, 3, 64, 96), torch.rand(1, 2, 64, 96))
        stacked = encoder.forward_5ch(torch.rand(1, 5, 64, 96))
    expected = [(1, 64, 16, 24), (1, 128, 8, 12), (1, 320, 4, 6), (1, 512, 2, 3)]
    assert [tuple(o.shape) for o in outputs] == expected
    assert [tuple(o.shape) for o in stacked] == expected
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\)"):
        encoder.forward_5ch(torch.rand(1, 4, 64, 96))


def test_stochastic_depth_rises_linearly_over_each_stream(detector):
    encoder = detector("mit_b2").backbone.encoder
    for prefix in ("", "extra_"):
        rates = [block.drop_path.drop_prob for stage in range(1, 5)
                 for block in getattr(encoder, f"{prefix}block{stage}")]
        assert len(rates) == sum(MIT_VARIANTS["mit_b2"].depths)
        torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, len(rates)))


def test_activation_checkpointing_gives_the_same_gradients(random_batch):
    """Recomputing blocks in backward (for mit_b4/b5 on a GPU) changes memory, not results."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_detector("mit_b0", num_classes=2, min_size=64, max_size=64,
                               activation_checkpointing=checkpointing).train()
        images, targets = random_batch()
        torch.manual_seed(1)  # same drop-path masks and sampling in both runs
        sum(model(images, targets).values()).backward()
        encoder = model.backbone.encoder
        grads.append([p.grad.clone() for p in (encoder.block1[0].attn.q.weight,
                                               encoder.extra_block4[1].mlp.fc2.weight)])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=1e-4, atol=1e-6)


def test_channels_last_changes_memory_layout_not_outputs(random_batch):
    """--channels-last (auto on CUDA): NHWC conv weights, the same FPN features and losses."""
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.train import build_model, use_channels_last

    assert use_channels_last(TrainConfig(), torch.device("cuda"))
    assert not use_channels_last(TrainConfig(), torch.device("cpu"))
    outputs = []
    for switch in ("off", "on"):
        config = TrainConfig(min_size=64, max_size=64, channels_last=switch)
        model = build_model(config, "mit_b0", num_classes=2).eval()
        weight = model.backbone.encoder.patch_embed1.proj.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == (switch == "on")
        images, _ = random_batch()
        with torch.no_grad():
            outputs.append(model.backbone(model.transform(images)[0].tensors))
    for name in outputs[0]:
        torch.testing.assert_close(outputs[1][name], outputs[0][name], rtol=1e-4, atol=1e-5)


def test_compile_runs_the_encoder_through_torch_compile_and_keeps_checkpoint_keys(random_batch):
    """--compile: the backbone's call into the encoder goes through the compiler (a recording
    backend here, instead of inductor's minutes of C++ builds), with unchanged keys and features."""
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.train import build_model, compile_encoder

    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    config = TrainConfig(min_size=64, max_size=64)
    model = build_model(config, "test_mit", num_classes=2).eval()
    keys = list(model.state_dict())
    images, _ = random_batch()
    frames = model.transform(images)[0].tensors
    with torch.no_grad():
        eager = model.backbone(frames)
        compile_encoder(model, backend=recording_backend)
        compiled = model.backbone(frames)
    assert graphs, "the encoder did not run through torch.compile"
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints still load
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)


def test_compile_is_skipped_with_a_warning_on_the_cpu(caplog):
    from crossdet_ray.config import TrainConfig
    from crossdet_ray.engine.train import build_model

    config = TrainConfig(min_size=64, max_size=64, compile=True)
    model = build_model(config, "mit_b0", num_classes=2, device=torch.device("cpu"))
    assert model.backbone.encoder._compiled_call_impl is None  # runs eager
    assert any("--compile is ignored on the CPU" in r.getMessage() for r in caplog.records)
