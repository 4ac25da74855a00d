"""LocalRayCluster: a real 2-node Ray starts, loses its second node alone, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from ray_cluster import NODE_ENV, LocalRayCluster, list_processes

pytestmark = pytest.mark.integration

PROBE_DRIVER = """
import os, sys, time
import ray

ray.init(log_to_driver=False)


@ray.remote(num_cpus=1)
class ProbeActor:
    def pid(self):
        return os.getpid()


actor = ProbeActor.remote()
print("PID", ray.get(actor.pid.remote()), flush=True)
time.sleep(120)
"""


def _leftovers(temp_dir: str) -> list[str]:
    marker = f"{NODE_ENV}={temp_dir}:".encode()
    return [
        f"{info.pid} {info.cmdline[:120]}"
        for info, env in list_processes()
        if temp_dir in info.cmdline or marker in env
    ]


def test_two_nodes_lose_the_worker_node_alone_and_stop_clean(ray_cluster: LocalRayCluster):
    started = time.monotonic()
    cluster = ray_cluster
    temp_dir = str(cluster.temp_dir)
    assert len(temp_dir) < 20, temp_dir

    # 1. Both raylets joined, with the CPUs asked for, seen by a separate driver process.
    nodes = cluster.nodes()
    ports = {n["node_manager_port"]: n["cpus"] for n in nodes}
    assert ports == {cluster.head_ports.node_manager: 1.0, cluster.worker_ports.node_manager: 2.0}

    # 2. An actor's pid is found from outside its job, by class name (what the actor-kill drill needs).
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE_DRIVER],
        env=cluster.driver_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = probe.stdout.readline()
        assert line.startswith("PID "), line
        actor_pid = int(line.split()[1])
        found = cluster.actor_pids("ProbeActor")
        assert list(found) == [actor_pid]
        assert found[actor_pid] in {n["node_id"] for n in nodes}
    finally:
        probe.kill()
        probe.wait()

    # 3. SIGKILL of the second raylet takes its processes only; the head sees one node left.
    head_pids = {p.pid for p in cluster.processes() if p.pid not in _node_pids(cluster, "worker")}
    killed = cluster.kill_worker_node()
    assert killed
    # SIGKILL is not instantaneous: a process can still be exiting (not yet a zombie) when the scan stops seeing it,
    # as happened under pytest-xdist with a drill cluster beside this one.
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in killed if not _gone(pid)] == []
    alive = cluster.wait_for_alive_nodes(1, timeout_s=30)
    assert [n["node_manager_port"] for n in alive] == [cluster.head_ports.node_manager]
    assert {p.pid for p in cluster.processes()} >= {pid for pid in head_pids if not _gone(pid)} != set()

    # 4. A new second raylet joins again.
    cluster.restart_worker_node()
    assert sorted(n["cpus"] for n in cluster.nodes()) == [1.0, 2.0]

    # 5. stop() (the fixture calls it again, a no-op) leaves nothing of the cluster running, and no temp dir.
    cluster.stop()
    assert _leftovers(temp_dir) == []
    assert not os.path.exists(temp_dir)
    assert time.monotonic() - started < 90


def _node_pids(cluster: LocalRayCluster, role: str) -> set[int]:
    marker = f"{NODE_ENV}={cluster.temp_dir}:{role}".encode()
    return {info.pid for info, env in list_processes() if marker in env}


def _gone(pid: int) -> bool:
    """Exited, or a zombie (killed, waiting for a parent that may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
