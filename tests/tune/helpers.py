"""Reading a run directory back, as a user would: CSVs, JSON, the seed's layout; and running
the command as a user would, in a session of its own so that none of its processes outlives
the test."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]


def epoch_rows(trial_dir: Path) -> list[dict[str, str]]:
    with open(trial_dir / "logs" / "epoch_metrics.csv") as handle:
        return list(csv.DictReader(handle))


def batch_rows(trial_dir: Path) -> list[dict[str, str]]:
    with open(trial_dir / "logs" / "batch_metrics.csv") as handle:
        return list(csv.DictReader(handle))


def training_info(trial_dir: Path) -> dict:
    return json.loads((trial_dir / "logs" / "training_info.json").read_text())


def windows(run_dir: Path, trials: list[str]) -> list[tuple[float, float]]:
    """(start, end) of each trial's training, from its own training_info.json."""
    spans = []
    for trial in trials:
        info = training_info(run_dir / trial)
        spans.append((info["train_started_at"], info["train_finished_at"]))
    return spans


def max_concurrency(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda item: (item[0], item[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def assert_epochs_once(trial_dir: Path, epochs: int) -> None:
    assert [int(r["epoch"]) for r in epoch_rows(trial_dir)] == list(range(1, epochs + 1))
    batches = [(int(r["epoch"]), int(r["batch"])) for r in batch_rows(trial_dir)]
    assert len(batches) == len(set(batches)), "a batch row is duplicated"
    assert sorted({e for e, _ in batches}) == list(range(1, epochs + 1))


def assert_trained(trial_dir: Path) -> None:
    """The trial really trained: its loss moved between its first and last epochs (or, with
    one epoch, between its batches), so that equal-file checks never compare empty results."""
    losses = [float(r["avg_loss"]) for r in epoch_rows(trial_dir)]
    assert losses, f"{trial_dir.name} logged no epoch"
    if len(losses) == 1:
        losses = [float(r["loss"]) for r in batch_rows(trial_dir)]
    assert len(set(losses)) > 1, f"{trial_dir.name}: the loss never moved: {losses}"


# Reading files another process is writing: not there yet, or not yet holding the key.
READ_RACES = (FileNotFoundError, KeyError, json.JSONDecodeError)


def poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05,
               process: subprocess.Popen | None = None) -> bool:
    """True once `condition()` holds; False if `timeout` seconds pass or `process` ends first.

    A condition that raises one of READ_RACES counts as not yet true.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return True
        except READ_RACES:
            pass
        if process is not None and process.poll() is not None:
            return False
        time.sleep(interval)
    return False


def logged_epochs(trial_dir: Path) -> list[int]:
    return [int(r["epoch"]) for r in epoch_rows(trial_dir)]


def announced_epoch(run_dir: Path, trial_name: str) -> int:
    """The epoch of the newest checkpoint Tune's saved experiment state holds for a trial
    (0: none), i.e. what a `--resume` hands the restarted trial besides its own logs."""
    from ray import tune

    from crossdet_ray.tune.reporter import read_checkpoint_pointer

    for trial in tune.ExperimentAnalysis(str(run_dir)).trials:
        if trial.config["trial"]["name"] == trial_name:
            if trial.checkpoint is None:
                return 0
            return int(read_checkpoint_pointer(trial.checkpoint)["epoch"])
    raise KeyError(trial_name)


# -- the command in a subprocess -----------------------------------------------------------------
def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "all_backbones.py"), *args]


def ray_env() -> dict[str, str]:
    """The test's own local Ray, never a cluster a developer's RAY_ADDRESS names."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def small_run(tiny_dataset: str, log_dir: Path, name: str, epochs: int, *extra: str,
              address: str | None = "local") -> tuple[str, ...]:
    """One test_mit trial at 64 px on one CPU, quiet: a few seconds per epoch here. In a Ray
    of its own (`--address local`) unless `address` says otherwise (None: the default, which
    joins a cluster running on this machine)."""
    return ("--data", tiny_dataset, "--backbones", "test_mit", "--min-size", "64",
            "--max-size", "64", "--num-workers", "0", "--log-dir", str(log_dir), "--name", name,
            "--no-dashboard", "--no-evaluate", "--verbose", "0", "--gpus-per-trial", "0",
            "--cpus-per-trial", "1", *(("--address", address) if address else ()),
            "--epochs", str(epochs), *extra)


def session_processes(session_id: int) -> list[int]:
    """Live (not zombie) processes of a session: a command started with start_new_session and
    every Ray process it started, which keep its session even where they change group."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        state, session = fields[0], int(fields[3])
        if session == session_id and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def process_ended(pid: int) -> bool:
    """True once `pid` is gone or a zombie: a killed process that can write nothing more."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_session(session_id: int, timeout: float = 60) -> bool:
    """SIGKILL every process of the session; True once none is left."""
    for pid in session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return poll_until(lambda: not session_processes(session_id), timeout=timeout)


@dataclass
class Command:
    """The command running in its own session; its output goes to files (a pipe would be
    held open by Ray processes that outlive a killed driver, and could fill up)."""

    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float) -> int:
        """The exit code; on a timeout the whole session is killed and TimeoutExpired raised."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """End the command and every process it started (safe to call when all have ended)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        kill_session(self.pid)


def start(args: tuple[str, ...] | list[str], output_dir: Path, label: str,
          env: dict[str, str] | None = None, own_ray: bool = True) -> Command:
    """The command in a session of its own; `env` defaults to ray_env(). In a Ray of its own
    (`--address local`, added where `args` name no address) unless `own_ray` is False: the
    command's default joins a cluster `ray start` runs on this machine."""
    if own_ray and "--address" not in args:
        args = (*args, "--address", "local")
    output_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = output_dir / f"{label}.out", output_dir / f"{label}.err"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command(*args), stdout=stdout, stderr=stderr, text=True,
                                   cwd=ROOT, env=env or ray_env(), start_new_session=True)
    return Command(process, stdout_path, stderr_path)


def run(args: tuple[str, ...] | list[str], output_dir: Path, label: str,
        timeout: float = 300, env: dict[str, str] | None = None,
        own_ray: bool = True) -> Command:
    """Run the command to its end (see `start`); whatever it leaves running is killed."""
    running = start(args, output_dir, label, env, own_ray)
    try:
        running.wait(timeout)
    finally:
        running.kill()
    return running


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`cli.main` in this process, as the script would run it: its exit code and output. For
    mistakes found before any Ray starts, where the process boundary is not what is tested."""
    from crossdet_ray import cli

    try:
        code = cli.main(list(args))
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def signal_once_logged(driver: "Command", logged: Callable[[], int], epochs: int,
                       signum: int = signal.SIGINT, timeout: float = 240) -> None:
    """Send `signum` to the driver once `logged()` epochs reach `epochs`; fail if it ends first.

    The log row is the trigger: it promises its epoch is safe, so no later wait is needed.
    """
    import pytest

    if not poll_until(lambda: logged() >= epochs, timeout=timeout, process=driver.process):
        pytest.fail(f"the run ended before epoch {epochs} was logged: {driver.stderr[-3000:]}")
    os.kill(driver.pid, signum)
