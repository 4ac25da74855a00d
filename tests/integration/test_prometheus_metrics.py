"""The audit's Prometheus metrics: a real Ray head and node started with --metrics-export-port, a small audit, the
endpoints scraped over HTTP and read with prometheus_client's parser."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_corpus import captions
from prometheus_client.parser import text_string_to_metric_families
from ray_cluster import NODE_IP, LocalRayCluster

from auditor import schema
from auditor.pipeline import metrics

pytestmark = pytest.mark.integration

SCRAPE_TIMEOUT_S = 90.0  # Ray's agents export what workers recorded every few seconds (about 5-10 s)

DRIVER = """
import json, sys, time
from auditor.config import AuditConfig
from auditor.pipeline.audit import run

result = run(AuditConfig(inputs=({input!r},), output={output!r}, model={model!r}, threshold={threshold!r},
                         dtype="fp32", batch_size=4, unit_rows=8, quiet=True, report=False, gpus_per_actor=0))
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)  # the score actors' stack
print("RESULT " + json.dumps({{"counts": result.counts, "units": result.units_done, "heavy": heavy}}), flush=True)
time.sleep(600)  # stay alive: the driver's last values reach the agent on its next report, then the test kills it
"""


def scrape(
    cluster: LocalRayCluster, workers: dict[str, set[str]] | None = None
) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted auditor tags): value summed over nodes and workers} of the auditor's samples;
    workers, when given, collects each sample name's WorkerId values (the per-actor series)."""
    values: dict[tuple[str, tuple], float] = defaultdict(float)
    for ports in (cluster.head_ports, cluster.worker_ports):
        url = f"http://{NODE_IP}:{ports.metrics_export}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("ray_auditor_"):
                continue
            for sample in family.samples:
                tags = tuple(
                    sorted(
                        (k, v)
                        for k, v in sample.labels.items()
                        if k in (metrics.MODEL_TAG, metrics.STATUS_TAG, metrics.STAGE_TAG, "le")
                    )
                )
                values[(sample.name, tags)] += sample.value
                if workers is not None:
                    workers.setdefault(sample.name, set()).add(sample.labels.get("WorkerId", ""))
    return values


@pytest.mark.own_ray_cluster
def test_audit_exports_counters_to_prometheus(tmp_path, micro_model_dir, micro_scorer):
    (tmp_path / "in").mkdir()
    texts = captions("a scraped photo of a", 17)
    pq.write_table(
        pa.table({"caption": [*texts[:9], None, "", " ", *texts[9:]]}),
        tmp_path / "in" / "a.parquet",
        row_group_size=8,
    )  # 20 rows: units of rows 0-7, 8-15, 16-19
    ranked = np.sort(micro_scorer.score(texts))
    threshold = float((ranked[8] + ranked[9]) / 2)  # between two scores: float noise cannot move a flag
    flagged = 8
    model = metrics.model_tag(micro_scorer.fingerprint)

    def key(name: str, **tags: str) -> tuple[str, tuple]:
        return name, tuple(sorted({metrics.MODEL_TAG: model, **tags}.items()))

    status = metrics.STATUS_TAG
    expected = {
        key("ray_auditor_rows_scored_total", **{status: schema.OK}): 17,
        key("ray_auditor_rows_scored_total", **{status: schema.NULL_CAPTION}): 1,
        key("ray_auditor_rows_scored_total", **{status: schema.EMPTY_CAPTION}): 2,
        key("ray_auditor_rows_flagged_total"): flagged,
        # One denoiser row per distinct caption (1 generation x 1 step; the unconditional row is shared).
        key("ray_auditor_denoiser_rows_total", **{metrics.STAGE_TAG: "screen"}): len(set(texts)),
        key("ray_auditor_units_committed_total"): 3,
        key("ray_auditor_units_remaining"): 0,
        key("ray_auditor_eta_seconds"): 0,
    }
    code = textwrap.dedent(DRIVER).format(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=str(micro_model_dir),
        threshold=threshold,
    )
    with LocalRayCluster(head_cpus=1, worker_cpus=2) as cluster:
        log = tmp_path / "driver.log"
        with open(log, "w") as stderr:
            driver = subprocess.Popen(
                [sys.executable, "-c", code], env=cluster.driver_env(), stdout=subprocess.PIPE, stderr=stderr,
                text=True,
            )  # fmt: skip
        try:
            line = driver.stdout.readline()
            assert line.startswith("RESULT "), (
                f"the audit driver printed {line!r}:\n{log.read_text()[-3000:]}"
            )
            result = json.loads(line[len("RESULT ") :])
            assert result["units"] == 3 and result["counts"]["flagged"] == flagged
            assert result["heavy"] == [], (
                f"the driver imported {result['heavy']}; only score actors need them"
            )
            deadline = time.monotonic() + SCRAPE_TIMEOUT_S
            while True:
                workers: dict[str, set[str]] = {}
                values = scrape(cluster, workers)
                found = {key: values.get(key) for key in expected}
                if found == expected or time.monotonic() > deadline:
                    break
                time.sleep(2)
        finally:
            driver.kill()
            driver.wait(timeout=30)
    assert found == expected
    assert values.get(key("ray_auditor_units_failed_total")) in (None, 0.0)
    # One batch-seconds observation per actor call (5 data batches of <= 4 rows, plus the units' control rows).
    batches = values[key("ray_auditor_batch_seconds_count")]
    assert batches >= 5
    assert values[key("ray_auditor_batch_seconds_sum")] > 0
    # Captions/s per actor is a rate of rows scored by WorkerId: the counter is one series per actor process; the
    # driver's unit counts come from one other process.
    assert "" not in workers["ray_auditor_rows_scored_total"]
    assert workers["ray_auditor_units_committed_total"].isdisjoint(workers["ray_auditor_rows_scored_total"])
    # Tags stay few: the auditor's samples carry the model and (rows scored only) a status, nothing per row or file.
    names = {name for name, _ in values}
    exported = {n.removesuffix("_total") for n in names} | {n.rsplit("_", 1)[0] for n in names}
    # No unit failed and no second stage ran: those two are never recorded.
    recorded = [m for m in metrics.METRIC_NAMES if m not in (metrics.UNITS_FAILED, metrics.ROWS_RESCORED)]
    assert {f"ray_{m}" for m in recorded} <= exported
    assert all(
        dict(tags).keys() <= {metrics.MODEL_TAG, metrics.STATUS_TAG, metrics.STAGE_TAG, "le"}
        for _, tags in values
    )
