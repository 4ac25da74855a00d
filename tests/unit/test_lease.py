"""OUTPUT's lease on a local disk (auditor.io.lease): exclusive create, refusal naming the holder, takeover of a dead
run's lease (same host and its process gone; heartbeat older than the TTL; --break-lease), release, and a run
that lost its lease noticing. S3 (moto) is in tests/integration/test_lease_s3.py."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from auditor.errors import AuditIncomplete, ConfigError
from auditor.io.lease import (
    LEASE_FILE,
    BestEffortLeaseStore,
    LeaseHeld,
    LeaseLost,
    LeaseRecord,
    LocalLeaseStore,
    OutputLease,
    holder_gone,
    lease_store,
    process_info,
    utc_iso,
)
from auditor.io.storage import filesystem_for


def lease_on(path, **options) -> OutputLease:
    fs, output_path = filesystem_for(str(path))
    kwargs = {"ttl_s": 120.0, "heartbeat_s": 15.0, **options}
    return OutputLease(fs, output_path, str(path), **kwargs)


def write_holder(path, **fields) -> LeaseRecord:
    """A lease file as another run would have written it (a live one on another host by default)."""
    now = time.time()
    record = LeaseRecord(
        run_id="other-run",
        host="another-host",
        pid=4242,
        process_start=now - 60,
        pid_namespace=None,
        started_at=utc_iso(now - 60),
        heartbeat_at=utc_iso(now),
        heartbeat_unix=now,
    )
    record = dataclasses.replace(record, **fields)
    path.mkdir(parents=True, exist_ok=True)
    (path / LEASE_FILE).write_bytes(record.to_bytes())
    return record


def on_file(path) -> dict:
    return json.loads((path / LEASE_FILE).read_text())


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    info = process_info(child.pid)
    child.wait()
    assert info is not None and process_info(child.pid) is None
    return child.pid, info[1]


def test_the_lease_records_the_run_and_is_released(tmp_path):
    lease = lease_on(tmp_path / "out")
    assert lease.acquire() is None
    record = on_file(tmp_path / "out")
    assert record["run_id"] == lease.run_id and record["host"] == socket.gethostname()
    assert record["pid"] == os.getpid() and record["process_start"] == process_info(os.getpid())[1]
    assert record["started_at"].endswith("Z") and record["heartbeat_at"].endswith("Z")
    assert lease.renew() and on_file(tmp_path / "out")["heartbeat_unix"] >= record["heartbeat_unix"]
    lease.release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    assert os.listdir(tmp_path / "out") == []  # no temporary file left behind
    lease.release()  # twice is harmless


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    first = lease_on(tmp_path / "out")
    first.acquire()
    second = lease_on(tmp_path / "out")
    started = time.monotonic()
    with pytest.raises(
        LeaseHeld,
        match=rf"OUTPUT .*out is in use by another audit: run {first.run_id} on host {socket.gethostname()}, "
        rf"pid {os.getpid()}, started .*Z, last heartbeat .*Z \(\d+ s ago\)\. .*wait for it to end.*"
        r"--lease-ttl-s 120 \(at once on the same host\), or pass --break-lease",
    ) as refused:
        second.acquire()
    assert time.monotonic() - started < 1
    assert isinstance(refused.value, ConfigError)  # exit code 2
    assert on_file(tmp_path / "out")["run_id"] == first.run_id
    second.release()  # a run that never held it deletes nothing
    assert on_file(tmp_path / "out")["run_id"] == first.run_id


def test_exclusive_create_one_winner_among_racing_runs(tmp_path):
    leases = [lease_on(tmp_path / "out") for _ in range(8)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(leases))

    def take(lease: OutputLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("held")
        except LeaseHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["held"] + ["refused"] * 7
    (winner,) = [lease for lease in leases if lease.token is not None]
    assert on_file(tmp_path / "out")["run_id"] == winner.run_id


def test_a_dead_run_on_this_host_is_taken_over_at_once(tmp_path):
    pid, start = dead_pid()
    me = lease_on(tmp_path / "x").record()
    write_holder(tmp_path / "out", host=me.host, pid=pid, process_start=start, pid_namespace=me.pid_namespace)
    lease = lease_on(tmp_path / "out")
    assert lease.acquire() == f"its process {pid} on this host is gone"
    assert on_file(tmp_path / "out")["run_id"] == lease.run_id


def test_a_live_process_on_this_host_holds_it_and_a_reused_pid_does_not(tmp_path):
    me = lease_on(tmp_path / "x").record()
    write_holder(tmp_path / "out", host=me.host, pid=me.pid, process_start=me.process_start,
                 pid_namespace=me.pid_namespace)  # fmt: skip
    with pytest.raises(LeaseHeld, match=f"run other-run on host {me.host}, pid {me.pid}"):
        lease_on(tmp_path / "out").acquire()
    # The same pid started at another time is another process: the holder is gone.
    reused = write_holder(tmp_path / "out", host=me.host, pid=me.pid, process_start=me.process_start - 3600,
                          pid_namespace=me.pid_namespace)  # fmt: skip
    assert holder_gone(reused)
    assert lease_on(tmp_path / "out").acquire() == f"its process {me.pid} on this host is gone"


def test_another_host_or_pid_namespace_waits_for_the_ttl(tmp_path):
    pid, start = dead_pid()
    me = lease_on(tmp_path / "x").record()
    # A dead pid means nothing on another host, or in another pid namespace (a container with the same name).
    for fields in ({"host": "another-host"}, {"host": me.host, "pid_namespace": "pid:[1]"}):
        write_holder(tmp_path / "out", pid=pid, process_start=start, **fields)
        with pytest.raises(LeaseHeld, match=r"in use by another audit: run other-run"):
            lease_on(tmp_path / "out", ttl_s=30).acquire()
    write_holder(tmp_path / "out", heartbeat_unix=time.time() - 31, heartbeat_at=utc_iso(time.time() - 31))
    lease = lease_on(tmp_path / "out", ttl_s=30)
    assert lease.acquire() == "its heartbeat is 31 s old (--lease-ttl-s 30)"
    assert on_file(tmp_path / "out")["run_id"] == lease.run_id


def test_break_lease_takes_a_live_lease_at_once(tmp_path):
    write_holder(tmp_path / "out")
    lease = lease_on(tmp_path / "out", break_lease=True)
    assert lease.acquire() == "--break-lease"
    assert on_file(tmp_path / "out")["run_id"] == lease.run_id


def test_an_unreadable_lease_is_refused_until_broken(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LEASE_FILE).write_text('{"run_id": "x"')
    with pytest.raises(
        LeaseHeld,
        match=r"has a lease \(_lease\.json\) that cannot be read \(not a lease record .*--break-lease",
    ):
        lease_on(tmp_path / "out").acquire()
    assert lease_on(tmp_path / "out", break_lease=True).acquire() == "--break-lease"


def test_a_run_that_lost_its_lease_notices_and_stops(tmp_path):
    lease = lease_on(tmp_path / "out", heartbeat_s=0.05, ttl_s=1)
    lease.acquire()
    lost: list[str] = []
    with lease.heartbeat(on_lost=lost.append):
        time.sleep(0.2)
        assert lease.lost is None and not lost
        taker = lease_on(tmp_path / "out", break_lease=True)
        taker.acquire()
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.02)
    assert lost == [lease.lost]
    assert lease.lost.startswith(f"its lease was taken by another run (run {taker.run_id} on host ")
    with pytest.raises(
        LeaseLost, match=r"the audit stopped: its lease was taken by another run .*wrote nothing more.*rerun"
    ) as stopped:
        lease.check()
    assert isinstance(stopped.value, AuditIncomplete) and stopped.value.EXIT_CODE == 3
    assert not lease.renew()
    lease.release()  # never deletes the lease of the run that took it
    assert on_file(tmp_path / "out")["run_id"] == taker.run_id


def test_a_deleted_lease_is_lost_too(tmp_path):
    lease = lease_on(tmp_path / "out")
    lease.acquire()
    (tmp_path / "out" / LEASE_FILE).unlink()
    assert not lease.renew()
    assert lease.lost == f"its lease was taken by another run ({LEASE_FILE} was deleted)"


class FlakyStore(LocalLeaseStore):
    """Replaces fail with the store's own error while `down` is set."""

    down = False

    def replace(self, data, token):
        if self.down:
            raise ConnectionError("endpoint unreachable")
        return super().replace(data, token)


def test_renewal_errors_are_retried_until_the_ttl(tmp_path, monkeypatch):
    fs, path = filesystem_for(str(tmp_path / "out"))
    store = FlakyStore(f"{path}/{LEASE_FILE}")
    lease = OutputLease(fs, path, str(tmp_path / "out"), ttl_s=60, heartbeat_s=1, store=store)
    lease.acquire()
    store.down = True
    assert lease.renew() and lease.lost is None  # a blip: the next beat tries again
    store.down = False
    assert lease.renew()
    store.down = True
    monkeypatch.setattr(lease, "_renewed_at", time.monotonic() - 61)
    assert not lease.renew()
    assert lease.lost.startswith(
        "its lease could not be renewed for 61 s, longer than --lease-ttl-s 60 (ConnectionError: endpoint"
    )


def test_stores_by_protocol(tmp_path):
    import fsspec

    fs, path = filesystem_for(str(tmp_path / "out"))
    assert isinstance(lease_store(fs, path), LocalLeaseStore)
    memory = fsspec.filesystem("memory")
    store = lease_store(memory, "/lease-test/out")
    assert isinstance(store, BestEffortLeaseStore) and not store.atomic


def test_best_effort_store_reads_its_token_back():
    import fsspec

    memory = fsspec.filesystem("memory")
    store = BestEffortLeaseStore(memory, "/lease-best-effort/out/_lease.json", settle_s=0.01)
    first = OutputLease(
        memory, "/lease-best-effort/out", "memory://out", ttl_s=120, heartbeat_s=15, store=store
    )
    assert first.acquire() is None
    second = OutputLease(
        memory, "/lease-best-effort/out", "memory://out", ttl_s=120, heartbeat_s=15, store=store
    )
    with pytest.raises(LeaseHeld, match=f"run {first.run_id}"):
        second.acquire()
    assert first.renew()
    first.release()
    assert store.read() is None


def test_temporary_files_of_a_killed_writer_are_swept(tmp_path):
    (tmp_path / "out").mkdir()
    left = tmp_path / "out" / f"_tmp-{LEASE_FILE}-deadbeef"
    fresh = tmp_path / "out" / f"_tmp-{LEASE_FILE}-cafe"
    left.write_bytes(b"{")
    fresh.write_bytes(b"{")
    os.utime(left, (time.time() - 120, time.time() - 120))
    lease_on(tmp_path / "out").acquire()
    assert not left.exists() and fresh.exists()  # a live writer's temporary file is not touched
