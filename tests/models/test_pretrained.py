"""SegFormer MiT ImageNet weights from a local file, into both streams."""

import pytest
import torch

from crossdet_ray.models import build_detector, get_encoder, load_pretrained_mit


def _segformer_weights(encoder, seed=3):
    """A SegFormer-named MiT state dict (RGB stream names, 3-channel first conv, a head)."""
    torch.manual_seed(seed)
    weights = {k: torch.randn_like(v, dtype=torch.float32) if v.is_floating_point() else v
               for k, v in encoder.state_dict().items()
               if not k.startswith(("extra_", "FRMs", "FFMs"))}
    weights["head.weight"] = torch.randn(1000, encoder.embed_dims[-1])
    weights["head.bias"] = torch.randn(1000)
    return weights


def _assert_both_streams_hold(state, weights):
    rgb_kernel = weights["patch_embed1.proj.weight"]
    assert rgb_kernel.shape[1] == 3
    torch.testing.assert_close(state["patch_embed1.proj.weight"], rgb_kernel)
    expected_x = rgb_kernel.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1)
    torch.testing.assert_close(state["extra_patch_embed1.proj.weight"], expected_x)
    for key in weights:
        if key.startswith("head.") or key == "patch_embed1.proj.weight":
            continue
        torch.testing.assert_close(state[key], weights[key])
        torch.testing.assert_close(state[f"extra_{key}"], weights[key])


@pytest.mark.parametrize("nesting", ["state_dict", "model", None])
def test_loads_into_both_streams_with_the_x_conv_adapted(tmp_path, nesting):
    encoder = get_encoder("mit_b0")
    weights = _segformer_weights(encoder)
    path = tmp_path / "mit_b0.pth"
    torch.save({nesting: weights} if nesting else weights, path)
    fusion_before = {k: v.clone() for k, v in encoder.state_dict().items()
                     if k.startswith(("FRMs", "FFMs"))}

    report = load_pretrained_mit(encoder, path)

    state = encoder.state_dict()
    _assert_both_streams_hold(state, weights)
    assert "head.weight" in report["ignored"] and "head.weight" not in report["loaded"]
    assert len(report["loaded"]) == 2 * (len(weights) - 2)  # both streams, no head
    # only the fusion modules stay at init
    assert report["missing"] and all(k.startswith(("FRMs.", "FFMs.")) for k in report["missing"])
    for key, value in fusion_before.items():
        assert torch.equal(state[key], value)


def test_build_detector_takes_a_pretrained_file(tmp_path):
    weights = _segformer_weights(get_encoder("mit_b0"), seed=4)
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": weights}, path)
    model = build_detector("mit_b0", num_classes=2, pretrained=str(path), min_size=64,
                           max_size=64)
    state = model.backbone.encoder.state_dict()
    _assert_both_streams_hold(state, weights)


def test_missing_or_foreign_files_are_explained(tmp_path):
    encoder = get_encoder("mit_b0")
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"nope\.pth.*do not exist"):
        load_pretrained_mit(encoder, missing)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "head.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match=r"resnet\.pth.*no MiT keys"):
        load_pretrained_mit(encoder, foreign)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match=r"tensor\.pth"):
        load_pretrained_mit(encoder, not_a_dict)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a torch file")
    with pytest.raises(ValueError, match=r"garbage\.pth.*cannot be read"):
        load_pretrained_mit(encoder, garbage)


def test_weights_of_another_size_are_refused(tmp_path):
    path = tmp_path / "mit_b1.pth"
    torch.save(_segformer_weights(get_encoder("mit_b1")), path)
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained_mit(get_encoder("mit_b0"), path)
