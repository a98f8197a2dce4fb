"""Trials on a three-node Ray cluster on one machine: a CPU head and two logical-GPU workers,
each with a cache folder of its own, training from a dataset in a bucket (a real S3-compatible
server that counts its requests)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from crossdet_ray.data.remote import COMPLETE_MARK

from crossdet_ray.config import TrainConfig
from crossdet_ray.tune.launcher import LaunchConfig, launch

from .helpers import assert_epochs_once, assert_trained, epoch_rows, poll_until, process_ended, training_info

pytestmark = pytest.mark.ray


@pytest.fixture
def three_nodes(private_ray_tmpdir, s3_server, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    # In a private RAY_TMPDIR: the cluster neither becomes the machine's default Ray for
    # others' ray.init() nor, shutting down, removes the record of theirs.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0,
                                                            "include_dashboard": False})
    try:
        # Each node's own CROSSDET_CACHE, as separate machines would have.
        workers = [cluster.add_node(num_cpus=2, num_gpus=1, env_vars={
            "CROSSDET_CACHE": str(tmp_path / f"cache_node{i}")}) for i in range(2)]
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def _config(data, log_dir, name, epochs):
    train = TrainConfig(data=data, epochs=epochs, batch_size=2, num_workers=0,
                        backbones=["test_mit"], min_size=64, max_size=64, log_dir=str(log_dir))
    # One trial per worker node at a time: each wants the node's whole GPU.
    return LaunchConfig(train=train, name=name, verbose=0, cpus_per_trial=1,
                        gpus_per_trial="1", lr_grid=[0.5, 1.0], max_failures=3)


def test_trials_spread_fetch_a_bucket_dataset_once_per_node_and_survive_a_lost_node(
        three_nodes, s3_server, tiny_dataset, tmp_path):
    cluster, workers = three_nodes
    frames = [k for k in s3_server.upload(tiny_dataset, "tiny") if "/images/" in k]
    worker_ids = {w.node_id for w in workers}
    run_dir = tmp_path / "multinode"
    names = ["test_mit_lr0.0025", "test_mit_lr0.005"]
    removed = {}

    def remove_a_node_once_both_logged_an_epoch():
        # A row promises its epoch is safe; both rows also show each trial placed on a node.
        if not poll_until(lambda: all(len(epoch_rows(run_dir / n)) >= 1 for n in names),
                          timeout=300):
            return
        infos = {n: training_info(run_dir / n) for n in names}
        removed["initial_nodes"] = {n: info["node_id"] for n, info in infos.items()}
        victim_trial = names[0]
        node_id = removed["initial_nodes"][victim_trial]
        node = next(w for w in workers if w.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)
        # Rows read once the trial's process is gone: another may have landed before.
        if poll_until(lambda: process_ended(infos[victim_trial]["pid"]), timeout=60):
            removed.update(node_id=node_id, trial=victim_trial,
                           epochs=len(epoch_rows(run_dir / victim_trial)))

    watcher = threading.Thread(target=remove_a_node_once_both_logged_an_epoch, daemon=True)
    watcher.start()
    outcome = launch(_config(s3_server.uri("tiny"), tmp_path, "multinode", epochs=4))
    watcher.join(timeout=5)

    assert "epochs" in removed, f"no node was removed, or its trial lived on: {removed}"
    assert removed["epochs"] < 4, "the trial finished before its node was removed"
    assert outcome.exit_code == 0, outcome.summary
    rows = {r["trial"]: r for r in outcome.summary["results"]}
    assert all(r["status"] == "completed" for r in rows.values())
    for name in names:
        assert_epochs_once(run_dir / name, 4)
        assert_trained(run_dir / name)
        assert rows[name]["node_id"] in worker_ids  # never on the GPU-less head
    # Spread: one trial on each worker node (each wanted a whole GPU).
    assert set(removed["initial_nodes"].values()) == worker_ids
    survivor = (worker_ids - {removed["node_id"]}).pop()
    moved = training_info(run_dir / removed["trial"])
    assert moved["node_id"] == survivor, "the trial did not move to the other node"
    # Exactly after the last epoch logged when its node went: nothing logged was trained again.
    assert moved["resumed_at_epochs"] == [removed["epochs"] + 1]

    # The dataset: one verified copy in each worker node's cache, each frame downloaded once
    # per node (the moved trial re-used the survivor's copy); none on the head.
    copies = {i: sorted((tmp_path / f"cache_node{i}" / "remote").glob(f"tiny-*/{COMPLETE_MARK}"))
              for i in range(2)}
    assert [len(c) for c in copies.values()] == [1, 1], copies
    for marks in copies.values():
        folder = marks[0].parent
        assert {p.name: p.read_bytes() for p in (folder / "images").iterdir()} == {
            p.name: p.read_bytes() for p in (Path(tiny_dataset) / "images").iterdir()}
    assert {s3_server.full_downloads(k) for k in frames} == {2}
    assert moved["dataset_fetch"]["reused"] is True
    first = [training_info(run_dir / n).get("dataset_fetch") for n in names]
    assert all(f and f["fingerprint"] == first[0]["fingerprint"] for f in first)
