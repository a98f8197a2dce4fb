"""How much a run will write, said before it starts, and refused when it cannot fit.

A run's bytes are nearly all checkpoints: each epoch file holds the weights and SGD's momentum
(8 bytes a parameter, 1.57 GB for mit_b5), the final weights-only file 4 bytes a parameter.
`best_model.pth`, `best_map_model.pth` and the final complete checkpoint are second names of
epoch files on local disks, so they cost nothing more, but they keep up to two old epochs alive
beyond `--keep-checkpoints`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from crossdet_ray.backbones import get_backbone

EPOCH_FILE_BYTES_PER_PARAMETER = 8  # fp32 weights + fp32 momentum
FINAL_WEIGHTS_BYTES_PER_PARAMETER = 4
LOG_BYTES_PER_TRIAL = 4 << 20  # CSVs, JSON, Tune's own files and event files: a few MB
HEADROOM = 1.05  # leave 5% of the estimate free


@dataclass(frozen=True)
class DiskEstimate:
    total_bytes: int  # the most it can write: the best epochs kept beside the newest ones
    per_trial_bytes: dict[str, int]
    epoch_files_per_trial: int
    # What it writes when the best-loss and best-mAP epochs are among the newest kept (a
    # run that keeps learning); equal to total_bytes when every epoch is kept.
    usual_bytes: int = 0
    usual_epoch_files_per_trial: int = 0

    def describe(self) -> str:
        largest = max(self.per_trial_bytes.items(), key=lambda item: item[1])
        text = (f"{_gb(self.total_bytes)} ({self.epoch_files_per_trial} epoch checkpoint(s) "
                f"kept per trial; the largest, {largest[0]}, {_gb(largest[1])})")
        if self.usual_bytes and self.usual_bytes < self.total_bytes:
            text = (f"at most {text}, or {_gb(self.usual_bytes)} when the best epochs are "
                    f"among the newest {self.usual_epoch_files_per_trial} kept")
        return text


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB"


def estimate_run_bytes(trials: dict[str, str], epochs: int,
                       keep_checkpoints: int | None) -> DiskEstimate:
    """`trials` maps each trial's name to its backbone."""
    # --keep-checkpoints N keeps the last N, plus the best-loss and best-mAP epochs if older.
    kept = epochs if keep_checkpoints is None else min(epochs, keep_checkpoints + 2)
    usual_kept = epochs if keep_checkpoints is None else min(epochs, keep_checkpoints)

    def trial_bytes(backbone: str, epoch_files: int) -> int:
        parameters = get_backbone(backbone).parameters
        return (epoch_files * EPOCH_FILE_BYTES_PER_PARAMETER * parameters
                + FINAL_WEIGHTS_BYTES_PER_PARAMETER * parameters + LOG_BYTES_PER_TRIAL)

    per_trial = {name: trial_bytes(backbone, kept) for name, backbone in trials.items()}
    usual = sum(trial_bytes(backbone, usual_kept) for backbone in trials.values())
    return DiskEstimate(total_bytes=sum(per_trial.values()), per_trial_bytes=per_trial,
                        epoch_files_per_trial=kept, usual_bytes=usual,
                        usual_epoch_files_per_trial=usual_kept)


def free_bytes(local_path: str) -> int:
    return shutil.disk_usage(local_path).free


def disk_shortfall(estimate: DiskEstimate, free: int, log_dir: str,
                   keep_checkpoints: int | None) -> str | None:
    """A message saying why the run cannot fit and what helps, or None when it fits."""
    if estimate.total_bytes * HEADROOM <= free:
        return None
    advice = ("pass --keep-checkpoints 1 (keeps the newest epoch, the best and the final "
              "checkpoints)" if keep_checkpoints is None or keep_checkpoints > 1 else
              "train fewer --backbones at once")
    return (f"--log-dir {log_dir}: the run will write about {estimate.describe()} but only "
            f"{_gb(free)} is free there; {advice}, free some space, or choose another "
            "--log-dir (--skip-disk-check starts anyway)")
