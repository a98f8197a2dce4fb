"""Everything Ray: the trainable, the trial reporter, resources, the launcher and the summary.

The names below are imported on first use (PEP 562): a trial's worker process imports
`crossdet_ray.tune.trainable`, the run-control actor `crossdet_ray.tune.run_control`, and
neither should pay for the launcher, the planner and the summary (pandas) on two cores.
"""

from importlib import import_module

_EXPORTS = {
    "LaunchConfig": "launcher", "LaunchError": "launcher", "RunOutcome": "launcher",
    "launch": "launcher", "trial_specs": "launcher",
    "TrialReporter": "reporter", "load_trial_checkpoint": "reporter",
    "ResourceError": "resources", "parse_gpus_per_trial": "resources",
    "plan_resources": "resources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # `from crossdet_ray.tune import launcher` then imports the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
