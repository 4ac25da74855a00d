"""A slow run is not a stalled run (issue 36): an audit whose one work unit takes several times --stall-timeout-s
to score completes, and its progress lines show rows rising before the unit commits. The stall drill (test_drills,
drill c) shows the other side: a run that cannot move still stops with exit 3."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from audit_corpus import captions

pytestmark = pytest.mark.integration

HOOKS = Path(__file__).with_name("drill_hooks")  # sitecustomize: AUDITOR_TEST_BATCH_DELAY_S slows each batch
PROGRESS = re.compile(r"audit progress: (\d+)/(\d+) units \([\d.]+%\), ([\d,]+) rows, ([\d,]+) rows/s")
# Above what starting the score actor takes on a loaded machine (it ran past 10 s in a whole `make test`: the
# watchdog counts from the pipeline's start until the actor reports ready).
STALL_TIMEOUT_S = 45
BATCHES = 40
BATCH_DELAY_S = 2.5  # 40 batches x 2.5 s: 100 s of scoring in one unit, over 2x the stall timeout


def test_one_slow_unit_is_not_killed_and_shows_its_rows_rising(ray_local, tmp_path, micro_model_dir):
    (tmp_path / "in").mkdir()
    rows = 4 * BATCHES
    lines = [json.dumps({"caption": c}) for c in captions("a slow photo of a", rows)]
    (tmp_path / "in" / "one.jsonl").write_text("\n".join(lines) + "\n")  # a text file is one unit
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")])),
        "AUDITOR_TEST_BATCH_DELAY_S": str(BATCH_DELAY_S),
    }
    env.pop("RAY_ADDRESS", None)
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(micro_model_dir), "--dtype", "fp32",
            "--batch-size", "4", "--num-cpus", "2", "--stall-timeout-s", str(STALL_TIMEOUT_S),
            "--progress-interval", "2", "--quiet", "--no-report"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "auditor", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert audit["counts"]["this_run"]["rows"] == rows
    assert audit["throughput"]["rows_scored"] == rows and audit["throughput"]["units_committed"] == 1
    # Scoring outlasted the watchdog's timeout by far, in one unit whose only write batch comes at its end.
    assert audit["timings_s"]["pipeline"] > 2 * STALL_TIMEOUT_S, audit["timings_s"]
    before_commit = [
        int(rows_seen.replace(",", "")) for done, _, rows_seen, _ in PROGRESS.findall(log) if done == "0"
    ]
    rising = sorted({n for n in before_commit if 0 < n < rows})
    assert len(rising) >= 3, f"rows did not rise before the commit: {before_commit}\n{log[-3000:]}"
    assert before_commit == sorted(before_commit)
