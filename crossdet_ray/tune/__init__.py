"""Everything Ray: the trainable, the trial reporter, resources, the launcher and the summary."""

from crossdet_ray.tune.launcher import LaunchConfig, LaunchError, RunOutcome, launch, trial_specs
from crossdet_ray.tune.reporter import TrialReporter, load_trial_checkpoint
from crossdet_ray.tune.resources import ResourceError, parse_gpus_per_trial, plan_resources

__all__ = [
    "LaunchConfig", "LaunchError", "ResourceError", "RunOutcome", "TrialReporter", "launch",
    "load_trial_checkpoint", "parse_gpus_per_trial", "plan_resources", "trial_specs",
]
