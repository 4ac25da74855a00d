"""infra/grafana/auditor-dashboard.json: importable JSON whose queries name only metrics the auditor exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from auditor.pipeline import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "auditor-dashboard.json"
# What Ray's export adds: the ray_ prefix, _total on counters, _bucket/_sum/_count on histograms.
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")


def test_dashboard_queries_only_exported_metrics_with_declared_tags():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["panels"] and board["templating"]["list"][0]["type"] == "datasource"
    exported = {f"ray_{name}{suffix}" for name in metrics.METRIC_NAMES for suffix in SUFFIXES}
    used: set[str] = set()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_auditor_\w+", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
            assert set(re.findall(r'(\w+)=~?"', target["expr"])) <= {metrics.MODEL_TAG, metrics.STATUS_TAG}
            used |= {n.removeprefix("ray_") for n in names}
    # Every metric the auditor records has a panel.
    for name in metrics.METRIC_NAMES:
        assert any(u == name or u.startswith(name + "_") for u in used), name
