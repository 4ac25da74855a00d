"""Fault drills (issue 13) on a real 2-node Ray: whatever breaks, rerunning the same command leaves every input row
in OUTPUT/scores exactly once.

Each drill runs `auditor audit ... --address <cluster>` as a subprocess driver against one local cluster (a head
with 1 CPU and a second raylet with 2 CPUs, shared by the module), applies one fault, reruns the same command
where needed, and checks:
- every input row is in OUTPUT/scores exactly once (pyarrow dataset, hive partitioning);
- nothing uncommitted is visible: every part file a reader sees holds exactly its unit's rows, whenever we look;
- the ledger never claims a unit whose part file is missing;
- _audit.json's counts agree with the output.
The rows each scoring actor takes in are recorded (drill_hooks/sitecustomize.py), so every drill also measures
the rows scored more than once; it prints them with the rows lost and duplicated, and the module ends with the
table README's "Reliability" section quotes (run with -s to see it).
The drill that kills the second node runs last, and leaves the cluster with two nodes again.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from audit_corpus import captions
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray_cluster import LocalRayCluster
from tcp_proxy import PausableTcpProxy

from auditor import schema
from auditor.io.ledger import DONE, FAILED, Ledger
from auditor.io.storage import filesystem_for

pytestmark = pytest.mark.integration

UNIT_ROWS = 8  # rows per work unit; every corpus file has row groups of this size, so unit = row // UNIT_ROWS
SCORE_ACTOR = "MapWorker(MapBatches(ScoreActor))"  # the score actor's class name in Ray's actor table
HOOKS = Path(__file__).with_name("drill_hooks")
RUN_TIMEOUT_S = 420
# A line of Ray's C++ log at level E(rror), as a driver prints it: "[2026-12-06 03:37:03,920 E 8544 8544] file.cc:...".
RAY_ERROR_LINE = re.compile(r"^\[[\d-]+ [\d:,]+ E \d+ \d+\] ")
# The one README's Reliability section explains: Ray Data passes every actor pool its transform by reference.
EXPLAINED_RAY_ERROR = f"'{SCORE_ACTOR}' and ID: "
EXPLAINED_RAY_ERROR_TAIL = "has constructor arguments in the object store and max_restarts > 0."
# drill -> what was measured; printed as one table when the module ends.
RESULTS: dict[str, dict[str, Any]] = {}


# 1. Corpus, cluster and driver ---------------------------------------------------------------------------------
@dataclass
class Corpus:
    inputs: str  # INPUT as the audit gets it: a folder, or an s3:// prefix
    rows: dict[str, int]  # source (as the output writes it) -> rows; every row a good caption

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def total_units(self) -> int:
        return sum(-(-n // UNIT_ROWS) for n in self.rows.values())


def corpus_tables(name: str, files: int, units: int) -> dict[str, pa.Table]:
    return {
        f"part-{i:02d}.parquet": pa.table(
            {"caption": captions(f"{name} file {i} shows a", units * UNIT_ROWS)}
        )
        for i in range(files)
    }


def write_corpus(folder: Path, files: int, units: int) -> Corpus:
    folder.mkdir(parents=True)
    rows = {}
    for file_name, table in corpus_tables(folder.parent.name, files, units).items():
        pq.write_table(table, folder / file_name, row_group_size=UNIT_ROWS)
        rows[str(folder / file_name)] = table.num_rows
    return Corpus(str(folder), rows)


@dataclass
class Drills:
    """The module's cluster, and where the drill hook records the rows the score actors take in."""

    cluster: LocalRayCluster
    scored_dir: Path

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        """`auditor audit ARGS --address <cluster>` in the background; stdout and stderr appended to log."""
        command = [sys.executable, "-m", "auditor", "audit", *args, "--address", self.cluster.address]
        with open(log, "ab") as out:
            out.write(f"\n$ {' '.join(command)}\n".encode())
            return subprocess.Popen(
                command, env=self.cluster.driver_env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def run(self, args: list[str], log: Path) -> int:
        driver = self.start(args, log)
        return finish(driver, log)

    def scored(self, corpus: Corpus) -> Counter:
        """(source, row) -> times a score actor took the row in, over every run so far."""
        counts: Counter = Counter()
        for path in self.scored_dir.glob("*.tsv"):
            for line in path.read_text().split("\n")[:-1]:  # a line being appended has no newline yet
                source, row, _ = line.rsplit("\t", 2)
                if source in corpus.rows:
                    counts[source, int(row)] += 1
        return counts


@pytest.fixture(scope="module")
def drills(s3_endpoint, tmp_path_factory) -> Drills:
    """One 2-node cluster for every drill. After the S3 server fixture, so its nodes inherit the credentials."""
    scored_dir = tmp_path_factory.mktemp("scored")
    env = {"PYTHONPATH": str(HOOKS), "AUDITOR_DRILL_SCORED_DIR": str(scored_dir), "OMP_NUM_THREADS": "1"}
    with LocalRayCluster(head_cpus=1, worker_cpus=2, env=env) as cluster:
        yield Drills(cluster, scored_dir)
    print_results()


def audit_args(corpus: Corpus, output: str, model: Path, *extra: str) -> list[str]:
    return [
        corpus.inputs, output, "--model", str(model), "--generations", "4", "--batch-size", "4", "--dtype", "fp32",
        "--unit-rows", str(UNIT_ROWS), "--no-report", "--quiet", "--progress-interval", "5", *extra,
    ]  # fmt: skip


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


def last_run(log: Path) -> str:
    """What the latest driver writing to log printed (Ray may print pages after the CLI's last line)."""
    text = log.read_text(errors="replace")
    return text[text.rfind("\n$ ") :]


def finish(driver: subprocess.Popen, log: Path, timeout_s: float = RUN_TIMEOUT_S) -> int:
    try:
        return driver.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        raise AssertionError(f"the audit did not end within {timeout_s} s:\n{tail(log)}") from None


def wait_until(condition: Callable[[], bool], driver: subprocess.Popen, log: Path, what: str) -> float:
    """Poll until condition() holds; returns the seconds waited. Fails if the driver exits first."""
    started = time.monotonic()
    while not condition():
        if driver.poll() is not None:
            raise AssertionError(f"the audit exited ({driver.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() - started > RUN_TIMEOUT_S:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            raise AssertionError(f"no {what} within {RUN_TIMEOUT_S} s:\n{tail(log)}")
        time.sleep(0.05)
    return time.monotonic() - started


# 2. What a reader and the ledger see ----------------------------------------------------------------------------
@dataclass
class OutputView:
    """OUTPUT as a downstream reader sees it: the part files under scores/, the ledger, _audit.json."""

    output: str
    storage_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem_for(self.output, self.storage_options)
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache()

    def parts(self) -> dict[tuple[str, int], pa.Table]:
        """(shard, unit) -> the (source, row) of every visible part file, as pyarrow dataset lists them."""
        self.fs.invalidate_cache()
        root = f"{self.path}/scores"
        if not self.fs.exists(root):
            return {}
        dataset = pads.dataset(
            root, filesystem=PyFileSystem(FSSpecHandler(self.fs)), format="parquet", partitioning="hive"
        )
        parts = {}
        for fragment in dataset.get_fragments():
            folder, name = fragment.path.rsplit("/", 2)[-2:]
            key = (folder.removeprefix(f"{schema.SHARD}="), int(name.removeprefix("part-u").split(".")[0]))
            parts[key] = fragment.to_table(columns=[schema.SOURCE, schema.ROW])
        return parts

    def records(self) -> dict[tuple[str, int], dict[str, Any]]:
        self.fs.invalidate_cache()
        return Ledger(self.fs, self.path).entries()

    def done_units(self) -> set[tuple[str, int]]:
        try:
            records = self.records()
        except FileNotFoundError:  # listed, then folded into a snapshot by the run's end: look again
            records = self.records()
        return {key for key, record in records.items() if record["status"] == DONE}

    def audit(self) -> dict[str, Any]:
        with self.fs.open(f"{self.path}/_audit.json", "rb") as fh:
            return json.load(fh)


def check_visible(view: OutputView, corpus: Corpus) -> int:
    """Nothing uncommitted is visible and the ledger claims nothing missing; returns the visible rows.

    Every visible part file holds exactly the rows of its unit (once each), and every unit the ledger records as
    done has its part file, with the rows the record counts.
    """
    parts = view.parts()
    seen: Counter = Counter()
    for (shard, unit), table in parts.items():
        sources = set(table.column(schema.SOURCE).to_pylist())
        assert len(sources) == 1, f"part {shard} u{unit} mixes sources {sources}"
        (source,) = sources
        first = unit * UNIT_ROWS
        expected = list(range(first, min(first + UNIT_ROWS, corpus.rows[source])))
        assert sorted(table.column(schema.ROW).to_pylist()) == expected, f"part {shard} u{unit} is not whole"
        seen.update((source, row) for row in expected)
    assert not [key for key, n in seen.items() if n > 1], "a row is visible twice"
    shards = {record["source"]: record["shard"] for record in view.records().values()}
    for (source, unit), record in view.records().items():
        if record["status"] == DONE:
            part = parts.get((shards[source], unit))
            assert part is not None, f"the ledger claims {source} unit {unit}, whose part file is missing"
            assert part.num_rows == record["rows"]
    return sum(seen.values())


def count_rows(view: OutputView, corpus: Corpus) -> tuple[int, int]:
    """(input rows missing from OUTPUT/scores, rows present more than once)."""
    parts = view.parts()
    table = pa.concat_tables(parts.values()) if parts else pa.table({schema.SOURCE: [], schema.ROW: []})
    seen = Counter(
        zip(table.column(schema.SOURCE).to_pylist(), table.column(schema.ROW).to_pylist(), strict=True)
    )
    expected = {(source, row) for source, n in corpus.rows.items() for row in range(n)}
    return len(expected - set(seen)), sum(n - 1 for n in seen.values() if n > 1) + len(set(seen) - expected)


def check_complete(view: OutputView, corpus: Corpus, rows_this_run: int) -> tuple[int, int]:
    """Every input row exactly once, and _audit.json of the last (completing) run agrees. Returns (lost, dup)."""
    check_visible(view, corpus)
    lost, duplicated = count_rows(view, corpus)
    assert (lost, duplicated) == (0, 0), f"{lost} rows lost, {duplicated} duplicated"
    audit = view.audit()
    assert "stopped" not in audit
    assert audit["counts"]["output_total"] == {
        "ok": corpus.total_rows,
        "rows": corpus.total_rows,
        "flagged": 0,
    }
    assert audit["counts"]["this_run"].get("rows", 0) == rows_this_run
    assert audit["units"]["done_in_output"] == corpus.total_units and audit["units"]["failed"] == []
    assert audit["files"]["complete_in_output"] == len(corpus.rows) and audit["files"]["failed"] == []
    return lost, duplicated


def done_rows(view: OutputView) -> int:
    return sum(r["rows"] for r in view.records().values() if r["status"] == DONE)


def rescored(counts: Counter) -> int:
    """Rows taken in by a score actor more than once: the work a fault cost."""
    return sum(n - 1 for n in counts.values() if n > 1)


def record(drill: str, **numbers: Any) -> None:
    RESULTS[drill] = numbers
    print(f"\nDRILL {drill}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def print_results() -> None:
    if not RESULTS:
        return
    print("\n| drill | outcome | exit codes | rows lost | rows duplicated | rows scored again |")
    print("|---|---|---|---|---|---|")
    for drill, n in sorted(RESULTS.items()):
        print(
            f"| {drill} | {n.get('outcome', '')} | {n.get('exit_codes', '')} | {n.get('lost', 0)} | "
            f"{n.get('duplicated', 0)} | {n.get('rescored', 0)} |"
        )


def wait_for_score_actors_to_exit(drills: Drills, timeout_s: float = 120.0) -> None:
    """Until no score actor of the cluster is alive: after its driver's SIGKILL an actor still runs the batches it
    had been sent, and appends their rows to its record file, until Ray stops the dead driver's job. Counted after
    that, a kill's rows are all in its own trial; counted before, the last of them (a batch, or the end of a line
    being written) fell into the next trial's and counted as scored twice there (a fresh clone's run, 2026-12-02:
    41 rows to redo for 5 units of 8)."""
    deadline = time.monotonic() + timeout_s
    while alive := [p.pid for p in drills.cluster.processes() if p.cmdline.startswith(f"ray::{SCORE_ACTOR}")]:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"score actors {alive} still alive {timeout_s:.0f} s after their driver died"
            )
        time.sleep(0.2)


def first_commit(view: OutputView) -> Callable[[], bool]:
    return lambda: bool(view.done_units())


# 3. The drills, in the order except (c), which kills the second node and so runs last -------------------
TRIALS = 10
TRIAL_SEED = 13
STARTUP_WINDOW_S = 8.0
MAX_BATCHES_AFTER_COMMIT = 8
BATCH_ROWS = 4  # --batch-size


@pytest.mark.slow
def test_a_driver_sigkilled_at_random_moments_then_rerun(drills, tmp_path, micro_model_dir):
    """(a) Ten SIGKILLs of the driver in a row on one output, each run resuming the one before, then a rerun.

    Moments, drawn with seed TRIAL_SEED: in trials 1, 5 and 9, a delay uniform in [0, STARTUP_WINDOW_S) s after the
    driver starts (planning, ledger reads, clearing old outputs, joining Ray, actors starting); in the others, once
    the run has committed its first unit, after 0 to MAX_BATCHES_AFTER_COMMIT more batches reach the score actor
    plus up to 0.5 s (units in flight, commit tasks moving parts, ledger writes). Counting batches, not seconds,
    keeps the moments in the same phase of the run on a fast or a loaded machine.
    """
    corpus = write_corpus(tmp_path / "in", files=8, units=8)
    output = str(tmp_path / "out")
    view = OutputView(output)
    args = audit_args(corpus, output, micro_model_dir)
    log = tmp_path / "audit.log"
    rng = random.Random(TRIAL_SEED)

    def taken_in() -> int:
        return sum(drills.scored(corpus).values())

    trials = []
    for trial in range(TRIALS):
        done_before = view.done_units()
        scored_before = drills.scored(corpus)
        driver = drills.start(args, log)
        started = time.monotonic()
        if trial % 4 == 0:
            anchor, delay = "start", rng.uniform(0, STARTUP_WINDOW_S)
        else:
            batches, delay = rng.randint(0, MAX_BATCHES_AFTER_COMMIT), rng.uniform(0, 0.5)
            anchor = f"first commit + {batches} batches"
            wait_until(lambda d=done_before: bool(view.done_units() - d), driver, log, "a commit")
            target = taken_in() + batches * BATCH_ROWS
            wait_until(lambda n=target: taken_in() >= n, driver, log, f"{batches} more batches")
        try:
            code = driver.wait(timeout=delay)
            raise AssertionError(f"trial {trial + 1}: the audit ended ({code}) before its kill:\n{tail(log)}")
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        moment = time.monotonic() - started
        # Right after the kill: whole units only, and nothing claimed that is not there.
        check_visible(view, corpus)
        wait_for_score_actors_to_exit(drills)
        done_after = view.done_units()
        taken = drills.scored(corpus) - scored_before
        units_taken = {(source, row // UNIT_ROWS) for source, row in taken}
        assert not units_taken & done_before, "a run scored rows of a unit committed before it started"
        in_flight = units_taken - done_after
        trials.append(
            {
                "killed_at_s": round(moment, 1),
                "anchor": anchor,
                "committed": len(done_after - done_before),
                "in_flight": len(in_flight),
                "rows_to_redo": sum(n for (s, r), n in taken.items() if (s, r // UNIT_ROWS) in in_flight),
            }
        )
        print(f"trial {trial + 1}: {trials[-1]}")
    rows_before = done_rows(view)
    assert drills.run(args, log) == 0, tail(log)
    lost, duplicated = check_complete(view, corpus, rows_this_run=corpus.total_rows - rows_before)
    counts = drills.scored(corpus)
    assert set(counts) == {(s, r) for s, n in corpus.rows.items() for r in range(n)}
    # What a kill costs: the rows of the units it left in flight, scored again by the next run; never more.
    assert all(t["rows_to_redo"] <= t["in_flight"] * UNIT_ROWS for t in trials)
    assert rescored(counts) <= sum(t["rows_to_redo"] for t in trials)
    assert sum(t["committed"] > 0 for t in trials) >= 3, f"too few kills landed mid-run: {trials}"
    record(
        "a", outcome=f"{TRIALS} kills in a row, each run resuming the last; the final rerun completed",
        exit_codes=f"{TRIALS} x SIGKILL, then 0", lost=lost, duplicated=duplicated, rescored=rescored(counts),
        rows=corpus.total_rows, rows_to_redo_max=max(t["rows_to_redo"] for t in trials),
        in_flight_max=max(t["in_flight"] for t in trials), unit_rows=UNIT_ROWS,
        rows_by_final_rerun=corpus.total_rows - rows_before,
    )  # fmt: skip


@pytest.mark.slow
def test_b_score_actor_killed_mid_batch_is_restarted(drills, tmp_path, tiny_model_dir):
    """(b) SIGKILL of the scoring actor's process while it scores a batch: Ray restarts the actor and retries the
    batch; the audit finishes with exit 0, no rerun.

    On the tiny model, not the micro one of the other drills: the kill has to land inside the batch it waits for,
    and a micro batch (~40 ms of one core) can end before this test's 50 ms poll sees it start. With the micro
    model (2026-12-02, one run) the kill fell between two batches and nothing was scored again (`0 < 0` below)."""
    corpus = write_corpus(tmp_path / "in", files=3, units=4)
    output = str(tmp_path / "out")
    view = OutputView(output)
    log = tmp_path / "audit.log"
    driver = drills.start(audit_args(corpus, output, tiny_model_dir), log)
    wait_until(lambda: bool(drills.scored(corpus)), driver, log, "scoring")
    (pid,) = drills.cluster.actor_pids(SCORE_ACTOR)
    # Kill the moment the actor takes in its next batch, so a batch is cut short.
    taken = sum(drills.scored(corpus).values())
    wait_until(lambda: sum(drills.scored(corpus).values()) > taken, driver, log, "the next batch")
    os.kill(pid, signal.SIGKILL)
    code = finish(driver, log)
    assert code == 0, tail(log)
    lost, duplicated = check_complete(view, corpus, rows_this_run=corpus.total_rows)
    scorers = {int(p.stem) for p in drills.scored_dir.glob("*.tsv") if corpus_rows_in(p, corpus)}
    assert pid in scorers and len(scorers) >= 2, f"no restarted actor scored: {scorers}"
    counts = drills.scored(corpus)
    assert 0 < rescored(counts) <= 2 * 4, (
        "more than the cut batch and the one queued behind it was scored again"
    )
    record(
        "b", outcome="Ray restarted the actor and retried its batch; finished", exit_codes="0",
        lost=lost, duplicated=duplicated, rescored=rescored(counts), rows=corpus.total_rows,
    )  # fmt: skip


def corpus_rows_in(path: Path, corpus: Corpus) -> bool:
    return any(line.rsplit("\t", 2)[0] in corpus.rows for line in path.read_text().splitlines())


OUTAGE_S = 5.0


@pytest.mark.slow
def test_d_s3_outage_mid_run(drills, s3_endpoint, tmp_path, micro_model_dir):
    """(d) The S3 endpoint goes away for OUTAGE_S seconds mid-run (inputs, staging, commits and ledger all on S3),
    then comes back with its objects, as a store does after a network blip or a restart.

    moto runs behind a TCP proxy that stops listening and resets every open connection, then listens again: a
    stopped moto would come back empty, which no real store does.
    """
    import s3fs

    store = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True, use_listings_cache=False)
    store.mkdir("drills-outage")
    rows = {}
    for name, table in corpus_tables("outage", files=3, units=4).items():
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=UNIT_ROWS)
        store.pipe(f"drills-outage/in/{name}", buffer.getvalue())
        rows[f"s3://drills-outage/in/{name}"] = table.num_rows
    corpus = Corpus("s3://drills-outage/in/", rows)
    output = "s3://drills-outage/out"
    view = OutputView(output, {"endpoint_url": s3_endpoint})
    log = tmp_path / "audit.log"
    host, port = s3_endpoint.removeprefix("http://").rsplit(":", 1)
    with PausableTcpProxy((host, int(port))) as proxy:
        args = audit_args(
            corpus, output, micro_model_dir, "--storage-option", f"endpoint_url=http://127.0.0.1:{proxy.port}"
        )
        driver = drills.start(args, log)
        wait_until(first_commit(view), driver, log, "the first commit")
        proxy.outage()
        time.sleep(OUTAGE_S)
        proxy.restore()
        codes = [finish(driver, log)]
        message = last_run(log)
        assert codes[0] in (0, 1, 3), message
        if codes[0] == 1:
            assert "FAILED s3://drills-outage/in/" in message
        if codes[0] == 3:
            assert "rerun the same command" in message
        check_visible(view, corpus)
        if codes[0] != 0:
            rows_before = done_rows(view)
            codes.append(drills.run(args, log))
            assert codes[-1] == 0, tail(log)
        else:
            rows_before = 0
    lost, duplicated = check_complete(view, corpus, rows_this_run=corpus.total_rows - rows_before)
    counts = drills.scored(corpus)
    record(
        "d", outcome={0: "retries carried it through", 1: "the units it hit failed (exit 1); the rerun completed",
                      3: "the run stopped (exit 3); the rerun completed"}[codes[0]],
        exit_codes=", then ".join(map(str, codes)), lost=lost, duplicated=duplicated, rescored=rescored(counts),
        rows=corpus.total_rows, outage_s=OUTAGE_S,
    )  # fmt: skip


@pytest.mark.slow
def test_e_output_that_refuses_writes(drills, tmp_path, micro_model_dir):
    """(e) OUTPUT refuses writes: at the start (a clear error before Ray starts), and scores/ mid-run (the units
    whose commit fails are failed units; the ledger never claims one of them; the rerun completes).

    As root, permission bits stop nothing, and read-only mounts or `chattr +i` need privileges CI may lack; moto
    does not enforce bucket policies. A regular file where a folder must be fails every write under it with an
    OSError for any user: the same error a read-only folder (EROFS, EACCES) or an S3 AccessDenied gives.
    """
    corpus = write_corpus(tmp_path / "in", files=3, units=4)
    log = tmp_path / "audit.log"
    # 1. Nothing under OUTPUT can be created.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where OUTPUT's parent folder should be")
    started = time.monotonic()
    code = drills.run(audit_args(corpus, str(blocker / "out"), micro_model_dir), log)
    message = last_run(log)
    assert code == 2, message
    assert f"OUTPUT {blocker / 'out'} cannot be written" in message and "NotADirectoryError" in message
    assert "Connected to Ray cluster" not in message and time.monotonic() - started < 60

    # 2. scores/ refuses writes from the first commit on: moved aside, a file in its place.
    output = tmp_path / "out"
    view = OutputView(str(output))
    args = audit_args(corpus, str(output), micro_model_dir)
    driver = drills.start(args, log)
    wait_until(first_commit(view), driver, log, "the first commit")
    (output / "scores").rename(output / "scores-aside")
    (output / "scores").write_text("refuses writes")
    code = finish(driver, log)
    message = last_run(log)
    (output / "scores").unlink()
    (output / "scores-aside").rename(output / "scores")
    assert code == 1, message
    # One line per failed unit, naming the error (not the commit task's traceback).
    failed_lines = [line for line in message.splitlines() if line.startswith("FAILED ")]
    assert failed_lines and all(": commit failed: NotADirectoryError: " in line for line in failed_lines)
    failed = [r for r in view.records().values() if r["status"] == FAILED]
    assert len(failed) == len(failed_lines)
    assert all(
        r["error"].startswith("commit failed: NotADirectoryError: ") and "\n" not in r["error"]
        for r in failed
    )
    check_visible(view, corpus)  # every unit the ledger calls done has its part file
    assert view.audit()["units"]["failed"]
    rows_before = done_rows(view)
    assert drills.run(args, log) == 0, tail(log)
    lost, duplicated = check_complete(view, corpus, rows_this_run=corpus.total_rows - rows_before)
    counts = drills.scored(corpus)
    record(
        "e", outcome="start: exit 2 before Ray; mid-run: failed units, ledger consistent; rerun completed",
        exit_codes="2; 1, then 0", lost=lost, duplicated=duplicated, rescored=rescored(counts),
        rows=corpus.total_rows, failed_units=len(failed),
    )  # fmt: skip


def test_output_that_refuses_writes_is_a_config_error(tmp_path):
    from auditor.errors import ConfigError
    from auditor.pipeline.audit import check_output_writable

    (tmp_path / "file").write_text("")
    fs, path = filesystem_for(str(tmp_path / "file" / "out"))
    with pytest.raises(
        ConfigError, match=r"OUTPUT .*/file/out cannot be written \(NotADirectoryError: .*check the"
    ):
        check_output_writable(fs, path, str(tmp_path / "file" / "out"))
    fs, path = filesystem_for(str(tmp_path / "out"))
    check_output_writable(fs, path, str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the probe leaves nothing behind


@pytest.mark.slow
def test_f_sigterm_stops_with_exit_3_then_the_rerun_completes(drills, tmp_path, micro_model_dir):
    """(f) SIGTERM to the driver (what `ray job stop` sends) after its first commit."""
    corpus = write_corpus(tmp_path / "in", files=3, units=4)
    output = str(tmp_path / "out")
    view = OutputView(output)
    log = tmp_path / "audit.log"
    args = audit_args(corpus, output, micro_model_dir)
    driver = drills.start(args, log)
    wait_until(first_commit(view), driver, log, "the first commit")
    driver.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    code = finish(driver, log)
    stop_s = time.monotonic() - stopping
    message = last_run(log)
    assert code == 3, message
    assert "stopped by SIGTERM" in message and "rerun the same command" in message
    assert not Path(output, "_lease.json").exists()  # released on SIGTERM
    # Nothing partial is visible, and every committed unit is recorded.
    committed = check_visible(view, corpus)
    audit = view.audit()
    assert audit["stopped"].startswith("stopped by SIGTERM")
    assert audit["counts"]["output_total"].get("rows", 0) == committed == done_rows(view) > 0
    assert audit["units"]["committed_this_run"] == len(view.done_units())
    assert drills.run(args, log) == 0, tail(log)
    lost, duplicated = check_complete(view, corpus, rows_this_run=corpus.total_rows - committed)
    counts = drills.scored(corpus)
    record(
        "f", outcome=f"exit 3 in {stop_s:.1f} s, committed units kept; the rerun completed", exit_codes="3, then 0",
        lost=lost, duplicated=duplicated, rescored=rescored(counts), rows=corpus.total_rows,
    )  # fmt: skip


def change_weights(model: Path) -> None:
    """Scale the UNet's weights by 1.1: same layout and configs, other scores, another fingerprint."""
    from safetensors.torch import load_file, save_file

    (path,) = (model / "unet").glob("*.safetensors")
    save_file({k: v * 1.1 for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def corrupt_last_row_group(path: Path) -> None:
    """Overwrite the data of the file's last row group; its footer stays valid, so only that unit fails."""
    metadata = pq.ParquetFile(path).metadata
    column = metadata.row_group(metadata.num_row_groups - 1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 10 : start + column.total_compressed_size - 4] = b"\xab" * (
        column.total_compressed_size - 14
    )
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_g_corrupt_file_fails_alone_and_a_changed_model_redoes_every_unit(drills, tmp_path, micro_model_dir):
    """(g) A parquet file whose last row group is corrupt, and the model's weights changed between two runs."""
    import shutil

    from auditor import Scorer
    from auditor.config import AuditConfig

    corpus = write_corpus(tmp_path / "in", files=2, units=2)
    bad = Path(corpus.inputs) / "z-bad.parquet"
    bad_captions = captions("a damaged file shows a", 3 * UNIT_ROWS)
    pq.write_table(pa.table({"caption": bad_captions}), bad, row_group_size=UNIT_ROWS)
    corrupt_last_row_group(bad)
    model = tmp_path / "model"
    shutil.copytree(micro_model_dir, model)
    output = str(tmp_path / "out")
    view = OutputView(output)
    log = tmp_path / "audit.log"
    args = audit_args(corpus, output, model)
    good_rows = Corpus(
        corpus.inputs, {**corpus.rows, str(bad): 2 * UNIT_ROWS}
    )  # the bad file's readable units

    def check_run(code: int, fingerprint_model: Path) -> dict[str, Any]:
        message = last_run(log)
        assert code == 1, message
        assert f"FAILED {bad} unit 2: OSError" in message
        # Run without a threshold: the last lines say that nothing could be flagged, and how to calibrate.
        assert (
            "so nothing could be flagged" in message
            and f"`auditor calibrate --model {model} --generations 4 " in message
        )
        # Ray's only error line is the harmless one README explains; a new one would need explaining too.
        ray_errors = [line for line in message.splitlines() if RAY_ERROR_LINE.match(line)]
        assert len(ray_errors) <= 1 and all(
            EXPLAINED_RAY_ERROR in line and EXPLAINED_RAY_ERROR_TAIL in line for line in ray_errors
        ), ray_errors
        audit = view.audit()
        assert [(f["source"], f["unit"]) for f in audit["units"]["failed"]] == [(str(bad), 2)]
        assert audit["counts"]["output_total"]["rows"] == good_rows.total_rows
        assert check_visible(view, good_rows) == good_rows.total_rows
        lost, duplicated = count_rows(view, good_rows)
        assert (lost, duplicated) == (0, 0)
        assert {r["fingerprint"] for r in view.records().values()} == {audit["run_fingerprint"]}
        # Every visible score is the current model's: nothing mixed with an earlier model's scores.
        table = pa.concat_tables(
            pq.read_table(p) for p in Path(output, "scores").rglob("part-*.parquet")
        ).to_pylist()
        cfg = AuditConfig(
            inputs=(corpus.inputs,), output=output, model=str(model), generations=4, dtype="fp32"
        )
        scorer = Scorer.from_pretrained(fingerprint_model, device="cpu", dtype="fp32")
        texts = [r["caption"] for r in table]
        reference = scorer.score(texts, generations=cfg.generations, steps=cfg.steps, seed=cfg.seed)
        for row, expected in zip(table, reference.tolist(), strict=True):
            assert abs(row["score"] - expected) <= 1e-4 * max(1.0, abs(expected)), row
        return audit

    first = check_run(drills.run(args, log), model)
    change_weights(model)
    second = check_run(drills.run(args, log), model)
    assert second["model_fingerprint"] != first["model_fingerprint"]
    assert second["counts"]["this_run"]["rows"] == good_rows.total_rows  # every unit redone
    counts = drills.scored(good_rows)
    record(
        "g", outcome="corrupt unit failed alone (exit 1) twice; changed model: every unit redone",
        exit_codes="1, then 1", lost=0, duplicated=0, rescored=rescored(counts), rows=good_rows.total_rows,
    )  # fmt: skip


# Drill (h): the TTL the stale-lease runs get (--lease-heartbeat-s 1); well above a driver's start-up on busy cores.
LEASE_TTL_S = 60


def lease_on_output(view: OutputView) -> dict[str, Any] | None:
    """OUTPUT/_lease.json as a reader sees it now, or None."""
    view.fs.invalidate_cache()
    try:
        return json.loads(view.fs.cat_file(f"{view.path}/_lease.json"))
    except FileNotFoundError:
        return None


def write_foreign_lease(view: OutputView, heartbeat_unix: float) -> dict[str, Any]:
    """A lease as a run on another host would have written it (its pid means nothing here)."""
    from auditor.io.lease import LeaseRecord, utc_iso

    record = LeaseRecord(
        run_id="drill-other-run", host="drill-other-host", pid=1, process_start=heartbeat_unix - 60,
        pid_namespace=None, started_at=utc_iso(heartbeat_unix - 60), heartbeat_at=utc_iso(heartbeat_unix),
        heartbeat_unix=heartbeat_unix,
    )  # fmt: skip
    view.fs.pipe_file(f"{view.path}/_lease.json", record.to_bytes())
    return json.loads(record.to_bytes())


FORCED_TRIES = 3  # runs of the lease drill's step 3 before a kill between two commits must have landed


def lease_drill(
    drills: Drills, corpus: Corpus, view: OutputView, args: list[str], log: Path
) -> dict[str, Any]:
    """(h) The steps of the lease drill on one OUTPUT (local or S3); returns what it measured."""
    import socket

    # 1. A second run of the same command while the first holds the lease: refused in seconds, before Ray.
    first = drills.start(args, log)
    wait_until(lambda: (lease_on_output(view) or {}).get("pid") == first.pid, first, log, "the lease")
    started = time.monotonic()
    second_log = log.with_name(f"second-{log.name}")  # the first run goes on writing to its own log
    second = drills.run(args, second_log)
    refused_s = time.monotonic() - started
    message = last_run(second_log)
    assert first.poll() is None, "the first run ended before the second was refused: use a larger corpus"
    assert second == 2, message
    (line,) = [line for line in message.splitlines() if "is in use by another audit" in line]
    assert line.startswith(f"auditor audit: error: OUTPUT {view.output} is in use by another audit: run ")
    assert f" on host {socket.gethostname()}, pid {first.pid}, started " in line and "last heartbeat" in line
    assert "--break-lease" in line
    assert "Connected to Ray cluster" not in message and refused_s < 60
    # 2. The first is not disturbed: exit 0, every row exactly once, and its lease deleted at the end.
    assert finish(first, log) == 0, tail(log)
    check_complete(view, corpus, rows_this_run=corpus.total_rows)
    assert lease_on_output(view) is None
    # 3. The holder SIGKILLed mid-run: a rerun on this host takes its lease over at once (its process is gone).
    # The kill must land between two commits. Ray Data can hand the driver every acknowledgement at once, so a run
    # may commit all its units within one poll (seen once in a loaded whole-suite run): such a run ended whole
    # (exit 0, nothing to check here), and the step is tried again, at most FORCED_TRIES times.
    for attempt in range(1, FORCED_TRIES + 1):
        forced = drills.start(
            [*args, "--force"], log
        )  # --force forgets every record first, then commits anew
        try:
            wait_until(
                lambda forced=forced: (lease_on_output(view) or {}).get("pid") == forced.pid
                and 0 < len(view.done_units()) < corpus.total_units,
                forced, log, "a commit of the forced run",
            )  # fmt: skip
            break
        except AssertionError:
            if forced.returncode != 0 or attempt == FORCED_TRIES:
                raise
    os.killpg(forced.pid, signal.SIGKILL)
    forced.wait()
    assert lease_on_output(view)["pid"] == forced.pid  # a SIGKILLed run cannot release its lease
    check_visible(view, corpus)
    rows_before = done_rows(view)
    started = time.monotonic()
    assert drills.run(args, log) == 0, tail(log)
    rerun_s = time.monotonic() - started
    message = last_run(log)
    assert (
        "took over the lease of run " in message
        and f"its process {forced.pid} on this host is gone" in message
    )
    lost, duplicated = check_complete(view, corpus, rows_this_run=corpus.total_rows - rows_before)
    assert lease_on_output(view) is None
    # 4. A lease of a run on another host: refused while its heartbeat is fresh, taken over after the TTL.
    ttl_args = [*args, "--lease-ttl-s", str(LEASE_TTL_S), "--lease-heartbeat-s", "1"]
    foreign = write_foreign_lease(view, time.time())
    assert drills.run(ttl_args, log) == 2, tail(log)
    message = last_run(log)
    assert (
        "is in use by another audit: run drill-other-run on host drill-other-host, pid 1, started " in message
    )
    # The holder stopped renewing: what its lease looks like a TTL later (as if the drill had waited that long).
    write_foreign_lease(view, foreign["heartbeat_unix"] - LEASE_TTL_S - 1)
    assert drills.run(ttl_args, log) == 0, tail(log)
    message = last_run(log)
    assert "took over the lease of run drill-other-run on host drill-other-host" in message
    assert f"(--lease-ttl-s {LEASE_TTL_S})" in message
    check_complete(view, corpus, rows_this_run=0)
    assert lease_on_output(view) is None
    return {"refused_s": round(refused_s, 1), "rerun_after_kill_s": round(rerun_s, 1), "lost": lost,
            "duplicated": duplicated, "rows": corpus.total_rows}  # fmt: skip


def record_lease_drill(drill: str, where: str, numbers: dict[str, Any], counts: Counter) -> None:
    record(
        drill, outcome=f"{where}: second run refused in {numbers['refused_s']} s (exit 2), the first finished; "
        "after SIGKILL the rerun took over at once; another host's stale lease taken after the TTL",
        exit_codes="0 beside 2; SIGKILL, then 0; 2, then 0", rescored=rescored(counts), **numbers,
    )  # fmt: skip


@pytest.mark.slow
def test_h_lease_one_audit_at_a_time_per_output(drills, tmp_path, micro_model_dir):
    """(h) Two audits on one OUTPUT (issue 18): an overlapping second run is refused fast (exit 2, naming the
    holder); the first finishes with exit 0 and every row exactly once; after SIGKILL of the holder a rerun on the
    same host takes over at once; a lease with a stale heartbeat from another host is taken over after the TTL."""
    corpus = write_corpus(tmp_path / "in", files=3, units=4)
    output = str(tmp_path / "out")
    view = OutputView(output)
    log = tmp_path / "audit.log"
    numbers = lease_drill(drills, corpus, view, audit_args(corpus, output, micro_model_dir), log)
    record_lease_drill("h", "local disk", numbers, drills.scored(corpus))


@pytest.mark.slow
def test_h_lease_on_s3(drills, s3_endpoint, tmp_path, micro_model_dir):
    """(h) on the moto S3 server: the lease is taken with PutObject IfNoneMatch="*" and renewed with IfMatch."""
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir("drills-lease")
    corpus = write_corpus(tmp_path / "in", files=3, units=4)
    output = "s3://drills-lease/out"
    view = OutputView(output, {"endpoint_url": s3_endpoint})
    log = tmp_path / "audit.log"
    args = audit_args(corpus, output, micro_model_dir, "--storage-option", f"endpoint_url={s3_endpoint}")
    numbers = lease_drill(drills, corpus, view, args, log)
    record_lease_drill("h-s3", "moto S3", numbers, drills.scored(corpus))


# Counted from the start of the run: on a loaded machine the score actor took over 60 s to import torch and load
# (exit 3 before the first commit, 2026-12-01). The watchdog's default is 900 s.
STALL_TIMEOUT_S = 120


@pytest.mark.slow
def test_c_second_node_killed_mid_run(drills, tmp_path, micro_model_dir):
    """(c) The second raylet and everything on it SIGKILLed after the first commit. The head has 1 CPU: when the
    score actor (restarted on the head) holds it, Ray cannot rebuild lost read outputs there, and the stall
    watchdog ends the run (exit 3); when the head's CPU is free, the audit may finish there. Either way the rerun,
    on a restarted second node, completes."""
    corpus = write_corpus(tmp_path / "in", files=4, units=4)
    output = str(tmp_path / "out")
    view = OutputView(output)
    log = tmp_path / "audit.log"
    args = audit_args(corpus, output, micro_model_dir, "--stall-timeout-s", str(STALL_TIMEOUT_S))
    driver = drills.start(args, log)
    try:
        wait_until(first_commit(view), driver, log, "the first commit")
        drills.cluster.kill_worker_node()
        killed = time.monotonic()
        codes = [finish(driver, log)]
        ended_s = time.monotonic() - killed
        message = last_run(log)
        assert codes[0] in (0, 1, 3), message
        if codes[0] == 1:  # commit tasks that ran on the lost node
            assert "FAILED " in message and "commit failed" in message, message
        if codes[0] == 3:
            assert "rerun the same command" in message, message
        check_visible(view, corpus)
        # The hang, on purpose: a run on the head alone, whose only CPU the score actor takes, so that no
        # read can run. It must end by itself, saying why and to rerun (or finish, if a read got the CPU first).
        alone_log = tmp_path / "head-alone.log"
        alone_args = audit_args(
            corpus, str(tmp_path / "out-head-alone"), micro_model_dir, "--stall-timeout-s", "20"
        )
        started = time.monotonic()
        alone = drills.run(alone_args, alone_log)
        alone_s = time.monotonic() - started
        alone_message = last_run(alone_log)
        assert alone in (0, 3), alone_message
        if alone == 3:
            assert (
                "nothing in the pipeline moved for" in alone_message and "last seen moving: " in alone_message
            )
            assert "Ray has 1 alive node(s) with CPU=1 in all" in alone_message
            assert "rerun the same command" in alone_message
    finally:
        drills.cluster.restart_worker_node()
    rows_before = 0
    if codes[0] != 0:
        rows_before = done_rows(view)
        codes.append(drills.run(args, log))
        assert codes[-1] == 0, tail(log)
    lost, duplicated = check_complete(view, corpus, rows_this_run=corpus.total_rows - rows_before)
    counts = drills.scored(corpus)
    first_outcome = {0: "finished on the head", 1: "some units failed", 3: "stall watchdog: exit 3"}[codes[0]]
    record(
        "c", outcome=f"{first_outcome} {ended_s:.0f} s after the kill" + ("; the rerun completed" if codes[1:] else ""),
        exit_codes=", then ".join(map(str, codes)), lost=lost, duplicated=duplicated, rescored=rescored(counts),
        rows=corpus.total_rows, stall_timeout_s=STALL_TIMEOUT_S,
        head_alone=f"exit {alone} after {alone_s:.0f} s (--stall-timeout-s 20)",
    )  # fmt: skip
