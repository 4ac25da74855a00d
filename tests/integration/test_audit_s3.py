"""Audit and filter reading from and writing to S3 (a moto server on 127.0.0.1), in-process. As a Ray Job (`ray job
submit`), on a Ray that requires a token: tests/integration/test_audit_token_auth.py."""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import s3fs
from audit_corpus import captions
from pyarrow.fs import FSSpecHandler, PyFileSystem

from auditor.config import AuditConfig, FilterConfig
from auditor.errors import ConfigError
from tests.scores_close import assert_scores_close

pytestmark = pytest.mark.integration


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
