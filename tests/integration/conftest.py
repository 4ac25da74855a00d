"""Integration fixtures: one in-process local Ray (2 CPUs) per session, and a real 2-node Ray per test on demand.

The moto S3 server is tests/conftest.py's.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray with 2 CPUs: one for the scoring actor, one for the read tasks (2 actors x 1 CPU would hang).

    Starts after the S3 server fixture, so its workers inherit the test credentials from the environment.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def ray_cluster():
    """A fresh real 2-node Ray (head 1 CPU + a second raylet with 2 CPUs) per test; see ray_cluster.LocalRayCluster.

    Separate from `ray_local`: its own temp dir, ports and token, reached only by subprocess drivers
    (`cluster.driver_env()`), so both can run in one session. Ask for `s3_endpoint` too when the drill reads
    from moto: that session fixture starts first, and the nodes inherit its credentials from the environment.
    """
    from ray_cluster import LocalRayCluster

    with LocalRayCluster(head_cpus=1, worker_cpus=2) as cluster:
        yield cluster
