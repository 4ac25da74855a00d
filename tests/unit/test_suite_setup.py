"""The test suite's own set-up (tests/conftest.py): what each pytest-xdist worker gives torch."""

from __future__ import annotations

import os
import re
from pathlib import Path

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


TIGHTER_THAN_CROSS_BATCH = re.compile(r"\b(rtol|rel)=(\d(\.\d+)?)e-(\d+)")


def test_scores_from_other_batches_are_compared_with_the_shared_tolerance():
    """A comparison tighter than tests/scores_close.py's 1e-5 passes on one CPU and fails on another (issue 32);
    only a comparison within the same batch may be tighter, and says so on its line."""
    offenders = []
    for path in sorted(Path(__file__).parents[1].rglob("test_*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in TIGHTER_THAN_CROSS_BATCH.finditer(line):
                tolerance = float(match.group(2)) * 10 ** -int(match.group(4))
                if tolerance < 1e-5 and "same batch" not in line and "TIGHTER_THAN" not in line:
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "use tests.scores_close.assert_scores_close:\n" + "\n".join(offenders)


def test_no_two_test_modules_share_a_name():
    """Without __init__.py files pytest imports test modules by their base name: two of one name stop the whole
    suite's collection (it happened: unit/ and integration/ each had a test_ray_auth.py)."""
    names: dict[str, list[str]] = {}
    for path in sorted(Path(__file__).parents[1].rglob("test_*.py")):
        names.setdefault(path.name, []).append(str(path.parent.name))
    assert {name: dirs for name, dirs in names.items() if len(dirs) > 1} == {}
