"""A Ray cluster that autoscales on this machine: Ray's fake multi-node provider.

`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FILE` with `provider: type:
fake_multinode` runs the real autoscaler (monitor.py); a "node" it launches is another raylet
on this machine with the node type's resources (a GPU there is logical only). The config file is
written here: the wheel does not ship Ray's example.yaml (shared/reference/RAY_NOTES.md).

The cluster lives in a session of its own (setsid) and a private temp dir, and is torn down by
killing that session and anything naming the temp dir: never `ray stop`, which stops every Ray
on the machine, other tests' included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .helpers import kill_session, poll_until, session_processes

VENV_BIN = Path(os.sys.executable).parent
HEAD_TYPE = "ray.head.default"  # the name the fake provider gives its head
GPU_TYPE = "gpu_small"
GPU_TYPE_RESOURCES = {"CPU": 1, "GPU": 1, "gpu_memory_24gb": 1}
GPU_TYPE_MAX_WORKERS = 2
LARGE_GPU_TYPE = "gpu_large"
LARGE_GPU_TYPE_RESOURCES = {"CPU": 2, "GPU": 1, "gpu_memory_48gb": 1}
# A type the cloud never launches (as with a GPU quota of 0): the fake provider starts each
# node with the type's `object_store_memory`, and Ray refuses one of a single byte, so every
# launch fails in the provider, as a refused EC2 RunInstances does.
NEVER_LAUNCHED_TYPE = "gpu_no_quota"
NEVER_LAUNCHED_TYPE_RESOURCES = {"CPU": 1, "GPU": 1, "gpu_memory_80gb": 1,
                                 "object_store_memory": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def cluster_config(gcs_address: str) -> dict:
    """A CPU-less head and three GPU node types that start from zero workers: up to 2 of
    24 GB, 1 of 48 GB, and one of 80 GB that can never be launched."""
    worker_types = {
        GPU_TYPE: (GPU_TYPE_RESOURCES, GPU_TYPE_MAX_WORKERS),
        LARGE_GPU_TYPE: (LARGE_GPU_TYPE_RESOURCES, 1),
        NEVER_LAUNCHED_TYPE: (NEVER_LAUNCHED_TYPE_RESOURCES, 1),
    }
    return {
        "cluster_name": "fake_autoscaling",
        "max_workers": sum(count for _, count in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,  # nodes stay for the test's life once launched
        "provider": {
            "type": "fake_multinode",
            # Node ids double as IPs, nodes are started in-process, not over SSH.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Where launched nodes join (the provider's default is port 6379).
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"resources": dict(resources), "node_config": {}, "min_workers": 0,
                      "max_workers": count}
               for name, (resources, count) in worker_types.items()},
        },
        "head_node_type": HEAD_TYPE,
        # The launcher reads these keys without defaults.
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def cluster_env(temp_dir: str) -> dict[str, str]:
    """Environment of the cluster and of the drivers that join it."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_TMPDIR=temp_dir,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        # A private test cluster: no token to hand to every driver that joins.
        RAY_AUTH_MODE="disabled",
    )
    return env


@dataclass
class FakeAutoscalingCluster:
    address: str
    temp_dir: str
    config_path: Path
    session_id: int
    start_log: Path

    @classmethod
    def start(cls, work_dir: Path) -> "FakeAutoscalingCluster":
        import ray._private.services

        # Short, for Ray's socket paths; private, so no other Ray finds or deletes its files.
        temp_dir = tempfile.mkdtemp(prefix="rayas", dir="/tmp")
        port = free_port()
        address = f"{ray._private.services.get_node_ip_address()}:{port}"
        config_path = work_dir / "fake_autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(cluster_config(address)))
        start_log = work_dir / "ray_start.log"
        args = [str(VENV_BIN / "ray"), "start", "--head", "--num-cpus=0", "--num-gpus=0",
                f"--port={port}", f"--temp-dir={temp_dir}",
                f"--autoscaling-config={config_path}", "--include-dashboard=false",
                # Every fixed default port could be another Ray's on this machine.
                f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}"]
        with open(start_log, "w") as log:
            # A session of its own: `ray start` returns, its daemons (and the nodes the
            # autoscaler launches, which the monitor starts) stay in this session.
            starter = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                       env=cluster_env(temp_dir), start_new_session=True)
        cluster = cls(address, temp_dir, config_path, starter.pid, start_log)
        try:
            if starter.wait(timeout=180) != 0:
                raise RuntimeError(f"ray start failed: {start_log.read_text()[-3000:]}")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def env(self) -> dict[str, str]:
        return cluster_env(self.temp_dir)

    def processes(self) -> list[int]:
        """Its processes: the session's, and any naming its temp dir (a node's, a worker's)."""
        found = set(session_processes(self.session_id))
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if self.temp_dir.encode() in cmdline:
                found.add(int(entry))
        return sorted(found)

    def monitor_log(self) -> str:
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.*"))
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs)

    def stop(self) -> None:
        kill_session(self.session_id)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        poll_until(lambda: not self.processes(), timeout=60)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

