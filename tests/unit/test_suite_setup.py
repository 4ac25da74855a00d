"""The test suite's own set-up (tests/conftest.py): what each pytest-xdist worker gives torch."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import share_cores_among_workers


@pytest.mark.parametrize(
    "cpus, workers, given, threads, env",
    [
        (2, 3, None, 1, "1"),  # this workplace: 3 workers on 2 cores
        (16, 3, None, 5, "5"),
        (None, 2, None, 1, "1"),  # os.cpu_count() may not know
        (16, 3, "2", 2, "2"),  # the caller's setting is kept
        (16, 3, "4,2", 4, "4,2"),  # OpenMP's nested form: torch takes the first level
        (16, 3, "lots", 5, "lots"),  # not a number: the share, and the caller's variable left alone
    ],
)
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, cpus, workers, given, threads, env):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    share_cores_among_workers(workers)  # the autouse fixture restores torch's thread count afterwards
    assert torch.get_num_threads() == threads
    assert os.environ["OMP_NUM_THREADS"] == env
