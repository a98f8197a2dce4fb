"""Each Ray internal that crossdet_ray/tune/ray_compat.py relies on is still there: an upgrade of
Ray that removes one fails here, naming it and the Ray version, not in a user's run."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import signal

import ray
import ray.tune
import pytest

from crossdet_ray.tune import ray_compat


def _missing(what: str, breaks: str) -> str:
    return f"Ray {ray.__version__}: {what} is gone; {breaks} (crossdet_ray/tune/ray_compat.py)"


def _source(module_name: str) -> str:
    return inspect.getsource(importlib.import_module(module_name))


def test_resume_can_reach_the_restored_run_config():
    from ray.tune.impl.tuner_internal import TunerInternal

    assert "_local_tuner" in inspect.getsource(ray.tune.Tuner.__init__), _missing(
        "Tuner._local_tuner", "--resume cannot re-attach its callbacks")
    assert callable(getattr(TunerInternal, "get_run_config", None)), _missing(
        "TunerInternal.get_run_config", "--resume cannot re-attach its callbacks")


def test_a_trials_retries_are_an_attribute_tune_reads():
    from ray.tune.experiment import Trial

    assert "max_failures" in inspect.signature(Trial.__init__).parameters, _missing(
        "Trial(max_failures=...)", "failures a restart cannot mend would be retried")
    # Whether a failed trial is restarted is decided from that attribute, when it fails.
    assert "self.max_failures" in inspect.getsource(Trial.should_recover), _missing(
        "Trial.should_recover's reading of self.max_failures",
        "failures a restart cannot mend would be retried")


def test_tune_stops_gracefully_on_sigusr1_and_its_sigint_handler_can_be_switched_off():
    tune_source = _source("ray.tune.tune")
    assert "SIGUSR1" in tune_source and hasattr(signal, "SIGUSR1"), _missing(
        "Tune's SIGUSR1 handler", "Ctrl-C's drain and --pending-timeout cannot stop the run")
    assert ray_compat.TUNE_SIGINT_SWITCH in tune_source + _source("ray.tune.utils.util") \
        or ray_compat.TUNE_SIGINT_SWITCH in _source("ray.tune.execution.tune_controller"), \
        _missing(ray_compat.TUNE_SIGINT_SWITCH, "Tune would replace the drain's SIGINT handler")


def test_tune_still_reads_the_older_console_switch():
    from ray.tune.experimental import output

    assert ray_compat.LEGACY_OUTPUT_SWITCH in inspect.getsource(output) + _source(
        "ray.air.constants"), _missing(ray_compat.LEGACY_OUTPUT_SWITCH,
                                       "Tune's own header would print beside our lines")


def test_the_autoscalers_records_can_be_read():
    from ray._private import state

    assert callable(getattr(state.state, "get_cluster_config", None)), _missing(
        "ray._private.state.state.get_cluster_config",
        "--autoscaling cannot read the GCS's node types")
    internal_kv = importlib.import_module("ray.experimental.internal_kv")
    assert callable(getattr(internal_kv, "_internal_kv_get", None)), _missing(
        "ray.experimental.internal_kv._internal_kv_get",
        "--autoscaling cannot find the autoscaler's config file")
    monitor = _source("ray.autoscaler._private.monitor")
    assert ray_compat.AUTOSCALING_STATUS_KEY in monitor + _source("ray._private.ray_constants"), \
        _missing(f"the autoscaler's {ray_compat.AUTOSCALING_STATUS_KEY!r} record",
                 "--autoscaling cannot find the autoscaler's config file")


@pytest.mark.parametrize("name", [*ray_compat.RAY_CHECKPOINT_LOGGERS,
                                  ray_compat.RAY_TOKEN_NOTICE_LOGGER])
def test_the_loggers_we_quieten_exist(name):
    assert importlib.util.find_spec(name) is not None, _missing(
        f"the module behind logger {name}", "a notice we quieten would be printed again")
