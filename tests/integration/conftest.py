"""Integration fixtures: one local Ray (2 CPUs) per session (the moto S3 server is tests/conftest.py's)."""

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
