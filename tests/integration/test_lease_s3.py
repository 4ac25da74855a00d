"""OUTPUT's lease on S3 (a moto server on 127.0.0.1): PutObject with IfNoneMatch="*" creates it, IfMatch on the
ETag renews, takes over and deletes it. moto honours both conditions; the first test shows it, so that the
others test the lease and not a store that ignores them."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import s3fs

from auditor.io.lease import LEASE_FILE, LeaseHeld, LeaseLost, LeaseRecord, OutputLease, S3LeaseStore, utc_iso
from auditor.io.storage import filesystem_for

pytestmark = pytest.mark.integration


@pytest.fixture
def output(s3_endpoint, request) -> tuple[s3fs.S3FileSystem, str]:
    bucket = f"lease-{request.node.name.replace('_', '-')[5:40].strip('-')}"
    store = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True, use_listings_cache=False)
    store.mkdir(bucket)
    return store, f"s3://{bucket}/out"


def lease_on(s3_endpoint: str, output: str, **options) -> OutputLease:
    fs, path = filesystem_for(output, {"endpoint_url": s3_endpoint})
    return OutputLease(fs, path, output, **{"ttl_s": 120.0, "heartbeat_s": 15.0, **options})


def holder_on(store: s3fs.S3FileSystem, output: str) -> dict:
    return json.loads(store.cat_file(f"{output.removeprefix('s3://')}/{LEASE_FILE}"))


def test_moto_honours_conditional_puts(output):
    store, out = output
    bucket, key = out.removeprefix("s3://").split("/", 1)
    created = store.call_s3("put_object", Bucket=bucket, Key=f"{key}/probe", Body=b"1", IfNoneMatch="*")
    with pytest.raises(FileExistsError):
        store.call_s3("put_object", Bucket=bucket, Key=f"{key}/probe", Body=b"2", IfNoneMatch="*")
    with pytest.raises(OSError, match="pre-conditions"):
        store.call_s3("put_object", Bucket=bucket, Key=f"{key}/probe", Body=b"3", IfMatch='"0000"')
    store.call_s3("put_object", Bucket=bucket, Key=f"{key}/probe", Body=b"4", IfMatch=created["ETag"])
    assert store.cat_file(f"{bucket}/{key}/probe") == b"4"


def test_exclusive_create_refusal_and_release_on_s3(s3_endpoint, output):
    store, out = output
    first = lease_on(s3_endpoint, out)
    assert isinstance(first.store, S3LeaseStore)
    assert first.acquire() is None
    assert holder_on(store, out)["run_id"] == first.run_id
    second = lease_on(s3_endpoint, out)
    with pytest.raises(
        LeaseHeld, match=rf"OUTPUT {out} is in use by another audit: run {first.run_id} on host "
    ):
        second.acquire()
    assert first.renew() and holder_on(store, out)["run_id"] == first.run_id
    first.release()
    assert not store.exists(f"{out.removeprefix('s3://')}/{LEASE_FILE}")
    assert second.acquire() is None
    second.release()


def test_racing_creates_and_takeovers_have_one_winner_on_s3(s3_endpoint, output):
    store, out = output

    def race(leases: list[OutputLease]) -> list[OutputLease]:
        barrier = threading.Barrier(len(leases))
        winners: list[OutputLease] = []

        def take(lease: OutputLease) -> None:
            barrier.wait()
            try:
                lease.acquire()
                winners.append(lease)
            except LeaseHeld:
                pass

        threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return winners

    (winner,) = race([lease_on(s3_endpoint, out) for _ in range(6)])
    assert holder_on(store, out)["run_id"] == winner.run_id
    # Its heartbeat goes stale: of the runs that all see it as dead, one takes it (IfMatch on the ETag they read).
    stale = LeaseRecord.from_bytes(json.dumps(holder_on(store, out)).encode())
    old = time.time() - 600
    stale = dataclasses.replace(stale, host="another-host", heartbeat_unix=old, heartbeat_at=utc_iso(old))
    store.pipe_file(f"{out.removeprefix('s3://')}/{LEASE_FILE}", stale.to_bytes())
    (taker,) = race([lease_on(s3_endpoint, out, ttl_s=60) for _ in range(6)])
    assert holder_on(store, out)["run_id"] == taker.run_id
    # The run whose lease was taken notices at its next renewal and never deletes the new holder's lease.
    assert not winner.renew()
    assert winner.lost.startswith(f"its lease was taken by another run (run {taker.run_id} on host ")
    with pytest.raises(LeaseLost, match="the audit stopped: its lease was taken by another run"):
        winner.check()
    winner.release()
    assert holder_on(store, out)["run_id"] == taker.run_id
    taker.release()


def test_break_lease_and_lost_detection_by_heartbeat_on_s3(s3_endpoint, output):
    store, out = output
    holder = lease_on(s3_endpoint, out, heartbeat_s=0.2, ttl_s=5)
    holder.acquire()
    lost: list[str] = []
    with holder.heartbeat(on_lost=lost.append):
        time.sleep(0.5)
        assert holder.lost is None
        breaker = lease_on(s3_endpoint, out, break_lease=True)
        assert breaker.acquire() == "--break-lease"
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert lost and lost[0].startswith(f"its lease was taken by another run (run {breaker.run_id}")
    holder.release()
    assert holder_on(store, out)["run_id"] == breaker.run_id
    breaker.release()
    assert not store.exists(f"{out.removeprefix('s3://')}/{LEASE_FILE}")
