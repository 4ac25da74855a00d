"""Audit and filter reading from and writing to S3 (a moto server on 127.0.0.1), in-process and as a Ray Job."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import s3fs
from audit_corpus import captions
from pyarrow.fs import FSSpecHandler, PyFileSystem

from auditor import schema
from auditor.config import AuditConfig, FilterConfig
from auditor.errors import ConfigError
from tests.scores_close import assert_scores_close

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def upload_corpus(fs: s3fs.S3FileSystem, bucket: str) -> list[str]:
    fs.mkdir(bucket)
    texts = captions("a photo of a", 25)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"caption": texts[:15]}), buffer)
    fs.pipe(f"{bucket}/captions/part-0.parquet", buffer.getvalue())
    fs.pipe(
        f"{bucket}/captions/part-1.jsonl",
        "".join(json.dumps({"caption": t}) + "\n" for t in texts[15:]).encode(),
    )
    return texts


def read_scores(fs: s3fs.S3FileSystem, path: str) -> pa.Table:
    return pads.dataset(path, filesystem=PyFileSystem(FSSpecHandler(fs)), partitioning="hive").to_table()


def test_audit_and_filter_on_s3(ray_local, s3_endpoint, micro_model_dir, micro_scorer):
    from auditor.pipeline.audit import run
    from auditor.pipeline.filter import run_filter

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    texts = upload_corpus(fs, "audit-bucket")
    reference = dict(zip(texts, micro_scorer.score(texts).tolist(), strict=True))
    threshold = float(np.median(list(reference.values())))
    options = {"endpoint_url": s3_endpoint}
    cfg = AuditConfig(
        inputs=("s3://audit-bucket/captions/",), output="s3://audit-bucket/runs/r1", model=str(micro_model_dir),
        threshold=threshold, storage_options=options, dtype="fp32", quiet=True,
    )  # fmt: skip
    assert run(cfg).exit_code == 0
    rows = read_scores(fs, "audit-bucket/runs/r1/scores").to_pylist()
    assert len(rows) == 25 and {r["source"] for r in rows} == {
        "s3://audit-bucket/captions/part-0.parquet", "s3://audit-bucket/captions/part-1.jsonl"
    }  # fmt: skip
    assert_scores_close([r["score"] for r in rows], [reference[r["caption"]] for r in rows])
    assert fs.exists("audit-bucket/runs/r1/_audit.json") and fs.exists("audit-bucket/runs/r1/flagged")
    assert run(cfg).files_skipped == 2  # resume state lives in the bucket too

    result = run_filter(
        FilterConfig(inputs=("s3://audit-bucket/captions/",), audit_output="s3://audit-bucket/runs/r1",
                     output="s3://audit-bucket/clean", storage_options=options, quiet=True)
    )  # fmt: skip
    flagged = sum(r["flagged"] for r in rows)
    assert result.counts["written"] == 25 - flagged and result.counts["unaudited"] == 0
    assert sorted(fs.ls("audit-bucket/clean")) == [
        "audit-bucket/clean/_filter.json", "audit-bucket/clean/part-0.parquet", "audit-bucket/clean/part-1.parquet"
    ]  # fmt: skip


def test_unreachable_endpoint_is_a_config_error(micro_model_dir):
    from auditor.pipeline.plan import plan_audit

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    cfg = AuditConfig(
        inputs=("s3://nowhere-bucket/in/",), output="s3://nowhere-bucket/out", model=str(micro_model_dir),
        storage_options={"endpoint_url": f"http://127.0.0.1:{closed_port}"},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"cannot list INPUT s3://nowhere-bucket/in/ .*endpoint_url"):
        plan_audit(cfg)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.own_ray_cluster("ray_local")  # one node: beside the session's local Ray, not the drills
def test_ray_job_submit_reads_and_writes_s3(s3_endpoint, micro_model_dir, micro_scorer, tmp_path_factory):
    """`ray job submit -- python jobs/audit.py ...` against a local Ray head this test starts and stops."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    upload_corpus(fs, "job-bucket")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs_port, dashboard_port = free_port(), free_port()
    # Every port of its own: the session's Ray (or another one on this machine) already holds the defaults, and a
    # dashboard agent that cannot bind its port leaves the head unable to take jobs ("No available agent").
    own_ports = [
        f"--{name}={free_port()}"
        for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                     "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    ]  # fmt: skip
    # A private temp dir keeps this head out of /tmp/ray, so no other `ray.init()` on the machine joins it.
    temp_dir = tmp_path_factory.mktemp("rayjob", numbered=True)
    short_temp = Path("/tmp") / f"rj{os.getpid()}"
    short_temp.symlink_to(temp_dir)  # Unix socket paths must stay short
    # A throwaway loopback cluster: no token auth (else head and client must share a token file).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--disable-usage-stats",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={short_temp}", *own_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [ray_bin, "job", "list", "--address", address], env=env, capture_output=True, timeout=60
            )
            if probe.returncode == 0:
                break
            time.sleep(1)
        command = [
            ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
            sys.executable, "jobs/audit.py", "s3://job-bucket/captions/", "s3://job-bucket/runs/job1",
            "--model", str(micro_model_dir), "--storage-option", f"endpoint_url={s3_endpoint}", "--dtype", "fp32",
            "--threshold", "0", "--quiet",
        ]  # fmt: skip
        # The dashboard answers before the node's job agent is up ("No available agent"): retry only that.
        for _ in range(30):
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
            if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    finally:
        os.killpg(head.pid, 15)  # SIGTERM: `ray start --block` stops the processes of this head only
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait(timeout=30)
        short_temp.unlink()
    rows = read_scores(fs, "job-bucket/runs/job1/scores").to_pylist()
    assert len(rows) == 25 and all(r[schema.FLAGGED] for r in rows)
    audit = json.loads(fs.cat("job-bucket/runs/job1/_audit.json"))
    assert audit["model_fingerprint"] == micro_scorer.fingerprint
