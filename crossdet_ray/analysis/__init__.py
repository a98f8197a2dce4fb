"""After the run: evaluate every trial's checkpoint with Ray, compare, and report.

`evaluate_run(run_dir)` is what the training command calls at its end; `main` is
`experiments/evaluate.py`.
"""

from crossdet_ray.analysis.evaluation import EvaluationOutcome, evaluate, evaluate_run
from crossdet_ray.analysis.sources import EvaluationError, EvaluationPlan, plan_evaluation

__all__ = ["EvaluationError", "EvaluationOutcome", "EvaluationPlan", "evaluate",
           "evaluate_run", "plan_evaluation"]
