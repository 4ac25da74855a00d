"""The lease on an audit OUTPUT (`OUTPUT/_lease.json`): one run at a time changes an output. fsspec/s3fs only, no
torch, no ray.

A run takes the lease before it reads the ledger or touches staging, renews it from a daemon thread, and deletes it
at the end. Taking it is atomic where the store allows: a local disk links a fully written file into place (an
exclusive create), S3 and S3-compatible stores put with `IfNoneMatch="*"`; renewing and taking over a dead run's
lease are compare-and-swap (local: under an flock of the OUTPUT folder; S3: `IfMatch` on the ETag last written).
Any other store gets best effort: write a unique token, wait, read it back.
A lease of a dead run is taken over: at once when its holder ran on this host and its process is gone; otherwise
once its heartbeat is older than the TTL; or at once when the operator says so (break_lease).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from fsspec.spec import AbstractFileSystem

from auditor.errors import AuditIncomplete, ConfigError
from auditor.io.storage import is_local, join

logger = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
# Best-effort stores: how long a writer waits before reading its token back (a racing writer's put lands in it).
BEST_EFFORT_SETTLE_S = 2.0
# A temporary lease file older than this was left by a run killed while writing it.
TEMPORARY_MAX_AGE_S = 60.0
# Create / take over, again when another run changed the lease between our read and our write.
ACQUIRE_ATTEMPTS = 3
# A process whose start time differs from the recorded one by more than this is another process with a reused pid.
START_TIME_TOLERANCE_S = 1.0
# S3 error codes of a conditional request that did not hold (409: a concurrent conditional write won).
PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


class LeaseHeld(ConfigError):
    """Another run holds OUTPUT's lease (or it cannot be read): refused before anything is changed (exit 2)."""


class LeaseLost(AuditIncomplete):
    """This run's lease was taken by another run (or could not be renewed for a TTL): it stopped writing (exit 3)."""


def utc_iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# 1. Who holds it -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeaseRecord:
    """What `_lease.json` holds. process_start: the holder's start time (s since the epoch; None where unknown);
    pid_namespace: its pid namespace (a container shares a host name but not pids), None where unknown."""

    run_id: str
    host: str
    pid: int
    process_start: float | None
    pid_namespace: str | None
    started_at: str
    heartbeat_at: str
    heartbeat_unix: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        """Raises ValueError on anything but a complete record."""
        try:
            value = json.loads(data.decode("utf-8"))
            return cls(
                run_id=str(value["run_id"]),
                host=str(value["host"]),
                pid=int(value["pid"]),
                process_start=None if value.get("process_start") is None else float(value["process_start"]),
                pid_namespace=value.get("pid_namespace"),
                started_at=str(value["started_at"]),
                heartbeat_at=str(value["heartbeat_at"]),
                heartbeat_unix=float(value["heartbeat_unix"]),
            )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a lease record ({type(exc).__name__}: {exc})") from exc

    def describe(self, now: float) -> str:
        return (
            f"run {self.run_id} on host {self.host}, pid {self.pid}, started {self.started_at}, "
            f"last heartbeat {self.heartbeat_at} ({max(0.0, now - self.heartbeat_unix):.0f} s ago)"
        )


def boot_time() -> float | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def process_info(pid: int) -> tuple[bool, float | None] | None:
    """(running, start time in s since the epoch or None) of a process on this host; None when it is gone.

    Linux: /proc/<pid>/stat (field 3 the state, Z for a zombie: gone; field 22 the start in clock ticks since
    boot). Elsewhere psutil where it is installed, else only whether the pid exists.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        booted = boot_time()
        start = None if booted is None else round(booted + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)
        return True, start
    except FileNotFoundError:
        return None
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return True, round(process.create_time(), 2)
        except psutil.NoSuchProcess:
            return None
        except psutil.Error:
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return True, None


def pid_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return None


def holder_gone(holder: LeaseRecord) -> bool:
    """True when the holder ran on this host (same host name and pid namespace) and its process is gone: the pid
    does not exist, is a zombie, or belongs to a process started at another time (a reused pid)."""
    if holder.host != socket.gethostname() or holder.pid_namespace != pid_namespace():
        return False
    info = process_info(holder.pid)
    if info is None:
        return True
    _, start = info
    return (
        holder.process_start is not None
        and start is not None
        and abs(start - holder.process_start) > START_TIME_TOLERANCE_S
    )


# 2. Where it is stored: create, read, compare-and-swap, delete ---------------------------------------------------
class LeaseStore:
    """One lease object. A token identifies the version read or written (the bytes; an S3 ETag)."""

    atomic = True

    def read(self) -> tuple[bytes, Any] | None:
        raise NotImplementedError

    def create(self, data: bytes) -> Any | None:
        """Write data only if there is no lease; its token, or None when one exists."""
        raise NotImplementedError

    def replace(self, data: bytes, token: Any) -> Any | None:
        """Write data only if the lease is still the version `token`; the new token, or None."""
        raise NotImplementedError

    def delete(self, token: Any) -> bool:
        """Delete the lease only if it is still the version `token`."""
        raise NotImplementedError


class LocalLeaseStore(LeaseStore):
    """A local / POSIX disk: create links a fully written file into place (fails if the name exists, so a reader
    never sees half a lease); replace and delete compare and write under an exclusive flock of the folder."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl

            fd = os.open(self.folder, os.O_RDONLY)
        except (ImportError, OSError):  # no flock here: compare-then-replace without it, best effort
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _temporary(self, data: bytes) -> str:
        temporary = os.path.join(self.folder, f"_tmp-{LEASE_FILE}-{uuid.uuid4().hex}")
        with open(temporary, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return temporary

    def sweep(self, older_than_s: float = TEMPORARY_MAX_AGE_S) -> None:
        """Delete temporary lease files that a run killed while writing one left behind (a live writer's is
        milliseconds old)."""
        prefix = f"_tmp-{LEASE_FILE}-"
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.folder):
                if entry.name.startswith(prefix) and time.time() - entry.stat().st_mtime > older_than_s:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> Any | None:
        os.makedirs(self.folder, exist_ok=True)
        temporary = self._temporary(data)
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            return None
        except OSError as exc:  # a filesystem without hard links: an exclusive create, then the write
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return data

    def replace(self, data: bytes, token: Any) -> Any | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != token:
                return None
            os.replace(self._temporary(data), self.path)
        return data

    def delete(self, token: Any) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != token:
                return False
            os.unlink(self.path)
        return True


def precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error is a conditional request that did not hold (s3fs maps some to FileExistsError)."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in PRECONDITION_CODES or status in ("412", "409")


class S3LeaseStore(LeaseStore):
    """S3 and S3-compatible stores through s3fs's client (`call_s3`, which bypasses s3fs's listing cache):
    PutObject with IfNoneMatch="*" creates, PutObject / DeleteObject with IfMatch=<ETag> compare and swap."""

    def __init__(self, fs: AbstractFileSystem, path: str):
        self.fs = fs
        self.bucket, self.key = fs.split_path(path)[:2]

    def read(self) -> tuple[bytes, Any] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, Any]:  # body and ETag of one version, in one request
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = response["Body"]
            try:
                return await body.read(), response["ETag"]
            finally:
                body.close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition: str) -> Any | None:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or precondition_failed(exc):
                return None
            raise
        return response["ETag"]

    def create(self, data: bytes) -> Any | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: Any) -> Any | None:
        return self._put(data, IfMatch=token)

    def delete(self, token: Any) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if precondition_failed(exc):
                return False
            raise
        return True


class BestEffortLeaseStore(LeaseStore):
    """A store without conditional writes: write, wait BEST_EFFORT_SETTLE_S, read back; the last writer wins, and
    a run whose token is not what it reads back treats the lease as someone else's. Two runs starting within
    the settle time of each other can still both proceed on a store whose reads lag its writes."""

    atomic = False

    def __init__(self, fs: AbstractFileSystem, path: str, settle_s: float = BEST_EFFORT_SETTLE_S):
        self.fs = fs
        self.path = path
        self.settle_s = settle_s

    def read(self) -> tuple[bytes, Any] | None:
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def _write_and_check(self, data: bytes) -> Any | None:
        self.fs.pipe_file(self.path, data)
        time.sleep(self.settle_s)
        current = self.read()
        return data if current is not None and current[0] == data else None

    def create(self, data: bytes) -> Any | None:
        return None if self.read() is not None else self._write_and_check(data)

    def replace(self, data: bytes, token: Any) -> Any | None:
        current = self.read()
        if current is None or current[1] != token:
            return None
        return self._write_and_check(data)

    def delete(self, token: Any) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.fs.rm_file(self.path)
        return True


def lease_store(fs: AbstractFileSystem, output_path: str) -> LeaseStore:
    path = join(output_path, LEASE_FILE)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if is_local(fs):
        return LocalLeaseStore(path)
    if any(p in ("s3", "s3a") for p in protocols) and hasattr(fs, "call_s3"):
        return S3LeaseStore(fs, path)
    return BestEffortLeaseStore(fs, path)


# 3. The lease of one run -----------------------------------------------------------------------------------------
class OutputLease:
    """This run's lease on OUTPUT: acquire() before anything changes, heartbeat() while the run goes on, release()
    at the end. `lost` is None while the lease is this run's, else why it is not any more."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        output_path: str,
        output: str,
        *,
        ttl_s: float,
        heartbeat_s: float,
        break_lease: bool = False,
        store: LeaseStore | None = None,
    ):
        self.output = output
        self.store = store or lease_store(fs, output_path)
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.break_lease = break_lease
        self.run_id = uuid.uuid4().hex[:12]
        self.started_unix = time.time()
        info = process_info(os.getpid())
        self._process_start = info[1] if info else None
        self.token: Any | None = None
        self.lost: str | None = None
        self._renewed_at = time.monotonic()
        self._lock = threading.Lock()

    def record(self, now: float | None = None) -> LeaseRecord:
        now = time.time() if now is None else now
        return LeaseRecord(
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            process_start=self._process_start,
            pid_namespace=pid_namespace(),
            started_at=utc_iso(self.started_unix),
            heartbeat_at=utc_iso(now),
            heartbeat_unix=now,
        )

    def _refusal(self, holder: LeaseRecord | None, error: str, now: float) -> LeaseHeld:
        if holder is None:
            return LeaseHeld(
                f"OUTPUT {self.output} has a lease ({LEASE_FILE}) that cannot be read ({error}), so another audit "
                "may be writing to it. If no audit is running on this OUTPUT, rerun with --break-lease."
            )
        return LeaseHeld(
            f"OUTPUT {self.output} is in use by another audit: {holder.describe(now)}. One audit at a time writes "
            f"an OUTPUT: wait for it to end; if it is gone, a rerun takes over once its heartbeat is older than "
            f"--lease-ttl-s {self.ttl_s:g} (at once on the same host), or pass --break-lease if you know it is "
            "not running."
        )

    def _takeover_reason(self, holder: LeaseRecord | None, now: float) -> str | None:
        if self.break_lease:
            return "--break-lease"
        if holder is None:
            return None
        if holder_gone(holder):
            return f"its process {holder.pid} on this host is gone"
        age = now - holder.heartbeat_unix
        if age > self.ttl_s:
            return f"its heartbeat is {age:.0f} s old (--lease-ttl-s {self.ttl_s:g})"
        return None

    def acquire(self) -> str | None:
        """Take the lease, or raise LeaseHeld naming its holder. Returns why a previous holder's lease was taken
        over (None when there was none)."""
        for _ in range(ACQUIRE_ATTEMPTS):
            now = time.time()
            mine = self.record(now).to_bytes()
            current = self.store.read()
            if current is None:
                token = self.store.create(mine)
                if token is not None:
                    self._took(token)
                    return None
                continue  # another run created it between our read and write: look at it
            data, token = current
            try:
                holder, error = LeaseRecord.from_bytes(data), ""
            except ValueError as exc:
                holder, error = None, str(exc)
            if (
                holder is not None and holder.run_id == self.run_id
            ):  # a best-effort read-back of our own write
                self._took(token)
                return None
            reason = self._takeover_reason(holder, now)
            if reason is None:
                raise self._refusal(holder, error, now)
            new_token = self.store.replace(mine, token)
            if new_token is not None:
                self._took(new_token)
                previous = holder.describe(now) if holder is not None else f"an unreadable lease ({error})"
                logger.warning("OUTPUT %s: took over the lease of %s: %s", self.output, previous, reason)
                return reason
        current = self.store.read()
        holder = None
        with contextlib.suppress(ValueError):
            holder = LeaseRecord.from_bytes(current[0]) if current is not None else None
        raise self._refusal(holder, "it changed while this run tried to take it", time.time())

    def _took(self, token: Any) -> None:
        self.token = token
        self.lost = None
        self._renewed_at = time.monotonic()
        if isinstance(self.store, LocalLeaseStore):
            self.store.sweep()
        logger.info(
            "OUTPUT %s: lease taken by run %s (%s)",
            self.output,
            self.run_id,
            "atomic" if self.store.atomic else "best effort: this store has no conditional writes",
        )

    def renew(self) -> bool:
        """Write a new heartbeat if the lease is still this run's. False (and `lost` set) when it is not, or when
        it could not be renewed for longer than the TTL (another run may have taken it since)."""
        with self._lock:
            if self.lost is not None or self.token is None:
                return False
            try:
                token = self.store.replace(self.record().to_bytes(), self.token)
            except Exception as exc:  # the store's own errors (a network blip): try again at the next beat
                silent_s = time.monotonic() - self._renewed_at
                if silent_s <= self.ttl_s:
                    logger.warning(
                        "OUTPUT %s: lease not renewed (%s: %s)", self.output, type(exc).__name__, exc
                    )
                    return True
                self.lost = (
                    f"its lease could not be renewed for {silent_s:.0f} s, longer than --lease-ttl-s "
                    f"{self.ttl_s:g} ({type(exc).__name__}: {exc}), so another run may have taken it"
                )
                return False
            if token is None:
                self.lost = f"its lease was taken by another run ({self._holder_now()})"
                return False
            self.token = token
            self._renewed_at = time.monotonic()
            return True

    def _holder_now(self) -> str:
        try:
            current = self.store.read()
        except Exception as exc:
            return f"the lease cannot be read: {type(exc).__name__}"
        if current is None:
            return f"{LEASE_FILE} was deleted"
        try:
            return LeaseRecord.from_bytes(current[0]).describe(time.time())
        except ValueError as exc:
            return f"an unreadable lease: {exc}"

    def check(self) -> None:
        """Raise LeaseLost when the lease is no longer this run's: the run must stop writing."""
        if self.lost is not None:
            raise LeaseLost(
                f"the audit stopped: {self.lost}. OUTPUT {self.output} must have one audit at a time; this run "
                "wrote nothing more. Make sure only one audit runs on this OUTPUT, then rerun the same command "
                "(committed units are skipped, nothing is written twice)."
            )

    def release(self) -> None:
        """Delete the lease if it is still this run's. Never raises: a lease left behind is taken over (at once by
        a rerun on this host, whose holder's process is gone)."""
        with self._lock:
            token, self.token = self.token, None
            if token is None or self.lost is not None:
                return
            try:
                if not self.store.delete(token):
                    logger.warning("OUTPUT %s: the lease was no longer this run's at release", self.output)
            except Exception as exc:
                logger.warning(
                    "OUTPUT %s: the lease could not be released (%s: %s)",
                    self.output,
                    type(exc).__name__,
                    exc,
                )

    @contextlib.contextmanager
    def heartbeat(self, on_lost: Callable[[str], None] | None = None) -> Iterator[OutputLease]:
        """Renew every heartbeat_s in a daemon thread; on_lost(reason) is called once, from that thread, when the
        lease is lost."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                if not self.renew():
                    if self.lost is not None and on_lost is not None and not stop.is_set():
                        on_lost(self.lost)
                    return

        thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)
