"""Data layer: `.npy` RGB-thermal-event frames with YOLO labels, their split and preflight.

The names below are imported on first use (PEP 562): the preflight (`check_dataset`) needs
numpy only, the data set and its collate function need torch.
"""

from importlib import import_module

_EXPORTS = {
    "DatasetReport": "check", "check_dataset": "check",
    "NpyYoloDataset": "dataset", "collate_detection": "dataset", "load_frame": "dataset",
    "split_files": "dataset",
    "DatasetError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # `from crossdet_ray.data import check` then imports the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
