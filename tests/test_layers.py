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
               "crossdet_ray.data.check, crossdet_ray.data.synthetic, crossdet_ray.data.resolve, "
               "crossdet_ray.cli")
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


def _package_imports() -> dict[str, set[str]]:
    """Each crossdet_ray module's imports of other crossdet_ray modules, the ones inside
    functions included (a deferred import still ties two modules together)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for path in (root / "crossdet_ray").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                # A module's own package (its __init__) is not a dependency cycle.
                if target and target != name and not name.startswith(target + "."):
                    imports[name].add(target)
    return imports


def test_no_import_cycle_in_the_package():
    imports = _package_imports()
    assert "crossdet_ray.tune.trial_runtime" in imports["crossdet_ray.tune.data_parallel"]
    cycles = []
    for start in imports:
        seen, frontier = set(), [(start, (start,))]
        while frontier:
            module, path = frontier.pop()
            for target in imports[module]:
                if target == start:
                    cycles.append(" -> ".join((*path, start)))
                elif target not in seen:
                    seen.add(target)
                    frontier.append((target, (*path, target)))
    assert cycles == []
