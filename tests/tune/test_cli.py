"""The command as users run it: its exit code, its stderr. User mistakes are caught before any
Ray starts, so those tests call `cli.main` in this process; a run that trains, or is
interrupted, is a real subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from .helpers import epoch_rows, ray_env, run_in_process, training_info
from .helpers import command as _command

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=ray_env())


def _small(tiny_dataset, log_dir, *extra):
    return ("--data", tiny_dataset, "--backbones", "test_mit", "--min-size", "64",
            "--max-size", "64", "--num-workers", "0", "--log-dir", str(log_dir),
            "--no-dashboard", "--no-evaluate", "--verbose", "0", *extra)


def _assert_one_clear_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


def test_bad_data_stops_with_the_file_named(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    np.save(data / "images" / "f1.npy", np.zeros((32, 32, 5), np.uint8))
    (data / "labels" / "f1.txt").write_text("0 0.5 0.5 0.2 0.2\nzero 0.5 0.5\n")
    result = run_in_process(capsys, *_small(str(data), tmp_path / "logs"))
    _assert_one_clear_error(result, "f1.txt")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_missing_data_folder(tmp_path, capsys):
    result = run_in_process(capsys, *_small(str(tmp_path / "nowhere"), tmp_path / "logs"))
    _assert_one_clear_error(result, "nowhere")


@pytest.mark.parametrize("flags, fragment", [
    (("--gpus-per-trial", "lots"), "--gpus-per-trial"),
    (("--backbones", "mit_b9"), "mit_b9"),
    (("--epochs", "0"), "--epochs"),
    (("--workers-per-trial", "2", "--batch-size", "3", "--gpus-per-trial", "0"),
     "--batch-size 3 is not divisible by --workers-per-trial 2"),
])
def test_bad_flag_values(tiny_dataset, tmp_path, capsys, flags, fragment):
    result = run_in_process(capsys, *_small(tiny_dataset, tmp_path / "logs"), *flags)
    _assert_one_clear_error(result, fragment)


def test_gpu_request_without_gpu_fails_fast(tiny_dataset, tmp_path):
    env = {**ray_env(), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(_command(*_small(tiny_dataset, tmp_path / "logs"),
                                     "--gpus-per-trial", "1"),
                            capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    _assert_one_clear_error(result, "no GPU", "--gpus-per-trial 0")


def _segformer_file(path: Path) -> dict:
    """A SegFormer-style test_mit file (one stream's names), with recognisable random values."""
    import torch

    from crossdet_ray.models.encoder import get_encoder

    generator = torch.Generator().manual_seed(7)
    weights = {name: torch.randn(tensor.shape, generator=generator) * 0.02
               for name, tensor in get_encoder("test_mit").state_dict().items()
               if not name.startswith(("extra_", "FRMs.", "FFMs."))}
    torch.save(weights, path)
    return weights


def test_flags_reach_the_trial_and_a_failing_trial_exits_1(tiny_dataset, tmp_path):
    """--pretrained, --num-workers > 0 and --cpus-per-trial, as the trial actually used them;
    and beside it a trial that keeps failing: reported, retried once, the run's exit code 1."""
    import json

    import torch

    weights = _segformer_file(tmp_path / "segformer_test_mit.pth")
    # --lr 1e-12 --lr-grid 1 1e21: the lr 1e-12 trial leaves every weight where --pretrained
    # put it (to float rounding); the lr 1e9 one diverges in its first epoch on every attempt,
    # a real failure, retried once (--max-failures 1).
    result = _run(*_small(tiny_dataset, tmp_path / "logs", "--name", "flags", "--epochs", "1",
                          "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--lr", "1e-12",
                          "--lr-grid", "1", "1e21", "--max-failures", "1",
                          "--pretrained", str(tmp_path / "segformer_test_mit.pth")),
                  "--num-workers", "2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Ray dashboard:" not in result.stderr  # --no-dashboard
    run_dir = tmp_path / "logs" / "flags"
    trial = run_dir / "test_mit_lr1e-12"
    info = training_info(trial)
    assert info["status"] == "completed"
    assert info["torch_threads"] == 1 and info["resources"]["cpu"] == 1
    assert info["host_memory_retained"] is True  # engine/host_memory: glibc on Linux
    assert info["config"]["num_workers"] == 2 and len(epoch_rows(trial)) == 1
    final = torch.load(trial / "checkpoints" / "test_mit_final.pth", weights_only=True)
    for name in ("block1.0.attn.q.weight", "patch_embed4.proj.weight"):
        for stream in ("", "extra_"):
            torch.testing.assert_close(final[f"backbone.encoder.{stream}{name}"], weights[name],
                                       rtol=0, atol=1e-6)

    summary = json.loads((run_dir / "final_summary.json").read_text())
    rows = {r["trial"]: r for r in summary["results"]}
    assert rows["test_mit_lr1e-12"]["status"] == "completed"
    failed = rows["test_mit_lr1e+09"]
    assert failed["status"] == "failed"
    assert "NonFiniteLossError" in failed["error"] and "epoch 1" in failed["error"]
    assert summary["num_failed"] == 1 and summary["num_succeeded"] == 1
    assert training_info(run_dir / "test_mit_lr1e+09")["status"] == "failed"
    assert "FAILED test_mit_lr1e+09" in result.stdout + result.stderr
    from ray import tune

    tries = {t.config["trial"]["name"]: t.num_failures
             for t in tune.ExperimentAnalysis(str(run_dir)).trials}
    assert tries == {"test_mit_lr1e-12": 0, "test_mit_lr1e+09": 2}  # the first try and a retry


def test_user_mistakes_about_the_run_directory_exit_2(tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _assert_one_clear_error(run_in_process(capsys, *_small(tiny_dataset, blocker / "logs")), "--log-dir")

    taken = tmp_path / "logs" / "taken"
    taken.mkdir(parents=True)
    (taken / "run_config.json").write_text("{}")
    _assert_one_clear_error(
        run_in_process(capsys, *_small(tiny_dataset, tmp_path / "logs", "--name", "taken")),
        "already holds a run", "--resume")

    _assert_one_clear_error(run_in_process(capsys, "--resume", str(tmp_path / "no_such_run"),
                                  "--no-dashboard", "--no-evaluate"),
                            "--resume", "no_such_run")


def test_help_explains_every_flag_once_under_the_name_it_was_started_by():
    import re

    result = _run("--help", timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: all_backbones.py")
    # Every option's entry has help text, and no entry states its default twice.
    entries = re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1])
    flags = [e for e in entries if e.startswith("--")]
    assert len(flags) >= 30
    for entry in flags:
        name, _, text = entry.partition(" ")
        assert re.search(r"[a-z]{3}", " ".join(text.split()[1:]) or text), f"{name} has no help"
        assert entry.count("(default") <= 1, entry
    for seed_flag, default in (("--epochs", "30"), ("--batch-size", "2"), ("--lr", "0.005"),
                               ("--lr-step-size", "10"), ("--lr-gamma", "0.1"),
                               ("--num-workers", "4")):
        entry = next(e for e in flags if e.startswith(seed_flag + " "))
        assert f"(default: {default})" in " ".join(entry.split()), entry
    from crossdet_ray.cli import build_parser

    assert build_parser("crossdet-ray").format_usage().startswith("usage: crossdet-ray")


@pytest.mark.parametrize("flags, fragment", [
    (("--gpus-per-trial", "banana"), "--gpus-per-trial"),
    (("--workers-per-trial", "two"), "--workers-per-trial"),
    (("--plan-only", "--plan-for", "eightx80"), "--plan-for"),
])
def test_flag_values_are_refused_before_any_data_is_generated(tmp_path, monkeypatch, capsys,
                                                             flags, fragment):
    cache = tmp_path / "home"
    monkeypatch.setenv("HOME", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / ".cache"))
    monkeypatch.delenv("CROSSDET_CACHE", raising=False)
    result = run_in_process(capsys, "--synthetic-images", "8", "--synthetic-frame-size", "64",
                   "--log-dir", str(tmp_path / "logs"), *flags)
    _assert_one_clear_error(result, fragment)
    assert "generating" not in result.stderr
    assert not any(cache.rglob("*.npy")), "the synthetic dataset was generated first"
