"""Why a trial failed, said plainly, and recorded in the trial's own files.

Three parts:

* `classify_failure`: Tune's error (an exception, read by its type where Ray and torch give
  one, or else the text of Tune's error file) -> a `Failure` (kind, one-line reason, advice).
  Out of memory is named as such whether Ray's memory monitor, CUDA or the host allocator
  reported it.
* `tune_verdicts` / `record_trial_failure`: after `tuner.fit()`, every trial Tune ended in
  ERROR gets Tune's full error text in `logs/error.txt` and a `training_info.json` that says
  `failed` (a trial killed before or while training never wrote that itself).
* The out-of-memory retry policy: `FailureRecorder` (a Tune callback, driver side) notes each
  failure with the trials that were running beside it, and `refuse_hopeless_memory_retry`
  (called by the trainable as it starts) refuses a retry when the trial was killed while
  running alone: it would be killed again.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import ray
from ray import tune

from crossdet_ray.run_files import ERROR_FILE, FAILURES_FILE, INFO_FILE
from crossdet_ray.engine.json_files import dumps_json
from crossdet_ray.engine.storage import RunStorage

logger = logging.getLogger(__name__)

OUT_OF_MEMORY = "out_of_memory"
KILLED = "killed"
DISK_FULL = "disk_full"
ERROR = "error"

TUNE_ERROR_FILE = "error.txt"  # Tune's own, in the trial directory

# Tune's error file holds every failure of a trial, each headed like this.
FAILURE_HEADER = re.compile(r"^Failure # \d+ \(occurred at [^)]*\)\n", re.MULTILINE)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# What Ray 2.60 and torch print (read from ray/exceptions.py, the raylet's messages, and
# measured): Ray's memory monitor, GPU memory, host memory, a process killed from outside.
RAY_MEMORY_MONITOR = re.compile(
    r"running low on memory|ray\.exceptions\.OutOfMemoryError|OutOfMemoryError: \d+ worker")
GPU_MEMORY = re.compile(r"CUDA out of memory|HIP out of memory|CUDA error: out of memory|"
                        r"CUBLAS_STATUS_ALLOC_FAILED")
HOST_MEMORY = re.compile(r"\bMemoryError\b|DefaultCPUAllocator: can't allocate memory|"
                         r"Cannot allocate memory|\[Errno 12\]|std::bad_alloc")
PROCESS_KILLED = re.compile(
    r"Worker unexpectedly exits|The actor died unexpectedly|worker died unexpectedly|"
    r"killed by the OOM killer|SIGKILL|exit code -9|signal 9|WorkerCrashedError")
DISK_FULL_TEXT = re.compile(r"\bdisk full\b|DiskFullError|No space left on device|\[Errno 28\]")
NOT_RETRIED_MARK = "OutOfMemoryNotRetried"
RAY_TASK_HEADER = re.compile(r"ray::\S+ \(pid=|^RayTaskError\(")


@dataclass(frozen=True)
class Failure:
    kind: str  # out_of_memory, killed, disk_full, or error
    reason: str  # one line: what happened
    advice: str | None = None  # one line: what to change

    @property
    def is_out_of_memory(self) -> bool:
        return self.kind == OUT_OF_MEMORY

    def as_info(self) -> dict[str, Any]:
        return {"failure_kind": self.kind, "failure_reason": self.reason, "advice": self.advice}


class OutOfMemoryNotRetried(MemoryError):
    """Raised by a retry that would be killed for memory again (see the module docstring)."""


def oom_advice(train: dict[str, Any] | None = None) -> str:
    """What lowers a trial's memory need, with this run's values where they are known."""
    train = train or {}
    batch_size = train.get("batch_size")
    parts = []
    if not batch_size or batch_size > 1:
        parts.append(f"--batch-size {batch_size // 2}" if batch_size else "a smaller --batch-size")
    parts.append("a larger --gpus-per-trial share (fewer trials per GPU; --cpus-per-trial on "
                 "CPUs)")
    if train.get("activation_checkpointing") != "on":
        parts.append("--activation-checkpointing on")
    sizes = (f" (now {train['min_size']}/{train['max_size']})"
             if train.get("min_size") and train.get("max_size") else "")
    parts.append(f"a smaller --min-size/--max-size{sizes}")
    return "try " + ", ".join(parts[:-1]) + ", or " + parts[-1]


def last_failure_text(text: str) -> str:
    """The last failure in the text of Tune's error file (the whole text when it has none)."""
    text = ANSI_ESCAPE.sub("", text)
    headers = list(FAILURE_HEADER.finditer(text))
    return text[headers[-1].end():].strip() if headers else text.strip()


def first_line(text: str | None) -> str | None:
    if not text:
        return None
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return None


def headline(text: str | None) -> str | None:
    """One line for a table: the first line, or for Ray's task errors (which start with
    `ray::ImplicitFunc.train() (pid=...)`) the exception line after the traceback."""
    if not text:
        return None
    lines = [line for line in ANSI_ESCAPE.sub("", str(text)).splitlines() if line.strip()]
    if not lines:
        return None
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if frames and RAY_TASK_HEADER.search(lines[0]):
        for line in lines[frames[-1] + 1:]:
            if not line[0].isspace():
                return line.strip()
    return lines[0].strip()


def error_text(error: BaseException | str | None) -> str:
    """An exception as `Type: message` (what the trial's own record writes), or the text."""
    if error is None:
        return ""
    if isinstance(error, str):
        return last_failure_text(error)
    return ANSI_ESCAPE.sub("", f"{type(error).__name__}: {error}")


def _exception_chain(error: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        # RayTaskError keeps the trainable's exception as `cause`.
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__


def _classify_one(error: BaseException | str | None,
                  train: dict[str, Any] | None) -> Failure | None:
    if error is None or error == "":
        return None
    text = error_text(error)
    if isinstance(error, BaseException):
        for link in _exception_chain(error):
            name = type(link).__name__
            module = type(link).__module__
            if isinstance(link, OutOfMemoryNotRetried) or name == NOT_RETRIED_MARK:
                return _not_retried(train)
            if isinstance(link, ray.exceptions.OutOfMemoryError) or (
                    module.startswith("ray") and name == "OutOfMemoryError"):  # another Ray's
                return _memory_monitor(train)
            if name == "OutOfMemoryError" or GPU_MEMORY.search(str(link)):
                return _gpu_memory(train)  # torch.OutOfMemoryError is CUDA's (and HIP's)
            if name == "DiskFullError" or getattr(link, "errno", None) == 28:
                return _disk_full(str(link))
            if isinstance(link, MemoryError):
                return _host_memory(train)
            if isinstance(link, (ray.exceptions.ActorDiedError,
                                 ray.exceptions.WorkerCrashedError)):
                # The process is gone; whether Ray's memory monitor did it is in its message.
                return (_memory_monitor(train) if RAY_MEMORY_MONITOR.search(str(link))
                        else _killed(train))
    # Text: Tune's error.txt where no exception object is left (a trial errored under an
    # earlier driver, or pickled by another Ray), or an exception's message.
    if NOT_RETRIED_MARK in text:
        return _not_retried(train)
    if RAY_MEMORY_MONITOR.search(text):
        return _memory_monitor(train)
    if GPU_MEMORY.search(text):
        return _gpu_memory(train)
    if DISK_FULL_TEXT.search(text):
        return _disk_full(text)
    if HOST_MEMORY.search(text):
        return _host_memory(train)
    if PROCESS_KILLED.search(text):
        return _killed(train)
    return Failure(ERROR, headline(text) or "failed without an error message")


def classify_failure(*errors: BaseException | str | None,
                     train: dict[str, Any] | None = None) -> Failure:
    """The most specific account of a failure among `errors` (the trial's own record, Tune's
    exception, Tune's error text, ...): an out-of-memory, kill or full-disk reading wins over
    a plain error, which is the first error given."""
    readings = [f for f in (_classify_one(e, train) for e in errors) if f is not None]
    for reading in readings:
        if reading.kind != ERROR:
            return reading
    return readings[0] if readings else Failure(ERROR, "Tune ended the trial in ERROR and "
                                                "recorded no error")


def _memory_monitor(train):
    return Failure(OUT_OF_MEMORY, "out of memory (Ray's memory monitor killed the trial)",
                   oom_advice(train))


def _gpu_memory(train):
    return Failure(OUT_OF_MEMORY, "out of memory (the GPU ran out of memory)", oom_advice(train))


def _host_memory(train):
    return Failure(OUT_OF_MEMORY, "out of memory (the trial could not allocate host memory)",
                   oom_advice(train))


def _killed(train):
    return Failure(KILLED, "the trial's process died abruptly (killed, e.g. by the kernel's "
                   "out-of-memory killer, or crashed)",
                   "if `dmesg` on its node shows an out-of-memory kill, " + oom_advice(train))


def _not_retried(train):
    return Failure(OUT_OF_MEMORY, "out of memory (killed while no other trial ran beside it, "
                   "so it was not retried)", oom_advice(train))


def _disk_full(text):
    # Our DiskFullError's message already names the file, the space and the remedy.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((x for x in lines if "disk full" in x), lines[0] if lines else "disk full")
    line = re.sub(r"^.*?DiskFullError: ", "", line)
    return Failure(DISK_FULL, line if "disk full" in line else f"disk full: {line}",
                   None if "--resume" in line else "free space on the run directory's "
                   "storage, then --resume")


# -- Tune's verdict on each trial --------------------------------------------------------------
@dataclass
class TrialVerdict:
    """What Tune knows of one trial at the end of a run."""

    status: str | None = None  # PENDING, RUNNING, PAUSED, TERMINATED, ERROR; None: unknown
    error: BaseException | str | None = None  # the last error: the exception when pickled
    error_text: str | None = None  # Tune's error.txt: every failure, in order


UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def tune_verdicts(run_storage: RunStorage, results=None) -> dict[str, TrialVerdict]:
    """Per trial name, from Tune's saved experiment state and the ResultGrid.

    The saved state can lag: after a trial's process dies, Tune may save it as PENDING
    (measured with Ray 2.60), while the ResultGrid holds the error. A trial either says
    errored is ERROR. Never raises: a run whose Tune state cannot be read still gets a summary.
    """
    verdicts: dict[str, TrialVerdict] = {}
    try:
        analysis = tune.ExperimentAnalysis(run_storage.root,
                                           storage_filesystem=run_storage.filesystem)
        for trial in analysis.trials:
            verdict = verdicts.setdefault(trial.config["trial"]["name"], TrialVerdict())
            verdict.status = trial.status
            if trial.status == "ERROR":
                verdict.error = _quietly(trial.get_pickled_error) or _quietly(trial.get_error)
    except Exception as error:  # no state yet (stopped before any trial started), unreadable
        logger.warning("cannot read Tune's experiment state in %s: %s", run_storage.uri(),
                       first_line(str(error)))
    try:
        for result in results or []:
            name = (result.config or {}).get("trial", {}).get("name")
            if name is not None and result.error is not None:
                verdict = verdicts.setdefault(name, TrialVerdict())
                verdict.status, verdict.error = "ERROR", result.error
    except Exception as error:
        logger.warning("cannot read Tune's results: %s", first_line(str(error)))
    for name, verdict in verdicts.items():
        if verdict.status == "ERROR":
            verdict.error_text = _read_tune_error_text(run_storage.child(name))
            if verdict.error is None:
                verdict.error = verdict.error_text
    return verdicts


def _quietly(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception:  # an error pickled by another Ray or torch version
        return None


def _read_tune_error_text(trial_storage: RunStorage) -> str | None:
    try:
        if trial_storage.exists(TUNE_ERROR_FILE):
            return trial_storage.read_text(TUNE_ERROR_FILE)
    except OSError as error:
        logger.warning("cannot read %s: %s", trial_storage.uri(TUNE_ERROR_FILE), error)
    return None


def read_info(trial_storage: RunStorage) -> dict[str, Any] | None:
    """The trial's training_info.json; None when missing or unreadable."""
    try:
        if trial_storage.exists(INFO_FILE):
            return json.loads(trial_storage.read_text(INFO_FILE))
    except (OSError, ValueError) as error:
        logger.warning("cannot read %s: %s", trial_storage.uri(INFO_FILE), error)
    return None


def record_trial_failure(trial_storage: RunStorage, spec: dict[str, Any],
                         verdict: TrialVerdict, train: dict[str, Any] | None = None) -> Failure:
    """Write what Tune knows of an errored trial into its own files.

    logs/error.txt gets Tune's full error text; training_info.json, when missing or still
    `running`/`not_started` (the process was killed before it could say), becomes `failed`
    with the error and its classification. A `completed` record is left alone; a `failed`
    one keeps its error and gains the classification.
    """
    info = read_info(trial_storage) or {}
    own_error = info.get("error") if info.get("status") == "failed" else None
    failure = classify_failure(own_error, verdict.error, verdict.error_text, train=train)
    full_text = verdict.error_text or error_text(verdict.error)
    if full_text:
        trial_storage.write_text(ERROR_FILE, ANSI_ESCAPE.sub("", full_text))
    status = info.get("status", "not_started")
    if status == "completed":
        return failure
    if status in ("running", "not_started"):
        info.update({"status": "failed",
                     "error": error_text(verdict.error) or error_text(verdict.error_text)
                     or failure.reason})
    info.setdefault("backbone", spec.get("backbone"))
    info.setdefault("trial_name", spec.get("name"))
    info.setdefault("lr", spec.get("lr"))
    # A kind the trial named itself (disk_full, checkpoint) is kept.
    info.setdefault("failure_kind", failure.kind)
    info.setdefault("failure_reason", failure.reason)
    info.setdefault("advice", failure.advice)
    info["error_file"] = trial_storage.uri(ERROR_FILE) if full_text else None
    trial_storage.write_text(INFO_FILE, dumps_json(info))
    return failure


def record_failures(run_storage: RunStorage, specs: list[dict[str, Any]],
                    verdicts: dict[str, TrialVerdict],
                    train: dict[str, Any] | None = None) -> None:
    """`record_trial_failure` for every trial Tune ended in ERROR; one trial's trouble (an
    unwritable file) is logged and does not stop the others'."""
    for spec in specs:
        verdict = verdicts.get(spec["name"])
        if verdict is None or verdict.status != "ERROR":
            continue
        try:
            record_trial_failure(run_storage.child(spec["name"]), spec, verdict, train)
        except Exception:
            logger.exception("%s: could not record its failure in its files", spec["name"])


# -- out-of-memory retries ---------------------------------------------------------------------
# Ray's memory monitor may kill several workers in one sweep; failures this close together
# are one memory shortage.
SAME_SHORTAGE_SECONDS = 10.0


def _read_failures(trial_storage: RunStorage) -> list[dict[str, Any]]:
    try:
        if trial_storage.exists(FAILURES_FILE):
            records = json.loads(trial_storage.read_text(FAILURES_FILE))
            return records if isinstance(records, list) else []
    except (OSError, ValueError) as error:
        logger.warning("cannot read %s: %s", trial_storage.uri(FAILURES_FILE), error)
    return []


def _driver_run() -> str | None:
    """Which driver run this is, the same in the driver and its trials: the Ray job and its
    namespace (a fresh local Ray numbers jobs from 01000000 again; the anonymous namespace is
    new for every driver). None without Ray, which asking would start."""
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return f"{context.get_job_id()}/{context.namespace}"


class FailureRecorder(tune.Callback):
    """Tune callback (driver side): notes every failed attempt in the trial's
    logs/failures.json, with the trials that were running beside it, for the retry policy of
    `refuse_hopeless_memory_retry`; a trial's final failure is recorded in its own files at
    once (`record_trial_failure`)."""

    def __init__(self, run_storage: RunStorage, train: dict[str, Any] | None = None):
        self.run_storage = run_storage
        self.train = train
        self._recent: dict[str, float] = {}  # trial name -> when its failure was seen

    def __reduce__(self):
        # Tune pickles its RunConfig; a copy restored on --resume stays inert (the resume
        # adds a fresh recorder), so no failure is noted twice.
        return (tune.Callback, ())

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._note(trials, trial, final=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._note(trials, trial, final=True)

    def _note(self, trials: list, trial, final: bool) -> None:
        name = trial.config["trial"]["name"]
        try:
            text = _local_error_text(trial)
            failure = classify_failure(text, train=self.train)
            now = time.time()
            self._recent = {n: t for n, t in self._recent.items()
                            if now - t <= SAME_SHORTAGE_SECONDS and n != name}
            node = _node_of(trial)
            alongside = sorted(
                t.config["trial"]["name"] for t in trials
                if t is not trial and t.status == "RUNNING"
                and (node is None or _node_of(t) in (None, node)))
            record = {"driver_run": _driver_run(), "time": now, "final": final, **failure.as_info(),
                      "error": headline(last_failure_text(text)) if text else None,
                      "running_alongside": alongside,
                      "failed_together": sorted(self._recent),
                      "not_retried": NOT_RETRIED_MARK in (text or "")}
            if failure.is_out_of_memory:
                self._recent[name] = now
            trial_storage = self.run_storage.child(name)
            trial_storage.write_text(FAILURES_FILE,
                                     dumps_json(_read_failures(trial_storage) + [record]))
            if final:
                verdict = TrialVerdict("ERROR", text, text)
                record_trial_failure(trial_storage, trial.config["trial"], verdict, self.train)
        except Exception:  # the run goes on; the end-of-run summary records the failure
            logger.exception("%s: could not note its failure", name)


def _local_error_text(trial) -> str | None:
    """Tune's error file as the driver just wrote it (its copy on storage lags)."""
    try:
        with open(trial.error_file, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except Exception:  # no local copy (Ray Client), or not written: the stored copy
        return _quietly(trial.get_error)


def _node_of(trial) -> str | None:
    return _quietly(lambda: trial.node_ip) or None


def refuse_hopeless_memory_retry(trial_storage: RunStorage,
                                 forbid_retry: Callable[[], Any] | None = None) -> None:
    """Call as a trial starts: a retry after an out-of-memory kill while the trial ran alone
    would be killed again at the same point, so `forbid_retry` (no further restarts) is called
    and OutOfMemoryNotRetried raised. Any other start goes ahead at once: a first start, a
    `--resume`, a retry after another failure, and a retry after a kill while other trials ran
    beside it (Ray starts it when its CPUs and GPUs are free; memory is not a resource Ray
    counts, so it may be killed again, and that spends another of --max-failures' restarts).
    """
    records = _read_failures(trial_storage)
    if not records:
        return
    last = records[-1]
    if last.get("failure_kind") != OUT_OF_MEMORY or last.get("driver_run") != _driver_run():
        return
    name = posixpath.basename(trial_storage.root)
    alongside = list(last.get("running_alongside") or [])
    if last.get("not_retried") or (not alongside and not last.get("failed_together")):
        if forbid_retry is not None:
            forbid_retry()
        raise OutOfMemoryNotRetried(
            f"{name} was killed for lack of memory while no other trial ran beside it, so a "
            "restart would be killed again: not retried")
    logger.warning("%s: retrying after running out of memory beside %s", name,
                   ", ".join(alongside or last["failed_together"]))
