"""SegFormer MiT ImageNet weights from a local file, into both streams."""

import pytest
import torch

from crossdet_ray.models import get_encoder, load_pretrained_mit


def _segformer_file(tmp_path, encoder):
    """A SegFormer-named MiT state dict (RGB stream names, plus a classifier head)."""
    torch.manual_seed(3)
    weights = {k: torch.randn_like(v, dtype=torch.float32) if v.is_floating_point() else v
               for k, v in encoder.state_dict().items()
               if not k.startswith(("extra_", "FRMs", "FFMs"))}
    weights["head.weight"] = torch.randn(1000, 256)
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": weights}, path)
    return path, weights


def test_loads_into_both_streams_with_the_x_conv_adapted(tmp_path):
    encoder = get_encoder("mit_b0")
    path, weights = _segformer_file(tmp_path, encoder)
    report = load_pretrained_mit(encoder, path)
    state = encoder.state_dict()
    assert "head.weight" not in report["loaded"]
    torch.testing.assert_close(state["patch_embed1.proj.weight"], weights["patch_embed1.proj.weight"])
    rgb_kernel = weights["patch_embed1.proj.weight"]
    expected_x = rgb_kernel.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1)
    torch.testing.assert_close(state["extra_patch_embed1.proj.weight"], expected_x)
    for key in ("block1.0.attn.q.weight", "block4.1.mlp.fc2.weight", "norm3.weight"):
        torch.testing.assert_close(state[key], weights[key])
        torch.testing.assert_close(state[f"extra_{key}"], weights[key])


def test_missing_or_foreign_files_are_explained(tmp_path):
    encoder = get_encoder("mit_b0")
    with pytest.raises(ValueError, match="do not exist"):
        load_pretrained_mit(encoder, tmp_path / "nope.pth")
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="no MiT keys"):
        load_pretrained_mit(encoder, foreign)


def test_weights_of_another_size_are_refused(tmp_path):
    path, _ = _segformer_file(tmp_path, get_encoder("mit_b1"))
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained_mit(get_encoder("mit_b0"), path)
