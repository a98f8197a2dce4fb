"""Every use of Ray beyond its documented public API, in one place, each with why.

Ray changes its internals between releases without notice; each use here is one Ray (2.60)
offers no public way to do. `tests/tune/test_ray_compat.py` checks that each is still there,
and fails naming the internal and the installed Ray version when one disappears, so that an
upgrade breaks a test here rather than a user's run. Nothing outside this module imports
`ray._private`, reads `Tuner._local_tuner`, sets a Trial's retries, signals its own process,
or sets Tune's switches.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from typing import Any, Iterator

logger = logging.getLogger(__name__)

# Ray's log records of no use to our users, by the loggers that emit them: "Checkpoint
# successfully created at: ..." at every epoch of every trial (our progress lines say it), and
# the token-auth notice at every start (the dashboard line says how to log in).
RAY_CHECKPOINT_LOGGERS = ("ray.train._internal.storage",
                          "ray.train.v2._internal.execution.storage")
RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# The status the autoscaler writes to the GCS's internal KV at every update (its pid in it).
AUTOSCALING_STATUS_KEY = "__autoscaling_status"
# Tune's switches, read by its driver loop: no SIGINT handler of its own; its older console.
TUNE_SIGINT_SWITCH = "TUNE_DISABLE_SIGINT_HANDLER"
LEGACY_OUTPUT_SWITCH = "RAY_AIR_NEW_OUTPUT"


# -- resume -----------------------------------------------------------------------------------
def restored_run_config(tuner) -> Any | None:
    """The RunConfig a `Tuner.restore` brought back, to re-attach callbacks to (None under
    Ray Client). Why: `Tuner.restore` takes no RunConfig, and our callbacks hold this driver's
    actor and events, so Tune's pickled copies are inert and must be replaced."""
    local = getattr(tuner, "_local_tuner", None)
    return local.get_run_config() if local is not None else None


# -- retries ----------------------------------------------------------------------------------
def set_trial_retries(trial, max_failures: int) -> None:
    """Set how often Tune restarts `trial` (0: the next failure is final). Why: a failure a
    restart cannot mend (a full disk, damaged checkpoints, a GPU CUDA cannot see) must not use
    up --max-failures' restarts, and Tune's FailureConfig is one number for every trial. The
    public alternative, a trial that returns instead of raising, ends TERMINATED, and
    `Tuner.restore` never restarts a terminated trial: "free space, then --resume" would
    not train it again."""
    trial.max_failures = max_failures


# -- stopping ---------------------------------------------------------------------------------
def stop_tune_gracefully() -> None:
    """End `Tuner.fit()`'s loop as Tune's own first Ctrl-C does: the experiment state saved,
    unfinished trials resumable. SIGUSR1 is Tune's documented graceful stop ("Ray Tune also
    accepts the SIGUSR1 signal to interrupt training gracefully", its guide to stopping and
    resuming runs); it is here because it signals this very process, from a callback, for
    which Tune has no call."""
    os.kill(os.getpid(), signal.SIGUSR1)


@contextmanager
def tune_sigint_handler_disabled() -> Iterator[None]:
    """Keep Tune from installing its own SIGINT handler during `fit()` (ours drains the
    trials' checkpoints first). Why: Tune replaces any handler unless this switch, documented
    in Tune's environment-variable reference, is set; it is a process-wide setting, so it is
    set only while `fit()` runs."""
    previous = os.environ.get(TUNE_SIGINT_SWITCH)
    os.environ[TUNE_SIGINT_SWITCH] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TUNE_SIGINT_SWITCH, None)
        else:
            os.environ[TUNE_SIGINT_SWITCH] = previous


# -- console ----------------------------------------------------------------------------------
def use_quiet_tune_console() -> None:
    """Tune's older console, which at verbosity 0 prints nothing, so that our progress lines
    (a public tune.Callback) are the console. Why: Tune's default console prints an experiment
    header and a TensorBoard hint pointing into Ray's session directory at every verbosity,
    where our own line names the run directory to give TensorBoard."""
    os.environ[LEGACY_OUTPUT_SWITCH] = "0"


# -- the autoscaler's node types ---------------------------------------------------------------
def gcs_cluster_config():
    """The cluster config the GCS holds (autoscaler_pb2.ClusterConfig), or None. Why: the only
    record of the node types an autoscaler can launch that a driver can read; no public API
    returns it (Ray Data reads it the same way)."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception as error:  # noqa: BLE001 - an internal: any failure means "not there"
        logger.debug("no cluster config in the GCS: %s", error)
        return None
    return config if config is not None and config.node_group_configs else None


def autoscaler_status() -> bytes | None:
    """The status the autoscaler last wrote to the GCS (JSON with its `monitor_pid`), or None.
    Why: where the autoscaler runs on the head, its process's command line names the config
    file it was started with, and this is how a driver finds that process."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(AUTOSCALING_STATUS_KEY)
