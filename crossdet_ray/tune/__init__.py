"""Everything Ray: the trainable, the trial reporter, resources, the launcher and the summary.

Names are imported on first use: every trial actor imports this package to reach the
trainable, and should not pay for the launcher's and summary's imports (pandas, matplotlib).
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
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
