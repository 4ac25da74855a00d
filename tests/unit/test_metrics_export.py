"""auditor.pipeline.metrics without Ray: every recorder is a no-op, and importing it never imports ray."""

from __future__ import annotations

import subprocess
import sys

from auditor.pipeline.metrics import ETA_UNKNOWN, METRIC_NAMES, ScoreMetrics, model_tag


def test_recorders_are_no_ops_without_ray():
    code = (
        "import sys\n"
        "from auditor.pipeline.metrics import DriverMetrics, ScoreMetrics\n"
        "s = ScoreMetrics('ab' * 32)\n"
        "s.record_batch({'ok': 3}, flagged=1, seconds=0.5)\n"
        "d = DriverMetrics('ab' * 32)\n"
        "d.update({'units_committed': 1, 'units_failed': 0, 'units_remaining': 2, 'eta_s': None})\n"
        "print(s.enabled, d.enabled, any(m == 'ray' or m.startswith('ray.') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_names_and_tags_are_few():
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES) and all(n.startswith("auditor_") for n in METRIC_NAMES)
    assert model_tag("0123456789abcdef" * 4) == "0123456789ab"
    assert ETA_UNKNOWN < 0  # never a real ETA
    assert ScoreMetrics(None).enabled is False  # no model fingerprint, nothing to tag with
