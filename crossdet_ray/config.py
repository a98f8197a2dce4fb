"""Training configuration: the seed script's flags and defaults as one dataclass.

A `TrainConfig` travels from the CLI through Ray Tune into every trial, and is stored in each
checkpoint, so it converts to and from a dict of plain types (no tensors, no paths objects).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from crossdet_ray.backbones import BACKBONE_NAMES

BACKBONES: tuple[str, ...] = BACKBONE_NAMES  # the registry's order, smallest first
# `--mlflow` without a tracking URI: a SQLite database in the run directory.
MLFLOW_DEFAULT = "default"
# --pending-timeout: how long a trial may wait for a node no live node is (a cloud GPU node
# boots and installs in 5-15 minutes); 0 waits for ever.
DEFAULT_PENDING_TIMEOUT_S = 1800.0


@dataclass
class TrainConfig:
    """Everything one backbone's training needs; defaults are CrossAttentionDet's."""

    data: str | None = None  # dataset folder with images/ and labels/; None = built-in synthetic
    epochs: int = 30
    batch_size: int = 2
    lr: float = 0.005
    lr_step_size: int = 10
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_workers: int = 4
    backbones: list[str] = field(default_factory=lambda: list(BACKBONES))
    log_dir: str = "training_logs"
    min_size: int = 800
    max_size: int = 1333
    test_size: float = 0.2
    split_seed: int = 42
    seed: int = 0  # torch / python RNG seed for weights and shuffling
    pretrained: str | None = None  # local SegFormer MiT weights file, loaded into both streams
    # A crossdet_ray checkpoint whose model weights a fresh training starts from (fine-tuning,
    # --init-from); the optimizer and schedule still start anew. Set per trial by the launcher.
    init_weights: str | None = None
    device: str = "auto"  # "auto" = CUDA when visible, else CPU
    # Speed and memory switches; "auto" turns each on only where it pays and is safe.
    amp: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 on CPU; "bf16"; "off"
    activation_checkpointing: str = "auto"  # "auto": the registry's choice on CUDA; "on"; "off"
    channels_last: str = "auto"  # NHWC convolutions: "auto" = on CUDA (tensor cores); "on"; "off"
    compile: bool = False  # torch.compile the encoder on CUDA (ignored on the CPU)
    evaluate_every_epoch: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring keys this version does not know (older/newer checkpoints)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        if "backbones" in kwargs:
            kwargs["backbones"] = list(kwargs["backbones"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
