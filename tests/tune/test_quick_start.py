"""The README's quick start, run as written: all five real backbones side by side end well, and
the run fits the disk it announced.

The command is read from README.md's "Quick start" block, so the README and this test cannot
drift apart. Flags that only shorten it are added (SHORTER: one epoch over 6 frames, no closing
evaluation), with --log-dir and --name, and the synthetic cache is the test's own. What the two
epochs of the real command learn is tests/engine/test_learning_real.py's promise (mit_b0 on the
same set at the same settings); the closing evaluation and report are tests/tune/test_outputs.py's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from crossdet_ray.backbones import get_backbone
from crossdet_ray.config import BACKBONES
from crossdet_ray.tune.disk import EPOCH_FILE_BYTES_PER_PARAMETER

from .helpers import ROOT, ray_env, run

pytestmark = pytest.mark.ray

SCRIPT = "experiments/all_backbones.py"
SHORTER = ["--epochs", "1", "--synthetic-images", "6", "--no-evaluate"]
ESTIMATE = re.compile(r"this run will write about (?:at most )?([\d.]+) GB")


def readme_quick_start() -> list[str]:
    """The training command of README.md's Quick start block: the arguments after the script."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md's Quick start has no ```bash block"
    for line in block.group(1).splitlines():
        if SCRIPT in line and not line.lstrip().startswith("#"):
            words = shlex.split(line.split("&&")[-1])
            position = next(i for i, word in enumerate(words) if word.endswith(SCRIPT))
            return words[position + 1:]
    raise AssertionError(f"README.md's Quick start block runs no {SCRIPT}")


def disk_bytes(folder: Path) -> int:
    """Bytes the folder holds on disk, each hard-linked file once (best_model.pth and
    best_map_model.pth are second names of epoch files)."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def test_readme_says_what_the_preset_stands_for():
    """README's "`--preset quick` stands for `...`" parses to the same run as the preset."""
    from crossdet_ray.cli import parse_args

    text = " ".join((ROOT / "README.md").read_text().split())
    stated = re.search(r"`--preset quick` stands for `([^`]+)`", text)
    assert stated, "README.md does not say what --preset quick stands for"
    assert vars(parse_args(shlex.split(stated.group(1)))) == {
        **vars(parse_args(["--preset", "quick"])), "preset": None}


@pytest.mark.timeout(1500)
def test_readme_quick_start_trains_all_five_and_fits_its_disk(tmp_path):
    log_dir = tmp_path / "logs"
    args = [*readme_quick_start(), *SHORTER, "--log-dir", str(log_dir), "--name", "quick"]
    env = {**ray_env(), "CROSSDET_CACHE": str(tmp_path / "cache")}
    result = run(args, tmp_path, "quick_start", timeout=1400, env=env)
    output = result.stdout + result.stderr
    assert result.process.returncode == 0, result.stderr[-3000:]

    run_dir = log_dir / "quick"
    summary = json.loads((run_dir / "final_summary.json").read_text())
    assert summary["num_succeeded"] == len(BACKBONES)
    assert sorted(row["trial"] for row in summary["results"]) == sorted(BACKBONES)

    # Disk: what the run left is within what it announced before starting, and each trial
    # kept one epoch file besides its best ones.
    announced = ESTIMATE.search(output)
    assert announced, "the run did not say how much it would write"
    written = disk_bytes(run_dir)
    assert written <= float(announced.group(1)) * 1e9, (written, announced.group(0))
    for backbone in BACKBONES:
        checkpoints = run_dir / backbone / "checkpoints"
        epoch_files = sorted(p.name for p in checkpoints.glob("*epoch*.pth"))
        inodes = {os.stat(p).st_ino for p in checkpoints.glob("*.pth")}
        assert 1 <= len(epoch_files) <= 3, (backbone, epoch_files)
        # The epoch file, the best ones when older, and the final weights-only file.
        assert len(inodes) <= 4, (backbone, sorted(p.name for p in checkpoints.glob("*.pth")))
        # Each epoch file is the size the estimate counts: weights and momentum, 8 B a
        # parameter (the registry's count, which tests/models checks against the reference).
        assert os.path.getsize(checkpoints / epoch_files[-1]) == pytest.approx(
            EPOCH_FILE_BYTES_PER_PARAMETER * get_backbone(backbone).parameters, rel=0.01)


def test_synthetic_frame_size_takes_a_side_or_height_by_width(capsys):
    from crossdet_ray.cli import parse_args
    from crossdet_ray.data.resolve import frame_sizes

    assert frame_sizes(parse_args(["--synthetic-frame-size", "96X144"]).synthetic_frame_size) \
        == [(96, 144)]
    assert frame_sizes(parse_args(["--synthetic-frame-size", "120"]).synthetic_frame_size) \
        == [(120, 120)]
    for bad in ("8x100", "96x", "big"):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--synthetic-frame-size", bad])
        assert exit_info.value.code == 2
        assert "--synthetic-frame-size" in capsys.readouterr().err
