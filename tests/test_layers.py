"""The layering the README promises: nothing below `tune` imports Ray."""

import subprocess
import sys


def test_engine_models_and_data_run_without_ray():
    code = ("import sys; import crossdet_ray.engine, crossdet_ray.models, crossdet_ray.data, "
            "crossdet_ray.synthetic, crossdet_ray.cli; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
