"""Failures said plainly: the classifier on Ray's and torch's own errors, the summary of an
errored trial, and the out-of-memory retry policy (no Ray cluster needed)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.exceptions import ActorDiedError, OutOfMemoryError, RayTaskError

from crossdet_ray.engine.errors import DiskFullError
from crossdet_ray.engine.storage import RunStorage
from crossdet_ray.tune.failures import (
    FAILURES_FILE,
    FailureRecorder,
    OutOfMemoryNotRetried,
    _driver_run,
    TrialVerdict,
    classify_failure,
    headline,
    last_failure_text,
    record_trial_failure,
    refuse_hopeless_memory_retry,
)
from crossdet_ray.tune.launcher import RunOutcome
from crossdet_ray.tune.summary import format_table, run_exit_code, summarise_run

from .helpers import training_info

TRAIN = {"batch_size": 2, "min_size": 64, "max_size": 64, "activation_checkpointing": "auto"}

# Ray 2.60's memory monitor, as measured here (RAY_memory_usage_threshold=0.04), shortened.
RAY_OOM_MESSAGE = (
    "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: "
    "192.0.2.2, ID: ed368e97) was 1.35GB used / 23.54GB limit (0.057283)\n"
    "OOM kill reason: Memory usage 1443717120B exceeded threshold of 1011060032B (4.0% of "
    "25276502016B limit)\nRay killed 1 worker(s) based on the killing policy")
# A trial actor killed with SIGKILL (the kernel's OOM killer looks the same), as measured.
SIGKILL_TEXT = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\n"
    "\tpid: 4822\nThe actor is dead because its worker process has died. Worker exit type: "
    "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code "
    "2. End of file. Some common causes include: (1) the process was killed by the OOM killer "
    "due to high memory usage, (2) ray stop --force was called, or (3) the worker crashed "
    "unexpectedly due to SIGSEGV or another unexpected error.")


def _task_error(cause: Exception) -> RayTaskError:
    """What Tune gets when the trainable raises `cause`."""
    try:
        raise cause
    except Exception as error:
        task_error = RayTaskError("train", traceback.format_exc(), error,
                                  proctitle="ray::ImplicitFunc.train", pid=1, ip="127.0.0.1")
    return task_error.as_instanceof_cause()


def _tune_error_file(*failures: str) -> str:
    return "".join(f"Failure # {i} (occurred at 2026-11-25_03-17-0{i})\n{text}\n"
                   for i, text in enumerate(failures, 1))


# -- the classifier ----------------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    OutOfMemoryError(RAY_OOM_MESSAGE),
    _tune_error_file(RAY_OOM_MESSAGE),
    "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.",
])
def test_rays_memory_monitor_is_out_of_memory(error):
    failure = classify_failure(error, train=TRAIN)
    assert failure.kind == "out_of_memory"
    assert failure.reason == "out of memory (Ray's memory monitor killed the trial)"
    assert failure.advice == (
        "try --batch-size 1, a larger --gpus-per-trial share (fewer trials per GPU; "
        "--cpus-per-trial on CPUs), --activation-checkpointing on, or a smaller "
        "--min-size/--max-size (now 64/64)")


@pytest.mark.parametrize("error", [
    _task_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB\nTraceback ...",
])
def test_gpu_out_of_memory(error):
    failure = classify_failure(error, train=TRAIN)
    assert (failure.kind, failure.reason) == ("out_of_memory",
                                              "out of memory (the GPU ran out of memory)")
    assert "--batch-size 1" in failure.advice and "--gpus-per-trial" in failure.advice


@pytest.mark.parametrize("error", [
    MemoryError(),
    _task_error(RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: "
                             "can't allocate memory: you tried to allocate 8589934592 bytes.")),
])
def test_host_out_of_memory(error):
    failure = classify_failure(error)
    assert (failure.kind, failure.reason) == (
        "out_of_memory", "out of memory (the trial could not allocate host memory)")


def test_advice_leaves_out_what_is_already_done():
    advice = classify_failure(MemoryError(), train={
        "batch_size": 1, "min_size": 160, "max_size": 267,
        "activation_checkpointing": "on"}).advice
    assert advice == ("try a larger --gpus-per-trial share (fewer trials per GPU; "
                      "--cpus-per-trial on CPUs), or a smaller --min-size/--max-size "
                      "(now 160/267)")


@pytest.mark.parametrize("error", [ActorDiedError(), SIGKILL_TEXT, _tune_error_file(SIGKILL_TEXT)])
def test_a_killed_process_is_killed_not_out_of_memory(error):
    # Ray cannot tell the kernel's OOM killer from any other SIGKILL or a crash.
    failure = classify_failure(error, train=TRAIN)
    assert failure.kind == "killed"
    assert failure.reason == ("the trial's process died abruptly (killed, e.g. by the kernel's "
                              "out-of-memory killer, or crashed)")
    assert failure.advice.startswith("if `dmesg` on its node shows an out-of-memory kill, try ")


def test_disk_full_keeps_its_own_message():
    message = ("disk full: could not write /runs/r/mit_b0/checkpoints/epoch_002.pth (120.0 MB) "
               "on /runs: 3.0 MB free; free space there, then --resume")
    for error in (DiskFullError(message, "/runs/x", 1, 2), _task_error(DiskFullError(
            message, "/runs/x", 1, 2)), f"DiskFullError: {message}\nTraceback ..."):
        failure = classify_failure(error)
        assert (failure.kind, failure.reason, failure.advice) == ("disk_full", message, None)


def test_any_other_error_is_its_exception_line():
    failure = classify_failure(_task_error(ValueError("loss is nan at epoch 1")))
    assert failure.kind == "error"
    assert failure.reason == "ValueError: loss is nan at epoch 1"
    assert failure.advice is None
    assert classify_failure("ValueError: loss is nan\nTraceback").reason == "ValueError: loss is nan"


def test_the_most_specific_reading_wins_and_the_last_failure_counts():
    # The trial's own record says little; Tune's error says memory.
    assert classify_failure("RuntimeError: worker gone", OutOfMemoryError(RAY_OOM_MESSAGE)
                            ).kind == "out_of_memory"
    # Tune's error file keeps every failure; the last one is the trial's end.
    text = _tune_error_file(RAY_OOM_MESSAGE, "ValueError: bad config")
    assert last_failure_text(text) == "ValueError: bad config"
    assert classify_failure(text).kind == "error"
    assert classify_failure(None).reason == "Tune ended the trial in ERROR and recorded no error"


def test_headline_is_the_exception_line_of_a_ray_task_error():
    error = _task_error(ValueError("loss is nan at epoch 1"))
    assert headline(str(error)) == "ValueError: loss is nan at epoch 1"
    assert headline("NonFiniteLossError: epoch 1\nmore") == "NonFiniteLossError: epoch 1"


# -- recording and the summary -----------------------------------------------------------------
def _run_dir(tmp_path: Path, trials: list[str], scheduler: str = "fifo") -> RunStorage:
    run = tmp_path / "run"
    run.mkdir()
    specs = [{"name": t, "backbone": t, "lr": 0.005} for t in trials]
    (run / "run_config.json").write_text(json.dumps({"trials": specs, "scheduler": scheduler}))
    return RunStorage.from_uri(str(run))


def _completed(run_storage: RunStorage, name: str) -> None:
    trial = run_storage.child(name)
    trial.write_text("logs/training_info.json", json.dumps({
        "backbone": name, "status": "completed", "model_parameters": 1000, "best_epoch": 1,
        "best_loss": 1.5}))
    trial.write_text("logs/epoch_metrics.csv",
                     "epoch,avg_loss,epoch_time_sec,images_per_sec,map,map50,map75\n"
                     "1,1.5,2.0,4.0,0.1,0.2,0.05\n")


def _result(name: str, error) -> SimpleNamespace:
    """The two things the summary reads of a ray.tune.Result."""
    return SimpleNamespace(config={"trial": {"name": name}}, error=error)


def _config(scheduler: str = "fifo") -> dict:
    return {"train": TRAIN, "scheduler": scheduler, "lr_grid": []}


def test_a_trial_killed_before_it_started_is_failed_with_its_reason(tmp_path):
    run_storage = _run_dir(tmp_path, ["mit_b0", "mit_b1"])
    _completed(run_storage, "mit_b1")
    tune_text = _tune_error_file(RAY_OOM_MESSAGE)
    run_storage.child("mit_b0").write_text("error.txt", tune_text)  # Tune's own error file

    summary = summarise_run(run_storage, _config(), [_result("mit_b0", tune_text),
                                                     _result("mit_b1", None)], 3.0)

    rows = {r["trial"]: r for r in summary["results"]}
    assert rows["mit_b0"]["status"] == "failed"
    assert rows["mit_b0"]["failure_kind"] == "out_of_memory"
    assert rows["mit_b0"]["failure_reason"] == "out of memory (Ray's memory monitor killed the trial)"
    assert rows["mit_b0"]["error"] == RAY_OOM_MESSAGE.splitlines()[0]
    assert rows["mit_b1"]["status"] == "completed" and rows["mit_b1"]["failure_kind"] is None
    assert (summary["num_trials"], summary["num_succeeded"], summary["num_failed"]) == (2, 1, 1)
    assert summary["interrupted"] is False and summary["run_error"] is None
    assert run_exit_code(summary) == 1
    outcome = RunOutcome(run_dir=run_storage.uri(), summary=summary, interrupted=False,
                         dashboard_url=None)
    assert outcome.exit_code == 1

    trial_dir = Path(run_storage.root) / "mit_b0"
    assert (trial_dir / "logs" / "error.txt").read_text() == tune_text
    info = training_info(trial_dir)
    assert info["status"] == "failed" and info["failure_kind"] == "out_of_memory"
    assert info["error"] == RAY_OOM_MESSAGE
    assert info["advice"].startswith("try --batch-size 1, ")
    saved = json.loads((Path(run_storage.root) / "final_summary.json").read_text())
    assert saved["num_failed"] == 1 and saved["results"][0]["failure_kind"] == "out_of_memory"
    table = format_table(summary)
    assert "1 of 2 trials succeeded, 1 failed" in table
    assert ("FAILED mit_b0: out of memory (Ray's memory monitor killed the trial) \u2014 try "
            "--batch-size 1, ") in table


def test_a_trial_killed_mid_run_keeps_its_epochs_and_is_failed(tmp_path):
    run_storage = _run_dir(tmp_path, ["mit_b5"])
    trial = run_storage.child("mit_b5")
    trial.write_text("logs/training_info.json", json.dumps({
        "backbone": "mit_b5", "status": "running", "best_epoch": 1, "best_loss": 2.0}))
    trial.write_text("logs/epoch_metrics.csv", "epoch,avg_loss,epoch_time_sec,images_per_sec\n"
                                               "1,2.0,60.0,1.0\n")
    summary = summarise_run(run_storage, _config(), [_result("mit_b5", ActorDiedError())], 70.0)
    row = summary["results"][0]
    assert (row["status"], row["failure_kind"], row["epochs_completed"]) == ("failed", "killed", 1)
    info = training_info(Path(trial.root))
    assert (info["status"], info["best_epoch"]) == ("failed", 1)  # what it had written stays
    assert info["error"] == "ActorDiedError: The actor died unexpectedly before finishing this task."
    assert run_exit_code(summary) == 1


def test_a_failed_record_keeps_its_error_and_gains_the_reading(tmp_path):
    run_storage = _run_dir(tmp_path, ["mit_b0"])
    trial = run_storage.child("mit_b0")
    own = "OutOfMemoryError: CUDA out of memory. Tried to allocate 20 MiB\nTraceback ..."
    trial.write_text("logs/training_info.json", json.dumps({"status": "failed", "error": own}))
    failure = record_trial_failure(trial, {"name": "mit_b0", "backbone": "mit_b0", "lr": 0.005},
                                   TrialVerdict("ERROR", _task_error(torch.OutOfMemoryError(
                                       "CUDA out of memory")), None), TRAIN)
    info = training_info(Path(trial.root))
    assert info["error"] == own and info["failure_kind"] == failure.kind == "out_of_memory"
    assert info["failure_reason"] == "out of memory (the GPU ran out of memory)"


def test_the_summary_is_written_when_tune_itself_failed(tmp_path):
    run_storage = _run_dir(tmp_path, ["mit_b0"])
    summary = summarise_run(run_storage, _config(), None, 1.0,
                            run_error=RuntimeError("Tune's driver loop failed\ndetails"))
    saved = json.loads((Path(run_storage.root) / "final_summary.json").read_text())
    assert saved["run_error"] == "RuntimeError: Tune's driver loop failed"
    assert saved["results"][0]["status"] == "not_started"
    assert run_exit_code(summary) == 1
    assert "RUN FAILED: RuntimeError: Tune's driver loop failed" in format_table(summary)


def test_the_summary_is_written_without_run_config(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    summary = summarise_run(RunStorage.from_uri(str(run)), _config(), None, 0.5)
    assert (run / "final_summary.json").is_file() and summary["results"] == []


@pytest.mark.parametrize("scheduler, interrupted, code", [
    ("asha", False, 0), ("fifo", False, 1), ("asha", True, 130)])
def test_exit_codes(scheduler, interrupted, code):
    summary = {"run_config": {"scheduler": scheduler}, "interrupted": interrupted,
               "run_error": None,
               "results": [{"status": "completed"}, {"status": "stopped"}]}
    assert run_exit_code(summary) == code


def test_a_run_error_is_exit_1_even_when_trials_were_left_unfinished():
    summary = {"run_config": {}, "interrupted": True, "run_error": "TuneError: x",
               "results": [{"status": "interrupted"}]}
    assert run_exit_code(summary) == 1


# -- the out-of-memory retry policy ------------------------------------------------------------
class FakeTrial:
    """What FailureRecorder reads of a ray.tune.experiment.Trial."""

    def __init__(self, name: str, status: str, error_file: Path | None = None,
                 node_ip: str = "10.0.0.1"):
        self.config = {"trial": {"name": name, "backbone": name, "lr": 0.005}}
        self.status, self.error_file, self.node_ip = status, str(error_file), node_ip

    def get_error(self):
        return None


def _failures(run_storage: RunStorage, name: str) -> list[dict]:
    return json.loads(run_storage.child(name).read_text(FAILURES_FILE))


def test_recorder_notes_who_ran_beside_an_out_of_memory_kill(tmp_path):
    run_storage = _run_dir(tmp_path, ["a", "b", "c", "d"])
    error_file = tmp_path / "a_error.txt"
    error_file.write_text(_tune_error_file(RAY_OOM_MESSAGE))
    a, b = FakeTrial("a", "PENDING", error_file), FakeTrial("b", "RUNNING")
    c = FakeTrial("c", "RUNNING", node_ip="10.0.0.2")  # another node: its memory is not ours
    d = FakeTrial("d", "PENDING")  # not started: it holds no memory
    recorder = FailureRecorder(run_storage, TRAIN)

    recorder.on_trial_recover(1, [a, b, c, d], a)

    [record] = _failures(run_storage, "a")
    assert record["failure_kind"] == "out_of_memory" and record["final"] is False
    assert record["running_alongside"] == ["b"]
    assert record["failed_together"] == [] and record["not_retried"] is False
    assert not run_storage.child("a").exists("logs/training_info.json")  # it will be retried

    # b dies in the same shortage, for good: noted, and its files say so at once.
    b.status, b.error_file = "ERROR", str(error_file)
    recorder.on_trial_error(2, [a, b, c, d], b)
    [record] = _failures(run_storage, "b")
    assert record["failed_together"] == ["a"] and record["final"] is True
    info = training_info(Path(run_storage.root) / "b")
    assert (info["status"], info["failure_kind"]) == ("failed", "out_of_memory")


def _note(run_storage: RunStorage, name: str, **record) -> None:
    entry = {"driver_run": _driver_run(), "failure_kind": "out_of_memory", "running_alongside": [],
             "failed_together": [], "not_retried": False, **record}
    run_storage.child(name).write_text(FAILURES_FILE, json.dumps([entry]))


def test_no_retry_after_running_out_of_memory_alone(tmp_path):
    run_storage = _run_dir(tmp_path, ["a"])
    _note(run_storage, "a")
    forbidden = []
    with pytest.raises(OutOfMemoryNotRetried, match="no other trial ran beside it"):
        refuse_hopeless_memory_retry(run_storage.child("a"), forbid_retry=lambda: forbidden.append(1))
    assert forbidden == [1]
    # ... and the reading of that error says so.
    error = _task_error(OutOfMemoryNotRetried("a was killed ...: not retried"))
    assert classify_failure(error).reason == ("out of memory (killed while no other trial ran "
                                              "beside it, so it was not retried)")


@pytest.mark.parametrize("record", [
    {"failure_kind": "error"},  # not memory: Tune's usual retry
    {"driver_run": "01000000/another-driver"},  # an earlier driver's failure: --resume
    {"failed_together": ["b"]},  # b was killed with it and waits for this one
])
def test_a_retry_goes_ahead_at_once(tmp_path, record):
    run_storage = _run_dir(tmp_path, ["a"])
    _note(run_storage, "a", **record)
    refuse_hopeless_memory_retry(run_storage.child("a"), forbid_retry=pytest.fail)


def test_a_first_start_goes_ahead(tmp_path):
    refuse_hopeless_memory_retry(_run_dir(tmp_path, ["a"]).child("a"), forbid_retry=pytest.fail)


def test_a_retry_after_a_kill_beside_other_trials_goes_ahead_at_once(tmp_path):
    """Killed while b ran beside it: b's memory may be freed by the time Ray starts the retry,
    so it is retried (no wait, no refusal; memory is not a resource Ray counts)."""
    run_storage = _run_dir(tmp_path, ["a", "b"])
    _note(run_storage, "a", running_alongside=["b"])
    run_storage.child("b").write_text("logs/training_info.json", json.dumps({"status": "running"}))
    refuse_hopeless_memory_retry(run_storage.child("a"), forbid_retry=pytest.fail)
