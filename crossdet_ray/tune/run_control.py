"""Talking to running trials: Ctrl-C that lets checkpoints land, and failures not worth retrying.

Ray Tune's own Ctrl-C handling stops every trial actor at once, cutting short a checkpoint
being written, and it retries every failed trial up to `--max-failures`. Two things need more:

* **Ctrl-C once**: every trial finishes and announces the checkpoint it is writing (its epoch
  row then appears), accepts no further epoch, and says so; only then does Tune stop the run.
  **Ctrl-C twice** stops at once. Either way `--resume` continues after the last logged epoch.
* **No retry** for a failure that a restart cannot fix (a full disk): the trial asks, the
  driver sets that trial's retry budget to zero before the trial raises.

The messages go through one small named actor per run (`RunControl`), which the driver owns:
it dies with the driver, and a resumed run makes a new one under the same name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import ray
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from crossdet_ray.tune.ray_compat import (set_trial_retries, stop_tune_gracefully,
                                          tune_sigint_handler_disabled)

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a trial asks whether a stop was requested
DRAIN_TIMEOUT_SECONDS = float(os.environ.get("CROSSDET_DRAIN_TIMEOUT_S", 900))
NO_RETRY_WAIT_SECONDS = 30.0


@ray.remote(num_cpus=0)
class RunControl:
    """The run's mailbox between the driver and its trials."""

    def __init__(self) -> None:
        self._stop_requested = False
        self._drained: set[str] = set()
        self._no_retry_asked: set[str] = set()
        self._no_retry_done: set[str] = set()

    def request_stop(self) -> None:
        self._stop_requested = True

    def stop_requested(self) -> bool:
        return self._stop_requested

    def report_drained(self, trial_id: str) -> None:
        self._drained.add(trial_id)

    def drained(self) -> list[str]:
        return sorted(self._drained)

    def ask_no_retry(self, trial_id: str) -> None:
        self._no_retry_asked.add(trial_id)

    def pending_no_retry(self) -> list[str]:
        return sorted(self._no_retry_asked - self._no_retry_done)

    def confirm_no_retry(self, trial_ids: list[str]) -> None:
        self._no_retry_done.update(trial_ids)

    def no_retry_confirmed(self, trial_id: str) -> bool:
        return trial_id in self._no_retry_done


def control_actor_name(run_uri: str) -> str:
    """One name per run directory, the same for the run and its resumes."""
    return "crossdet_run_control_" + hashlib.sha1(run_uri.encode()).hexdigest()[:16]


def start_run_control(name: str):
    """The driver's control actor (a resumed run replaces the dead one of the same name).

    Pinned to the driver's node: anywhere else, losing that node would silently end Ctrl-C's
    drain and the no-retry requests for the rest of the run.
    """
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                 soft=False)
    return RunControl.options(name=name, get_if_exists=True,
                              scheduling_strategy=driver_node).remote()


# -- driver side -------------------------------------------------------------------------------
class RunControlCallback(tune.Callback):
    """Runs in Tune's driver loop: drains trials after Ctrl-C, applies no-retry requests."""

    def __init__(self, control, max_failures: int, drain_timeout: float = DRAIN_TIMEOUT_SECONDS):
        self.control = control
        self.max_failures = max_failures
        self.drain_timeout = drain_timeout
        self.drain_requested = threading.Event()  # set by the SIGINT/SIGTERM handler
        self.terminated = threading.Event()  # the stop came as SIGTERM
        self.stop_now = threading.Event()
        self._drain_started: float | None = None
        self._next_poll = 0.0
        self._stop_sent = False

    def __reduce__(self):
        # Tune pickles its RunConfig into the experiment state; this callback's actor and
        # events belong to one driver, so a restored copy is inert (a resume adds a fresh one).
        return (tune.Callback, ())

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        # A trial whose retries an earlier driver switched off gets --max-failures back on
        # --resume (Tune saves the zero with the trial).
        set_trial_retries(trial, self.max_failures)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + 0.25
        if self.stop_now.is_set():
            self.stop_run()
            return
        if self.control is None:
            if self.drain_requested.is_set():  # nobody to drain: stop as Tune would
                self.stop_run()
            return
        try:
            self._apply_no_retry(trials)
            if self.drain_requested.is_set():
                self._drain(trials, now)
        except ray.exceptions.RayError as error:
            # The control actor died (e.g. Ray's memory monitor killed it): the run goes on
            # with Tune's own behaviour, never fails because of this mailbox.
            logger.warning("run control lost (%s): Ctrl-C now stops at once and failures are "
                           "retried as Tune does", str(error).splitlines()[0][:200])
            self.control = None
            if self.drain_requested.is_set():
                self.stop_run()

    def _apply_no_retry(self, trials: list) -> None:
        pending = ray.get(self.control.pending_no_retry.remote())
        if not pending:
            return
        for trial in trials:
            if trial.trial_id in pending:
                # Tune retries while num_failures <= max_failures: 0 makes the next failure
                # final.
                set_trial_retries(trial, 0)
                logger.info("%s will not be retried: a restart cannot fix its failure", trial)
        ray.get(self.control.confirm_no_retry.remote(pending))

    def _drain(self, trials: list, now: float) -> None:
        if self._drain_started is None:
            self._drain_started = now
            ray.get(self.control.request_stop.remote())
        running = {t.trial_id for t in trials if t.status == "RUNNING"}
        drained = set(ray.get(self.control.drained.remote()))
        if running <= drained:
            logger.warning("every running trial has saved and reported its last epoch: "
                           "stopping; continue later with --resume")
            self.stop_run()
        elif now - self._drain_started > self.drain_timeout:
            logger.warning("trials %s did not finish their checkpoints within %.0f s: stopping "
                           "anyway", sorted(running - drained), self.drain_timeout)
            self.stop_run()

    def stop_run(self) -> None:
        """End Tune's loop gracefully: unfinished trials stay resumable."""
        if not self._stop_sent:
            self._stop_sent = True
            stop_tune_gracefully()


@contextmanager
def graceful_interrupt(callback: RunControlCallback) -> Iterator[None]:
    """Route Ctrl-C and SIGTERM (`ray job stop`, a scheduler's kill) to `callback` while Tune
    runs: once = drain, twice = stop, thrice = raise. `callback.terminated` records a SIGTERM,
    for the exit code (143, not Ctrl-C's 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; Tune's own then apply
        return
    presses = 0

    def on_signal(signum, frame):
        nonlocal presses
        presses += 1
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if signum == signal.SIGTERM:
            callback.terminated.set()
        if presses == 1:
            logger.warning("%s: letting every trial finish and report the checkpoint it is "
                           "writing, then stopping (%s again to stop at once)", name, name)
            callback.drain_requested.set()
        elif presses == 2:
            logger.warning("%s again: stopping now; --resume continues after each "
                           "trial's last logged epoch", name)
            callback.stop_now.set()
            stop_tune_gracefully()
        else:
            raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, on_signal)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tune_sigint_handler_disabled():  # keep Tune from replacing ours
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- trial side --------------------------------------------------------------------------------
class TrialControl:
    """A trial's end of the mailbox; every call degrades to a no-op without the actor."""

    def __init__(self, name: str | None, trial_id: str):
        self.trial_id = trial_id
        self.control = None
        if name:
            try:
                self.control = ray.get_actor(name)
            except ValueError:
                logger.warning("run control %s not found: Ctrl-C will not wait for this "
                               "trial's checkpoint", name)

    def watch_for_stop(self, on_stop: Callable[[], None]) -> None:
        """Call `on_stop` (on a daemon thread) once the driver asks trials to stop, then report
        this trial drained."""
        if self.control is None:
            return

        def watch() -> None:
            while not (asked := self._ask_stop_requested()):
                if asked is None:
                    return  # the driver is gone; Tune's own shutdown takes over
                time.sleep(POLL_SECONDS)
            try:
                on_stop()
            finally:
                ray.get(self.control.report_drained.remote(self.trial_id))

        threading.Thread(target=watch, name="stop-watcher", daemon=True).start()

    def stop_requested(self) -> bool:
        """Whether the driver asked the trials to stop (False without the actor)."""
        return self.control is not None and bool(self._ask_stop_requested())

    def _ask_stop_requested(self) -> bool | None:
        """The driver's answer; None when its control actor is gone."""
        try:
            return bool(ray.get(self.control.stop_requested.remote()))
        except ray.exceptions.RayError:
            return None

    def forbid_retry(self, timeout: float = NO_RETRY_WAIT_SECONDS) -> bool:
        """Ask the driver not to restart this trial when it fails next; True once confirmed."""
        if self.control is None:
            return False
        ray.get(self.control.ask_no_retry.remote(self.trial_id))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ray.get(self.control.no_retry_confirmed.remote(self.trial_id)):
                return True
            time.sleep(0.1)
        return False
