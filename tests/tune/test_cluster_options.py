"""Promises about where a run runs, through the real command: the dashboard's interface, joining
a running cluster with --address, and the built-in dataset's cache."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from crossdet_ray.data.synthetic import generate_dataset

from .helpers import (assert_trained, kill_session, poll_until, ray_env, run, small_run, start,
                      training_info)

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]

DASHBOARD_LINE = re.compile(r"Ray dashboard: http://([^:/\s]+):(\d+)")


def _dashboard_run(tiny_dataset: str, tmp_path: Path, host: str) -> tuple[str, int]:
    """Start a run with `--dashboard-host host`; the (host, port) its log names, checked to
    answer while the run is alive. The run is then ended: only its start matters here."""
    args = [a for a in small_run(tiny_dataset, tmp_path / "logs", "dash", 2)
            if a != "--no-dashboard"]
    command = start([*args, "--dashboard-host", host], tmp_path, "dash")
    try:
        found = {}

        def logged() -> bool:
            match = DASHBOARD_LINE.search(command.stderr)
            if match:
                found.update(host=match.group(1), port=int(match.group(2)))
            return bool(match)

        assert poll_until(logged, timeout=240, process=command.process), command.stderr[-3000:]
        logged_host, port = found["host"], found["port"]
        # The URL as logged is where the dashboard answers (Ray starts it before it returns).
        with urllib.request.urlopen(f"http://{logged_host}:{port}/", timeout=30) as response:
            assert response.status == 200
        # Bound to that interface alone: the machine's own address does not answer.
        node_ip = _node_ip()
        if node_ip != logged_host and not ipaddress.ip_address(node_ip).is_loopback:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((node_ip, port), timeout=30).close()
        return logged_host, port
    finally:
        command.kill()


def _node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def test_the_dashboard_binds_to_the_host_given_and_says_where(tiny_dataset, tmp_path):
    # 127.0.0.2: an interface other than the default (127.0.0.1, which test_crash_consistency's
    # interrupted run sees logged) that only this machine reaches (0.0.0.0 would expose it).
    host, _ = _dashboard_run(tiny_dataset, tmp_path, "127.0.0.2")
    assert host == "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def token_cluster(private_ray_tmpdir, tmp_path):
    """A Ray cluster started on this machine as cluster.yaml starts the head's: a token made
    with `ray get-auth-token --generate` (the README's step), `RAY_AUTH_MODE=token ray start
    --head` (3 CPUs, unlike this machine's own Ray) with its dashboard on 127.0.0.1, in a
    private RAY_TMPDIR. Yields the dashboard's address; the test is connected to the cluster."""
    import ray

    ray_bin = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_bin), "get-auth-token", "--generate"], check=True,
                   capture_output=True)
    dashboard = f"http://127.0.0.1:{_free_port()}"
    with open(tmp_path / "ray_start.log", "wb") as log:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", f"--port={_free_port()}", "--num-cpus=3",
             "--num-gpus=0", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", "--disable-usage-stats",
             "--block"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**ray_env(), "RAY_AUTH_MODE": "token"})
    try:
        assert poll_until(lambda: _connects() and _answers(dashboard), timeout=90), (
            tmp_path / "ray_start.log").read_text()[-3000:]
        yield dashboard
    finally:
        ray.shutdown()
        kill_session(head.pid)


def _connects() -> bool:
    import ray

    try:
        ray.init(address="auto", logging_level=logging.WARNING)
        return True
    except ConnectionError:
        return False


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).close()
        return True
    except urllib.error.HTTPError:
        return True  # it answers, and asks for the token
    except OSError:
        return False


def _alive_nodes() -> dict[str, dict]:
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def _tracked_files(destination: Path) -> Path:
    """The project as a clone holds it (what the README's `--working-dir .` uploads, without
    a developer's venv, caches and wheels)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def test_job_submit_and_the_command_on_the_head_train_on_the_locked_cluster(
        token_cluster, tiny_dataset, tmp_path, monkeypatch):
    """The README's two ways to run on a `ray up` cluster: `RAY_AUTH_MODE=token ray job submit
    --working-dir .` of the command, and the command run on the head (`ray attach`, `ray
    submit`) with no --address; both train on the cluster, not on a Ray of their own."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nodes = _alive_nodes()
    # Locked: the dashboard's job API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{token_cluster}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)

    project = _tracked_files(tmp_path / "project")
    args = small_run(tiny_dataset, tmp_path / "logs", "submitted", 1, address=None)
    # The README's `python`, as this test's interpreter: the head's `python` may be another.
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", token_cluster,
         "--working-dir", ".", "--", sys.executable, "experiments/all_backbones.py", *args],
        cwd=project, capture_output=True, text=True, timeout=400,
        env={**ray_env(), "RAY_AUTH_MODE": "token"})
    assert submitted.returncode == 0, (submitted.stdout[-3000:], submitted.stderr[-3000:])
    assert re.search(r"Job 'raysubmit_\w+' succeeded", submitted.stdout + submitted.stderr)

    on_head = run(small_run(tiny_dataset, tmp_path / "logs", "on_head", 1, address=None),
                  tmp_path, "on_head", own_ray=False)
    assert on_head.process.returncode == 0, on_head.stderr[-3000:]
    assert "joined the Ray cluster running on this node" in on_head.stderr

    for name in ("submitted", "on_head"):
        run_dir = tmp_path / "logs" / name
        # The trial ran on the cluster's node, and the run planned for the cluster's shape.
        assert training_info(run_dir / "test_mit")["node_id"] in nodes, name
        saved = json.loads((run_dir / "run_config.json").read_text())
        assert saved["cluster"]["nodes"] == [{"CPU": 3.0, "GPU": 0.0}], name
        assert_trained(run_dir / "test_mit")
    # The commands left the cluster as they found it, running.
    assert _alive_nodes().keys() == nodes.keys()


def _files(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `folder`: (inode, mtime in ns, contents), by relative path."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            files[str(path.relative_to(folder))] = (stat.st_ino, stat.st_mtime_ns,
                                                    path.read_bytes())
    return files


def test_the_builtin_dataset_is_made_once_then_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CROSSDET_CACHE", str(cache))  # the command inherits the test's env

    def without_data(name: str):
        # small_run's flags but --data: the built-in dataset, at 8 frames of 64 px.
        args = small_run("", tmp_path / "logs", name, 1)
        assert args[:2] == ("--data", "")
        return run([*args[2:], "--synthetic-images", "8", "--synthetic-frame-size", "64"],
                   tmp_path, name)

    first = without_data("first")
    assert first.process.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == ["synthetic_n8_seed0_64px"]
    dataset = cache / "synthetic_n8_seed0_64px"
    made = _files(dataset)
    # The flags' dataset: what the generator makes for 8 frames, seed 0, 64x64 px.
    expected = generate_dataset(tmp_path / "expected", 8, seed=0, sizes=[(64, 64)])
    assert {k: v[2] for k, v in made.items()} == {
        k: v[2] for k, v in _files(expected).items()}
    generated = re.findall(r"crossdet_ray\.data\.synthetic: synthetic dataset .*: 8 frames",
                           first.stderr)
    assert len(generated) == 1, first.stderr[-3000:]
    assert "Ray dashboard:" not in first.stderr  # --no-dashboard

    assert "no --data given: using the built-in synthetic" in first.stderr
    saved = json.loads((tmp_path / "logs" / "first" / "run_config.json").read_text())
    assert saved["data"]["resolved_path"] == str(dataset)
    assert training_info(tmp_path / "logs" / "first" / "test_mit")["status"] == "completed"
    assert_trained(tmp_path / "logs" / "first" / "test_mit")

    # A later run on the same flags: its driver resolves the dataset first (a plan for a
    # cluster that is not here needs no Ray, so nothing else runs).
    second = run(["--synthetic-images", "8", "--synthetic-frame-size", "64", "--plan-only",
                  "--plan-for", "1x1x80", "--log-dir", str(tmp_path / "logs"),
                  "--name", "second"], tmp_path, "second")
    assert second.process.returncode == 0, second.stderr[-3000:]
    assert "no --data given: using the built-in synthetic" in second.stderr
    assert str(dataset) in second.stderr
    # Reused as it was: the same files, neither rewritten nor replaced, and no new folder.
    assert _files(dataset) == made
    assert sorted(p.name for p in cache.iterdir()) == ["synthetic_n8_seed0_64px"]
    assert "crossdet_ray.data.synthetic" not in second.stderr, second.stderr[-3000:]


def test_autoscaling_with_fixed_gpu_shares_takes_cpus_from_the_node_types(tmp_path):
    # On `ray up cluster.yaml`'s head (no CPU, no GPU: the autoscaler's config is in
    # ~/ray_bootstrap_config.yaml), fixed shares of the GPU node types: each trial's CPUs are
    # its share of a GPU node's (8 CPUs, 1 GPU), not the alive head's nothing. A process of
    # its own: Ray keeps the auth token it read from the first HOME for the process's life.
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "cluster.yaml", home / "ray_bootstrap_config.yaml")
    data = generate_dataset(tmp_path / "data", 6, seed=0, sizes=[(64, 64)])
    result = run(["--data", str(data), "--autoscaling", "--plan-only", "--address", "local",
                  "--gpus-per-trial", "mit_b4=1,mit_b5=1,default=0.5", "--no-dashboard",
                  "--log-dir", str(tmp_path / "logs"), "--name", "planned"],
                 tmp_path, "planned", env={**ray_env(), "HOME": str(home)})
    assert result.process.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "logs" / "planned" / "plan.json").read_text())
    cpus = {t["backbone"]: t["cpus"] for t in plan["trials"]}
    gpus = {t["backbone"]: t["gpus"] for t in plan["trials"]}
    assert gpus == {"mit_b0": 0.5, "mit_b1": 0.5, "mit_b2": 0.5, "mit_b4": 1, "mit_b5": 1}
    # Half a GPU: half of its node's 8 CPUs, so two such trials share one node and its GPU.
    assert cpus == {"mit_b0": 4, "mit_b1": 4, "mit_b2": 4, "mit_b4": 8, "mit_b5": 8}
