"""Train every CrossAttentionDet backbone at once, each a Ray Tune trial.

    python experiments/all_backbones.py --gpus-per-trial 1 --data data/
"""

import sys

from crossdet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
