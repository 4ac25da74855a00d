"""The audit on a real Ray that requires a token (Ray's token authentication, what KubeRay's `authOptions` sets up):
a 2-node LocalRayCluster with RAY_AUTH_MODE=token and a token of its own, shared by this module's tests.

- With the token, `auditor audit --address` and `ray job submit … jobs/audit.py` (reading and writing S3) complete.
- Without it, or with a wrong one, the jobs API answers 401 / 403, `ray job submit` is refused and runs nothing, and
  `auditor audit` exits 2 with one line that says what to set, no traceback.
- The token reaches no output: not the audit's files, the report, the logs (the CLI's, the job's, every file of the
  cluster's session folder) or the metrics the nodes export.
(The drills run on LocalRayCluster too, so they kill and resume audits with token authentication on.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from audit_corpus import captions
from ray_cluster import RAY_BIN, LocalRayCluster

from auditor import schema

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_ray_cluster("drills")]
REPO = Path(__file__).resolve().parents[2]
WRONG_TOKEN = "0" * 64


@pytest.fixture(scope="module")
def auth_cluster(s3_endpoint):
    """Head (1 CPU, dashboard and jobs API on) + a second raylet (2 CPUs); the nodes inherit moto's credentials.
    The token is in RAY_AUTH_TOKEN of every node and driver, as KubeRay's authOptions sets it: the leak search
    below then also covers anything that records a process's environment."""
    with LocalRayCluster(head_cpus=1, worker_cpus=2, dashboard=True, token_in_env=True) as cluster:
        yield cluster


def client_env(cluster: LocalRayCluster, token: str, home: Path) -> dict[str, str]:
    """A driver's environment: the right token ("good"), none ("missing": RAY_AUTH_MODE unset, a HOME without
    ~/.ray/auth_token) or a wrong one ("wrong")."""
    env = cluster.driver_env()
    if token == "good":
        return env
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env["HOME"] = str(home)
    if token == "wrong":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=WRONG_TOKEN)
    return env


def jobs_api_status(cluster: LocalRayCluster, token: str | None) -> int:
    request = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def job_submit(cluster: LocalRayCluster, env: dict[str, str], working_dir: Path, *entrypoint: str):
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # the jobs API by URL, not the GCS
    command = [
        RAY_BIN,
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--working-dir",
        str(working_dir),
    ]
    for _ in range(30):  # the jobs API answers before the head's job agent is up ("No available agent"): wait
        done = subprocess.run(
            [*command, "--", *entrypoint], env=env, capture_output=True, text=True, timeout=600
        )
        if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(2)
    return done


def audit_cli(cluster: LocalRayCluster, env: dict[str, str], *argv: str):
    command = [sys.executable, "-m", "auditor", "audit", *argv, "--address", cluster.address]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def jobs_dir(tmp_path) -> Path:
    """A working dir with jobs/ only: auditor itself is installed (and on every node's path already)."""
    shutil.copytree(REPO / "jobs", tmp_path / "workdir" / "jobs")
    return tmp_path / "workdir"


def test_the_audit_and_a_ray_job_complete_with_the_token_and_leave_it_nowhere(
    auth_cluster, s3_endpoint, micro_model_dir, micro_scorer, jobs_dir, tmp_path
):
    cluster, token = auth_cluster, auth_cluster.token
    common = ["--model", str(micro_model_dir), "--threshold", "0", "--dtype", "fp32", "--quiet"]
    outputs: list[str] = []

    # 1. `auditor audit --address`, a driver with the cluster's token.
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(captions("a photo of a", 12)) + "\n")
    out = tmp_path / "out"
    done = audit_cli(cluster, client_env(cluster, "good", tmp_path), str(corpus), str(out), *common)
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(out / "scores").to_pylist()
    assert len(rows) == 12 and all(r[schema.STATUS] == "ok" and r[schema.FLAGGED] for r in rows)

    # 2. `ray job submit` with the token: jobs/audit.py reads and writes S3 (moto) on the cluster.
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("auth-job")
    fs.pipe(
        "auth-job/in/part-0.jsonl",
        "".join(json.dumps({"caption": c}) + "\n" for c in captions("a cat", 9)).encode(),
    )
    assert jobs_api_status(cluster, token) == 200
    submit = job_submit(
        cluster, client_env(cluster, "good", tmp_path), jobs_dir,
        sys.executable, "jobs/audit.py", "s3://auth-job/in/", "s3://auth-job/out",
        "--storage-option", f"endpoint_url={s3_endpoint}", *common,
    )  # fmt: skip
    outputs += [submit.stdout, submit.stderr]
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    job_rows = pq.read_table("auth-job/out/scores", filesystem=fs).num_rows
    assert job_rows == 9
    s3_copy = tmp_path / "s3-out"
    fs.get("auth-job/out", str(s3_copy), recursive=True)
    assert (s3_copy / "report.html").exists()
    assert json.loads((s3_copy / "_audit.json").read_text())["model_fingerprint"] == micro_scorer.fingerprint

    # 3. The token is in none of it: outputs, report, logs, the session folder of every node, the metrics.
    metrics = []
    for ports in (cluster.head_ports, cluster.worker_ports):
        with urllib.request.urlopen(
            f"http://127.0.0.2:{ports.metrics_export}/metrics", timeout=30
        ) as response:
            metrics.append(response.read().decode())
    assert all("ray_" in text for text in metrics)
    assert [i for i, text in enumerate(outputs + metrics) if token in text] == []
    token_file = cluster.token_file  # the test's own copy, which no Ray process reads here
    assert "RAY_AUTH_TOKEN_PATH" not in cluster.driver_env()
    searched = [p for root in (out, s3_copy, cluster.temp_dir) for p in root.rglob("*") if p.is_file()]
    assert len(searched) > 20
    leaks = [str(p) for p in searched if p != token_file and token.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.parametrize("token", ["missing", "wrong"])
def test_a_driver_without_the_token_is_refused(auth_cluster, micro_model_dir, jobs_dir, tmp_path, token):
    cluster = auth_cluster
    env = client_env(cluster, token, tmp_path)

    # 1. The jobs API itself: 401 without a bearer token, 403 with a wrong one.
    assert jobs_api_status(cluster, None if token == "missing" else WRONG_TOKEN) == (
        401 if token == "missing" else 403
    )

    # 2. `ray job submit` is refused and runs nothing (its entrypoint would write a marker).
    marker = tmp_path / "ran"
    submit = job_submit(cluster, env, jobs_dir, sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    refusal = "Missing authentication token" if token == "missing" else "Invalid authentication token"
    assert submit.returncode != 0 and "ray.exceptions.AuthenticationError" in submit.stderr, submit.stderr[
        -2000:
    ]
    assert refusal in submit.stderr, submit.stderr[-2000:]
    assert not marker.exists()

    # 3. `auditor audit --address`: exit 2 and one line that says what to set; nothing scored.
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a photo of a cat\n")
    done = audit_cli(
        cluster, env, str(corpus), str(tmp_path / "out"), "--model", str(micro_model_dir), "--threshold", "0"
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("auditor audit: error:")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1], done.stderr[-3000:]
    assert f"the Ray cluster at {cluster.address} requires token authentication" in errors[0]
    assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token>" in errors[0]
    assert ("sends no token" if token == "missing" else "it refused this driver's token") in errors[0]
    assert WRONG_TOKEN not in done.stderr + done.stdout
    assert not (tmp_path / "out" / "scores").exists()
