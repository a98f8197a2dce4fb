"""Runs in every Ray worker process of a local run as soon as it starts.

Each trial actor must import torch, torchvision and Ray Tune (about 3 s of CPU each); five
actors doing it at once on a small machine hold every trial back by several seconds. Ray starts
a few worker processes while the driver is still setting up; importing the training stack
there, meanwhile, moves that time off the trials' path. The price: each idle worker Ray keeps
(about one per CPU) holds torch in memory. Set only for a local Ray (see `connect_ray`).
"""

import importlib


def import_training_stack() -> None:
    importlib.import_module("crossdet_ray.tune.trainable")
