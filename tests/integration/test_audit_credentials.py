"""No credential in any output: an audit of inputs named by URLs that carry their own (userinfo on a local
http.server, an S3 presigned URL from the moto server) and an endpoint_url with userinfo, then every byte under
OUTPUT, the filter's and the report's outputs, the run's log, the Ray workers' logs and the metrics the node exports
searched for each secret, the local Ray's auth token among them. A rerun with rotated credentials commits nothing:
an input's identity is its URI without them. (On a cluster that requires a token: test_audit_token_auth.py.)
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import shutil
import sys
import threading
import urllib.request
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import s3fs
from audit_corpus import captions
from botocore.config import Config
from packaging.version import Version

from auditor import schema
from auditor.cli import main as cli_main

pytestmark = pytest.mark.integration

USER, PASSWORD = "reader-7f3a", "userinfo-pw-91c2e"
KEY_ID, KEY_ID_ROTATED = "AKIAPRESIGNED0A7E", "AKIAROTATED00B8F"
ENDPOINT_SECRET = "endpoint-pw-5d4b1"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the test server's own access log is no output of the audit
        pass


@pytest.fixture
def http_host(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "drawings.txt").write_text("\n".join(captions("a drawing of a", 6)) + "\n")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=root)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def presigned(endpoint: str, key_id: str) -> str:
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key="presign-secret",
        region_name="us-east-1", config=Config(signature_version="s3v4"),
    )  # fmt: skip
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": "signed-inputs", "Key": "part/captions.jsonl"}, ExpiresIn=3600
    )


def signature(url: str) -> str:
    return url.split("X-Amz-Signature=")[1].split("&")[0]


def leaks(root: Path, secrets: list[str]) -> list[str]:
    """'<file>: <secret>' for every secret found in any file under root: its raw bytes, and for parquet files
    every value decoded (a compressed or dictionary-encoded string is not in the raw bytes)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        texts = [path.read_bytes().decode("latin-1")]
        if path.suffix == ".parquet":
            texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
        found += [f"{path}: {s}" for s in secrets for text in texts if s in text]
    return found


def ray_token() -> str | None:
    """The token of this process's Ray when token authentication is on (Ray 2.60 turns it on for a local Ray)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).read_text().strip()


def run_cli(argv: list[str], monkeypatch, capfd, caplog) -> tuple[int, str]:
    """`auditor <argv>` in this process (the session's local Ray), with sys.argv as a shell would set it; returns
    (exit code, everything it printed and logged)."""
    monkeypatch.setattr(sys, "argv", ["auditor", *argv])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli_main(argv)
    out, err = capfd.readouterr()
    return code, out + err + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


def test_signed_and_userinfo_inputs_leave_no_credential_and_rotation_redoes_nothing(
    ray_local, s3_endpoint, http_host, micro_model_dir, tmp_path, monkeypatch, capfd, caplog
):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log, in this process
    s3 = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    s3.mkdir("signed-inputs")
    s3.pipe(
        "signed-inputs/part/captions.jsonl",
        "".join(json.dumps({"caption": c}) + "\n" for c in captions("a photo of a", 5)).encode(),
    )
    local = tmp_path / "local.csv"
    local.write_text("caption\n" + "\n".join(captions("a painting of a", 4)) + "\n")
    userinfo = f"http://{USER}:{PASSWORD}@{http_host}/drawings.txt"
    signed = presigned(s3_endpoint, KEY_ID)
    out, logs = tmp_path / "out", []
    common = ["--model", str(micro_model_dir), "--threshold", "0", "--dtype", "fp32", "--quiet"]
    secrets = [PASSWORD, KEY_ID, signature(signed), ENDPOINT_SECRET]
    if Version(ray_local.__version__) >= Version("2.60"):  # its local Ray requires a token: no leak either
        secrets.append(ray_token())
        assert secrets[-1] and len(secrets[-1]) >= 32

    # 1. The audit reads all three inputs; sources, ids, shards and the ledger name them without credentials.
    code, log = run_cli(
        ["audit", str(local), userinfo, signed, str(out), *common], monkeypatch, capfd, caplog
    )
    logs.append(log)
    assert code == 0, log
    scores = pq.read_table(out / "scores").to_pylist()
    host, moto_host = http_host, s3_endpoint.removeprefix("http://")
    assert {r[schema.SOURCE] for r in scores} == {
        str(local), f"http://{host}/drawings.txt", f"http://{moto_host}/signed-inputs/part/captions.jsonl"
    }  # fmt: skip
    assert len(scores) == 15 and all(r[schema.STATUS] == "ok" and r[schema.FLAGGED] for r in scores)
    assert all(r[schema.ID] == f"{r[schema.SOURCE]}:{r[schema.ROW]}" for r in scores)
    assert leaks(out, secrets) == []

    # 2. Fresh credentials for the same objects: the same inputs, nothing committed, nothing redone.
    rotated_userinfo = f"http://{USER}:{PASSWORD}-rotated@{http_host}/drawings.txt"
    rotated = presigned(s3_endpoint, KEY_ID_ROTATED)
    assert signature(rotated) != signature(signed)
    secrets += [f"{PASSWORD}-rotated", KEY_ID_ROTATED, signature(rotated)]
    code, log = run_cli(
        ["audit", str(local), rotated_userinfo, rotated, str(out), *common], monkeypatch, capfd, caplog
    )
    logs.append(log)
    summary = json.loads((out / "_audit.json").read_text())
    assert code == 0 and summary["units"]["committed_this_run"] == 0, log
    assert summary["files"]["skipped_complete"] == 3 and summary["files"]["complete_in_output"] == 3
    assert leaks(out, secrets) == []

    # 3. An endpoint_url with userinfo (unused by local files, recorded all the same): redacted in _audit.json
    # (config and argv) and report.html.
    option = f"endpoint_url=http://{KEY_ID}:{ENDPOINT_SECRET}@127.0.0.1:9"
    code, log = run_cli(
        ["audit", str(local), str(out), *common, "--storage-option", option], monkeypatch, capfd, caplog
    )
    logs.append(log)
    summary = json.loads((out / "_audit.json").read_text())
    assert code == 0 and summary["config"]["storage_options"] == {"endpoint_url": "http://127.0.0.1:9"}, log
    assert "endpoint_url=http://127.0.0.1:9" in summary["argv"] and (out / "report.html").exists()
    assert leaks(out, secrets) == []

    # 4. filter with the rotated URLs matches every row to its audit row; report --against another output.
    filtered = tmp_path / "filtered"
    code, log = run_cli(
        ["filter", rotated_userinfo, rotated, str(out), str(filtered), "--mode", "mark", "--quiet"],
        monkeypatch, capfd, caplog,
    )  # fmt: skip
    logs.append(log)
    result = json.loads((filtered / "_filter.json").read_text())
    assert code == 0 and result["counts"]["unaudited"] == 0 and result["counts"]["flagged"] == 11, log
    assert sorted(p.name for p in filtered.glob("*.parquet")) == ["captions.parquet", "drawings.parquet"]
    shutil.copytree(out, tmp_path / "before")
    code, log = run_cli(
        ["report", str(out), "--against", str(tmp_path / "before"), "--out", str(tmp_path / "cmp.html")],
        monkeypatch, capfd, caplog,
    )  # fmt: skip
    logs.append(log)
    assert code == 0 and (tmp_path / "cmp.html").exists(), log
    for root in (filtered, tmp_path / "before", out):
        assert leaks(root, secrets) == []
    assert [s for s in secrets if s in (tmp_path / "cmp.html").read_text()] == []
    assert [s for s in secrets for log in logs if s in log] == []
    # The workers' log lines (Ray keeps them in its session's log folder; this Ray does not send them to the
    # driver): the read, tokenize, score and write stages of these runs logged there.
    node = ray_local._private.worker._global_node
    ray_logs = Path(node.get_logs_dir_path())
    assert list(ray_logs.glob("worker-*.err")) and leaks(ray_logs, secrets) == []
    # The metrics the node exports (the score actors' and the driver's among Ray's own).
    with urllib.request.urlopen(
        f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=30
    ) as response:
        metrics = response.read().decode()
    assert "ray_" in metrics  # Ray's own; the auditor's appear once the agent's report interval passed
    assert [s for s in secrets if s in metrics] == []
