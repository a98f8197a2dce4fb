"""The run's control actor: the mailbox between the driver and its trials (see run_control.py).

Its own module, importing only Ray, because the actor's worker process imports the module the
class is defined in: Ray Tune's import (pandas and all) would cost that process over a second
of CPU while the trials start.
"""

from __future__ import annotations

import ray


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
