"""Run a trained checkpoint on .npy frames: COCO-format detections.json and drawings.

    python experiments/predict.py training_logs/run_.../mit_b0/checkpoints/best_map_model.pth \
        frames/ --out predictions/
"""

import sys

from crossdet_ray.predict_cli import main

if __name__ == "__main__":
    sys.exit(main())
