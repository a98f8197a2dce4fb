"""Trials that no node can hold: reported, and the run ended, instead of waiting for ever.

On an autoscaling cluster a trial that asks for more than any live node has waits for the
autoscaler to launch a node. When the cloud cannot (a GPU quota of zero, no capacity in the
zone, an image or instance profile that does not exist), Ray waits silently while the head
bills. A trial still pending after `--pending-timeout` seconds that no live node could ever
hold is reported (what it asks, what the cluster has and can launch, where the launch errors
are) and the run is stopped, resumable, with exit 2. A trial that only waits for a busy node
to free up is never reported: a live node can hold it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray import tune

from crossdet_ray.tune.resources import TrialResources, bundle_fits

logger = logging.getLogger(__name__)
POLL_SECONDS = 2.0  # how often the live nodes are read while a trial waits


@dataclass(frozen=True)
class UnplaceableTrial:
    """A trial that waited past the timeout for a node that never came."""

    trial: str
    asks: dict[str, float]
    waited_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "asks": self.asks, "waited_s": round(self.waited_s, 1)}


def trial_bundle(config: dict[str, Any]) -> dict[str, float]:
    """What a trial's own process asks of one node (launcher's placement group bundle)."""
    return TrialResources(**config["resources"][config["trial"]["backbone"]]).as_bundle()


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in sorted(resources.items())
                     if key in ("CPU", "GPU") or key.startswith("gpu_memory_"))


def unplaceable_message(stuck: list[UnplaceableTrial], live_nodes: list[dict[str, float]],
                        launchable: str | None, timeout_s: float, run_dir: str) -> str:
    """The report: each stuck trial's ask, the live nodes, what can be launched, what to do."""
    lines = [f"{len(stuck)} trial(s) waited more than {timeout_s:g} s for a node that can hold "
             "them, and no such node came up:"]
    lines += [f"  {t.trial} asks for {describe(t.asks)} on one node" for t in stuck]
    lines.append("  live nodes: " + ("; ".join(describe(n) or "no CPU or GPU" for n in live_nodes)
                                     or "none"))
    if launchable:
        lines.append(f"  the autoscaler can launch: {launchable}")
    lines += [
        "The autoscaler could not launch a node for them. Its errors are in `ray status` and, on "
        "the head, /tmp/ray/session_latest/logs/monitor.log (`ray monitor cluster.yaml`). The "
        "usual cause is the cloud's GPU quota (AWS: Service Quotas, \"Running On-Demand G and VT "
        "instances\", counted in vCPUs, is 0 on a new account) or no capacity in the zone; or no "
        "node type offers what the trial asks (a GPU share too small for the smaller GPUs sends "
        "it to the larger ones).",
        f"Fix that and continue with --resume {run_dir}, or pass --pending-timeout 0 to wait "
        "for nodes however long it takes."]
    return "\n".join(lines)


class PendingTrialWatch(tune.Callback):
    """In Tune's driver loop: times each pending trial, and after `timeout_s` without a live
    node that could hold it, logs the report and calls `stop` (the run's graceful stop)."""

    def __init__(self, timeout_s: float, stop: Callable[[], None], run_dir: str,
                 launchable: str | None = None):
        self.timeout_s = timeout_s
        self.stop = stop
        self.run_dir = run_dir
        self.launchable = launchable
        self.stuck: list[UnplaceableTrial] = []
        self.message: str | None = None
        self._pending_since: dict[str, float] = {}
        self._next_poll = 0.0

    def __reduce__(self):
        # Tune pickles its RunConfig into the experiment state: the restored copy is inert
        # (a resumed run adds a fresh watch).
        return (tune.Callback, ())

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.timeout_s > 0 or self.message is not None:
            return
        now = time.monotonic()
        pending = {t.trial_id: t for t in trials if t.status == "PENDING"}
        self._pending_since = {trial_id: self._pending_since.get(trial_id, now)
                               for trial_id in pending}
        overdue = [t for trial_id, t in pending.items()
                   if now - self._pending_since[trial_id] > self.timeout_s]
        if not overdue or now < self._next_poll:
            return
        self._next_poll = now + POLL_SECONDS
        live = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        stuck = []
        for trial in overdue:
            asks = trial_bundle(trial.config)
            if not any(bundle_fits(asks, node) for node in live):
                stuck.append(UnplaceableTrial(trial.config["trial"]["name"], asks,
                                              now - self._pending_since[trial.trial_id]))
        if stuck:
            self.stuck = stuck
            self.message = unplaceable_message(stuck, live, self.launchable, self.timeout_s,
                                               self.run_dir)
            logger.error("%s", self.message)
            self.stop()
