"""The layering the README promises: nothing below `tune` imports Ray; and the driver, which
only starts Ray and Tune, does not import the training stack."""

import subprocess
import sys


def _imported(statements: str, names: str) -> str:
    code = f"import sys; {statements}; print(sorted(m for m in sys.modules if {names}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_engine_models_and_data_run_without_ray():
    # The packages import their names on first use, so every module is named here.
    modules = ("crossdet_ray.engine.train, crossdet_ray.engine.evaluate, "
               "crossdet_ray.engine.run_logs, crossdet_ray.engine.storage, "
               "crossdet_ray.engine.checkpoint, crossdet_ray.engine.inference, "
               "crossdet_ray.engine.predict, crossdet_ray.engine.host_memory, "
               "crossdet_ray.models, crossdet_ray.data.dataset, "
               "crossdet_ray.data.check, crossdet_ray.synthetic, crossdet_ray.cli")
    assert _imported(f"import {modules}", "m == 'ray' or m.startswith('ray.')") == "[]"


def test_the_driver_imports_no_torch():
    """What the command's driver imports before Tune starts the trials (docs/performance.md,
    start-up: torch and torchvision cost it seconds there, and only the trials use them)."""
    statements = ("import crossdet_ray.cli; from crossdet_ray.tune.launcher import launch; "
                  "from crossdet_ray.tune.trainable import train_backbone; "
                  "from crossdet_ray.data import DatasetError; "
                  "from crossdet_ray.tune.resources import ResourceError; "
                  "from crossdet_ray.tune import LaunchConfig")
    assert _imported(statements, "m in ('torch', 'torchvision')") == "[]"


def test_lazy_packages_export_their_names():
    import crossdet_ray.data
    import crossdet_ray.engine
    import crossdet_ray.tune

    for package in (crossdet_ray.data, crossdet_ray.engine, crossdet_ray.tune):
        missing = [name for name in package.__all__ if getattr(package, name, None) is None]
        assert not missing, f"{package.__name__} does not export {missing}"
        assert set(package.__all__) <= set(dir(package))
