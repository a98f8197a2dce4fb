"""Everything Ray: the trainable, the trial reporter, resources, the launcher and the summary.

The names below are imported on first use (PEP 562): a trial's worker process imports
`crossdet_ray.tune.trainable`, the run-control actor `crossdet_ray.tune.run_control`, and
neither should pay for the launcher, the planner and the summary (pandas) on two cores.
"""

from crossdet_ray.lazy_exports import lazy_exports

_EXPORTS = {
    "LaunchConfig": "launcher", "LaunchError": "launcher", "RunOutcome": "launcher",
    "launch": "launcher", "trial_specs": "launcher",
    "TrialReporter": "reporter", "load_trial_checkpoint": "reporter",
    "ResourceError": "resources", "parse_gpus_per_trial": "resources",
    "plan_resources": "resources",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
