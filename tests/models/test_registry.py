"""The backbone registry against what it describes: built models, the reference manifest, the
documents its figures are cited from, and every module that reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from crossdet_ray import config
from crossdet_ray.backbones import BACKBONE_NAMES, BACKBONE_REGISTRY, get_backbone, relative_cost
from crossdet_ray.cli import build_parser
from crossdet_ray.engine.train import use_activation_checkpointing
from crossdet_ray.models import MIT_VARIANTS, get_encoder
from crossdet_ray.models import BACKBONE_NAMES as MODELS_BACKBONE_NAMES
from crossdet_ray.tune.launcher import start_order, trial_specs
from crossdet_ray.tune.planner import CUDA_RESERVED_GB, Workload, memory_gb

DOCS = Path(__file__).resolve().parents[2] / "docs"
ENCODER = "backbone.encoder."


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_parameter_count_is_the_built_detectors(backbone, detector):
    built = detector(backbone)  # num_classes=2, shared with test_detector.py
    assert sum(p.numel() for p in built.parameters()) == get_backbone(backbone).parameters


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_mit_shape_is_the_reference_manifests(backbone, manifest):
    """Depths, widths and reduction ratios read back from the reference's keys and shapes."""
    spec = get_backbone(backbone)
    shapes = manifest["backbones"][backbone]["state_dict"]
    for stage in range(1, 5):
        blocks = {int(k.split(".")[3]) for k in shapes if k.startswith(f"{ENCODER}block{stage}.")}
        assert len(blocks) == spec.depths[stage - 1]
        assert shapes[f"{ENCODER}patch_embed{stage}.proj.weight"][0] == spec.embed_dims[stage - 1]
        reduction = shapes.get(f"{ENCODER}block{stage}.0.attn.sr.weight", [0, 0, 1, 1])[2]
        assert reduction == spec.sr_ratios[stage - 1]


@pytest.mark.parametrize("backbone", ["mit_b0", "mit_b2"])
def test_encoder_built_from_the_registry(backbone):
    spec = get_backbone(backbone)
    encoder = get_encoder(backbone).eval()
    for stage in range(1, 5):
        for prefix in ("", "extra_"):
            blocks = getattr(encoder, f"{prefix}block{stage}")
            assert len(blocks) == spec.depths[stage - 1]
            assert {b.attn.num_heads for b in blocks} == {spec.num_heads[stage - 1]}
            assert {b.attn.sr_ratio for b in blocks} == {spec.sr_ratios[stage - 1]}
    with torch.no_grad():
        maps = encoder.forward_5ch(torch.rand(1, 5, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, dim, 64 // s, 96 // s) for dim, s in
                                              zip(spec.embed_dims, (4, 8, 16, 32))]


def test_every_consumer_reads_the_registry():
    assert BACKBONE_NAMES == ("mit_b0", "mit_b1", "mit_b2", "mit_b4", "mit_b5")
    assert config.BACKBONES == MODELS_BACKBONE_NAMES == BACKBONE_NAMES
    assert config.TrainConfig().backbones == list(BACKBONE_NAMES)
    assert build_parser().parse_args([]).backbones == list(BACKBONE_NAMES)
    assert MIT_VARIANTS is BACKBONE_REGISTRY
    # The planner's memory at the registry's own setting (batch 2, 800 px, fp32, no
    # checkpointing) is the registry's figure plus what CUDA itself reserves.
    fp32 = Workload(train_frames=1, epochs=1, batch_size=2, min_size=800, amp="off",
                    activation_checkpointing="off")
    for name, spec in BACKBONE_REGISTRY.items():
        assert memory_gb(name, fp32, 2) == pytest.approx(spec.train_memory_gb + CUDA_RESERVED_GB)
    auto = config.TrainConfig(activation_checkpointing="auto")
    for name, spec in BACKBONE_REGISTRY.items():
        assert use_activation_checkpointing(auto, name, torch.device("cuda")) == \
            spec.checkpoint_on_cuda
        assert not use_activation_checkpointing(auto, name, torch.device("cpu"))
    assert [n for n, s in BACKBONE_REGISTRY.items() if s.checkpoint_on_cuda] == ["mit_b4",
                                                                                  "mit_b5"]


def test_start_order_is_by_relative_cost():
    specs = trial_specs(["mit_b1", "mit_b0", "mit_b5", "mit_b2", "mit_b4"], 0.005, [])
    ordered = [s.backbone for s in start_order(specs)]
    assert ordered == sorted(BACKBONE_NAMES, key=relative_cost, reverse=True)


def test_cost_and_memory_grow_with_the_backbone():
    assert relative_cost("mit_b0") == 1.0
    costs = [relative_cost(n) for n in BACKBONE_NAMES]
    memory = [get_backbone(n).train_memory_gb for n in BACKBONE_NAMES]
    params = [get_backbone(n).parameters for n in BACKBONE_NAMES]
    assert costs == sorted(costs) and memory == sorted(memory) and params == sorted(params)
    with pytest.raises(ValueError, match="mit_b0, mit_b1, mit_b2, mit_b4, mit_b5"):
        get_backbone("mit_b3")


def _table_rows(text: str) -> dict[str, list[str]]:
    """`| mit_bN | a | b | ... |` rows of a Markdown page, by backbone (the first such row)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if re.fullmatch(r"mit_b\d", cells[0]):
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_figures_are_the_cited_documents():
    """Memory from docs/scale.md (projected @800), step times from docs/performance.md (goal 1,
    run 2, optimised)."""
    memory = _table_rows((DOCS / "scale.md").read_text())
    steps = _table_rows((DOCS / "performance.md").read_text())
    for name in BACKBONE_NAMES:
        spec = get_backbone(name)
        assert float(memory[name][-1]) == spec.train_memory_gb
        assert memory[name][0] == f"{spec.parameters / 1e6:.1f}M"
        assert float(steps[name][2].split("/")[1]) == spec.cpu_step_s
