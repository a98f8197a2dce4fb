"""The backbone registry: every fact about the five MiT variants, in one table.

The encoder's shape, the detector's size, the memory a trial needs and how long it trains all
come from here: config, models, engine and tune read this table instead of keeping their own.
It imports neither torch nor Ray, so config and the command line stay fast to import (the
table sits beside config.py rather than in models/, whose package imports torch).

Sources of the measured figures, per column:
- parameters: counted here, `sum(p.numel())` of `build_detector(name, num_classes=2)`; they
  equal the reference's manifest and training guide (27.8M ... 196.6M; tests/models).
- train_memory_gb: docs/scale.md, "projected GB @800": peak training memory at batch 2 of
  800x1333 frames, fp32, SGD with momentum. Measured on the 2-core CPU at min_size 320 with
  `python benchmarks/memory.py --min-size 320 --project-to 480 800`, the activations then
  scaled by the pixel count. A projection, not a GPU measurement.
- checkpoint_on_cuda: the `--activation-checkpointing auto` default. mit_b4/b5 recompute encoder
  blocks in backward so that they train at 800x1333 within 40 GiB (tests/gpu/test_memory.py);
  the smaller three fit without it and would only lose speed.
- cpu_step_s: docs/performance.md, goal 1, run 2, "optimised s per step": one training step,
  batch 2 of 5 x 240 x 320 at min_size 320, 2-core CPU, torch 2.14.1
  (`python benchmarks/cpu_throughput.py --steps 4`). Run 1 gave 2.21 / 3.24 / 4.27 / 8.09 /
  10.75 s; this machine swings by up to 60% between runs.
- gpu_step_s: one training step (batch 2, 800x1333, fp32) on one A100 80 GB, what the makespan
  planner (tune/planner.py) predicts hours from. mit_b0 and mit_b1 come from the reference
  authors' measured 15-epoch times (FACTS.md: 2.68 h and 3.44 h) over their 3,900 steps an
  epoch (7,800 training frames of 9,750 labelled, batch 2): 0.165 and 0.212 s. mit_b2 from their
  estimate (6.75 h): 0.415 s. mit_b4 and mit_b5 never trained there (out of memory): projected
  from mit_b2 by the reference's own CPU step-time ratios (FACTS.md: 6.4 s and 7.4 s against
  4.0 s): 0.664 and 0.768 s. Not measured by this project: no GPU has been lent to it yet.
"""

from __future__ import annotations

from dataclasses import dataclass

# SegFormer's MiT: the same heads and spatial-reduction ratios per stage in every variant.
MIT_NUM_HEADS = (1, 2, 5, 8)
MIT_SR_RATIOS = (8, 4, 2, 1)


@dataclass(frozen=True)
class BackboneSpec:
    """One named variant: its MiT shape and what training it costs."""

    name: str
    depths: tuple[int, int, int, int]  # MiT blocks per stage
    embed_dims: tuple[int, int, int, int]  # channels per stage
    parameters: int  # the whole detector's, for num_classes=2
    train_memory_gb: float  # batch 2, 800x1333, fp32; projected (see the module docstring)
    checkpoint_on_cuda: bool  # activation checkpointing under `auto` on CUDA
    cpu_step_s: float  # measured CPU training step (see the module docstring)
    gpu_step_s: float  # A100 training step, batch 2 at 800x1333 (see the module docstring)
    num_heads: tuple[int, int, int, int] = MIT_NUM_HEADS
    sr_ratios: tuple[int, int, int, int] = MIT_SR_RATIOS
    fpn_channels: int = 256  # FPN width, which the RPN and box head read too
    box_head_size: int = 1024  # FasterRCNN's own representation size
    for_tests: bool = False  # never a default backbone, a --help choice or a summary column


_SPECS = (
    BackboneSpec("mit_b0", depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256),
                 parameters=27_786_433, train_memory_gb=10.2, checkpoint_on_cuda=False,
                 cpu_step_s=2.26, gpu_step_s=0.165),
    BackboneSpec("mit_b1", depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512),
                 parameters=60_014_945, train_memory_gb=14.0, checkpoint_on_cuda=False,
                 cpu_step_s=3.38, gpu_step_s=0.212),
    BackboneSpec("mit_b2", depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512),
                 parameters=82_104_673, train_memory_gb=18.4, checkpoint_on_cuda=False,
                 cpu_step_s=4.09, gpu_step_s=0.415),
    BackboneSpec("mit_b4", depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512),
                 parameters=155_397_473, train_memory_gb=30.4, checkpoint_on_cuda=True,
                 cpu_step_s=7.42, gpu_step_s=0.664),
    BackboneSpec("mit_b5", depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512),
                 parameters=196_598_113, train_memory_gb=35.0, checkpoint_on_cuda=True,
                 cpu_step_s=9.00, gpu_step_s=0.768),
)
# The test variant, as timm's `test_vit`: the same network code path (both streams, FRM, FFM,
# FPN, Faster R-CNN) with one block a stage and narrow widths everywhere, so that tests of the
# machinery (resume, signals, clusters, S3, ...) train a real detector in a fraction of the time.
# Named explicitly or not at all: it is in no default and in no list of choices.
# cpu_step_s: mit_b0's figure times the two backbones' step-time ratio in one run of
# `python benchmarks/cpu_throughput.py --backbones test_mit mit_b0 --steps 4` (0.152: 8.33 and
# 1.27 img/s optimised); gpu_step_s: mit_b0's times the same ratio (no GPU measurement).
TEST_SPEC = BackboneSpec("test_mit", depths=(1, 1, 1, 1), embed_dims=(16, 24, 32, 48),
                         parameters=564_905, train_memory_gb=0.5,
                         checkpoint_on_cuda=False, cpu_step_s=0.34, gpu_step_s=0.025,
                         num_heads=(1, 2, 2, 4), fpn_channels=32, box_head_size=64,
                         for_tests=True)

BACKBONE_REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (*_SPECS, TEST_SPEC)}
# The five real variants, smallest first: the command's default --backbones, its choices, and
# the order of the summary.
BACKBONE_NAMES: tuple[str, ...] = tuple(name for name, spec in BACKBONE_REGISTRY.items()
                                        if not spec.for_tests)
COST_UNIT = "mit_b0"  # relative_cost is 1.0 here


def get_backbone(name: str) -> BackboneSpec:
    """The named variant (the test variant too); an unknown name raises ValueError listing the
    real five."""
    if name not in BACKBONE_REGISTRY:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONE_NAMES)}")
    return BACKBONE_REGISTRY[name]


def is_backbone(name: str) -> bool:
    """True for the five real variants and the test variant."""
    return name in BACKBONE_REGISTRY


def relative_cost(name: str) -> float:
    """Training time per step relative to mit_b0's, from the measured CPU step times."""
    return get_backbone(name).cpu_step_s / BACKBONE_REGISTRY[COST_UNIT].cpu_step_s
