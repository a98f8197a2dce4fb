"""Evaluate a finished run: every trial's checkpoint on the test split (or --data), as Ray tasks.

    python experiments/evaluate.py training_logs/run_20251107_120000
"""

import sys

from crossdet_ray.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
