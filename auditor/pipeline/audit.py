"""`run(cfg)`: plan (no Ray), start or join Ray, stream work units -> tokenize -> score actors -> staged on the
workers -> committed per unit.

Every input file is one Ray Data read task that reads its pending work units in order (row numbers for ids; a
corrupt file fails alone), the CPU stage tokenizes, an actor pool scores fixed-size batches, and a write stage
stages the scored rows straight from the workers to the output store. The driver receives acknowledgements only
(unit, staged file, row counts, a score histogram): when every row of a unit is staged it starts a commit task that
moves the unit's part files into place, then records the unit in the ledger. No row passes through the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
import warnings
from typing import Any

import ray

from auditor import schema
from auditor.config import AuditConfig
from auditor.errors import AuditIncomplete, ConfigError
from auditor.io.lease import LeaseHeld, OutputLease
from auditor.io.ledger import FAILED, Ledger
from auditor.io.parquet import FLAGGED_DIR, SCORES_DIR, STAGING_DIR, shard_dir
from auditor.io.storage import TEMPORARY_PREFIX, filesystem_for, join, remove_tree, write_json
from auditor.pipeline import ray_compat
from auditor.pipeline.commit import UnitTracker, utc_now
from auditor.pipeline.committer import UnitCommitter, error_text
from auditor.pipeline.metrics import DriverMetrics
from auditor.pipeline.monitor import (
    STALL_SIGNAL,
    AuditInterrupted,
    DriverMonitor,
    activity_reader,
    interruptible,
    start_activity_log,
    stop_reason,
)
from auditor.pipeline.plan import AuditPlan, WorkItem, committed_units, plan_audit, record_matches
from auditor.pipeline.progress import AuditProgress
from auditor.pipeline.ray_auth import check_token, is_auth_refusal, refusal_message, secure_local_ray
from auditor.pipeline.stages import DONE_UNITS, ScoreActor, read_and_tokenize, stage_and_acknowledge
from auditor.pipeline.summary import AuditResult, summarize
from auditor.redact import redact_text, redact_uri

logger = logging.getLogger(__name__)

AUDIT_FILE = schema.AUDIT_FILE
CPU_STAGE_MEMORY_BYTES = 512 * 2**20  # a worker with pyarrow + a tokenizer measured ~320 MiB
# Rows per write-stage call: each call stages one file per unit it holds rows of, so this sets the staged file size.
WRITE_BATCH_ROWS = 16_384
WRITE_TASKS = 4
DEFAULT_BLOCK_BYTES = 128 * 2**20  # Ray Data's own default target_max_block_size
# A tokenized row in flight: 77 input ids + 77 mask values as int64, plus the caption and ids (~1.4 KB measured).
TOKENIZED_ROW_BYTES = 1400

COMMIT_GRACE_S = 60.0  # after an interruption, how long the driver waits for commit tasks already running
# Environment every Ray worker of a local run gets (workers inherit the driver's; these keep logs quiet).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


# 1. Ray --------------------------------------------------------------------------------------------------------
def init_ray(address: str | None, num_cpus: int | None, quiet: bool) -> None:
    """Join RAY_ADDRESS / --address, else start a local Ray (never silently join another local cluster)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not quiet
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        secure_local_ray()  # token authentication on where Ray has it (auditor.pipeline.ray_auth)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
        return
    try:
        check_token(address)
        ray.init(address=address, log_to_driver=not quiet)
    except Exception as exc:
        if not is_auth_refusal(exc):
            raise
        ray.shutdown()
        raise ConfigError(refusal_message(address, exc)) from None


def actor_resources(cfg: AuditConfig, local: bool) -> dict[str, float]:
    """num_cpus / num_gpus per actor from the config and the cluster's totals (never the driver's hardware).

    On a local Ray a request that cannot fit is an error (it would hang). On a cluster it is only logged: an
    autoscaler (KubeRay workers still joining, or scaling from minReplicas) may add the missing nodes.
    """
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    use_gpus = gpus > 0 and cfg.gpus_per_actor > 0
    if not use_gpus and cfg.gpus_per_actor > 0:
        logger.info("the Ray cluster reports no GPUs: scoring on CPU actors")
    if use_gpus and cfg.actors * cfg.gpus_per_actor > gpus:
        message = (
            f"--actors {cfg.actors} x --gpus-per-actor {cfg.gpus_per_actor:g} needs "
            f"{cfg.actors * cfg.gpus_per_actor:g} GPUs; the cluster has {gpus:g}. Lower --actors."
        )
        if local:
            raise ConfigError(message)
        logger.warning("%s Waiting for the cluster to scale up.", message)
    try:
        check_cpus(cfg, cpus)
    except ConfigError as exc:
        if local:
            raise
        logger.warning("%s Waiting for the cluster to scale up.", exc)
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor if use_gpus else 0}


def check_cpus(cfg: AuditConfig, cpus: float) -> None:
    needed = cfg.actors * cfg.cpus_per_actor + 1
    if needed > cpus:
        raise ConfigError(
            f"--actors {cfg.actors} x --cpus-per-actor {cfg.cpus_per_actor:g} + 1 CPU for reading needs {needed:g} "
            f"CPUs; Ray has {cpus:g} (actors holding every CPU starve the readers and the run hangs). "
            "Lower --actors or --cpus-per-actor."
        )


def actor_runtime(cfg: AuditConfig, resources: dict[str, float]) -> dict[str, Any]:
    """What the scoring actors run with, resolved from the config and their resources (each actor logs its own)."""
    on_gpu = resources.get("num_gpus", 0) > 0
    if cfg.cuda_graphs and not on_gpu:
        raise ConfigError(
            "--cuda-graphs needs GPU actors, but the cluster reports no GPUs (or --gpus-per-actor is 0). "
            "Drop the flag or run on a cluster with GPUs."
        )
    dtype = cfg.dtype if cfg.dtype != "auto" else ("fp16" if on_gpu else "fp32")
    return {
        "actor_device": "cuda" if on_gpu else "cpu",
        "dtype": dtype,
        "cuda_graphs": on_gpu and cfg.cuda_graphs is not False,
        "channels_last": on_gpu,
        **resources,
    }


# 2. Dataset ----------------------------------------------------------------------------------------------------
def block_bytes_for(unit_rows: int) -> int:
    """Ray Data block size for this run: a quarter of a unit of tokenized rows (capped at Ray's default).

    Ray buffers a task's output until a block is full, so with blocks larger than a unit the rows of a unit, and
    with it the unit's commit, would wait for later units of the same file (with Ray's 128 MiB default, a whole
    file of up to ~90k rows). A quarter of a unit keeps units flowing, and commits coming, while a file is read.
    """
    return int(min(DEFAULT_BLOCK_BYTES, max(1, unit_rows // 4) * TOKENIZED_ROW_BYTES))


def build_dataset(
    cfg: AuditConfig,
    items: list[WorkItem],
    resources: dict[str, float],
    model_fingerprint: str | None = None,
    activity: Any = None,
) -> ray.data.Dataset:
    """model_fingerprint: the plan's, for the score actors' metrics tags (None: each actor hashes the model).
    activity: the run's ActivityLog (auditor.pipeline.monitor), which readers and score actors tell of each table
    and batch they finish (None: they report nothing)."""
    ray.data.DataContext.get_current().target_max_block_size = block_bytes_for(cfg.unit_rows)
    rows = [{**dataclasses.asdict(item.file), DONE_UNITS: sorted(item.done_units)} for item in items]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # One CPU stage (read + validate + tokenize), then the actor pool, then the write stage. The CPU stage reserves
    # memory for its read buffers; resources that differ from the actor's also keep Ray from fusing the CPU stage
    # into the actor, where it would run serially with the model instead of beside it on another CPU.
    ds = ds.map_batches(
        read_and_tokenize,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"cfg": cfg, "activity": activity},
        num_cpus=1,
        memory=CPU_STAGE_MEMORY_BYTES,
    )
    ds = ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"cfg": cfg, "model_fingerprint": model_fingerprint, "activity": activity},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        **ray_compat.actor_pool(cfg.actors),
        **ray_compat.keeps_row_count(),
        **resources,
    )
    # Writing is I/O on rows that are already in the worker's object store: it asks for no CPU so that it can never
    # be starved by the readers (which would stall the actors behind it), and a bounded pool keeps it from
    # flooding the store with small files.
    return ds.map_batches(
        stage_and_acknowledge,
        batch_size=min(WRITE_BATCH_ROWS, cfg.unit_rows),
        batch_format="pyarrow",
        fn_kwargs={"cfg": cfg},
        num_cpus=0,
        **ray_compat.task_pool(WRITE_TASKS),
    )


# 3. Commit -----------------------------------------------------------------------------------------------------
# 4. Run --------------------------------------------------------------------------------------------------------
def check_output_writable(fs: Any, output_path: str, output: str) -> None:
    """Write and delete a small object under OUTPUT, so an output that refuses writes fails before Ray starts
    (otherwise every worker's write, then the ledger and _audit.json, would fail one by one)."""
    probe = join(output_path, f"{TEMPORARY_PREFIX}write-check-{uuid.uuid4().hex}")
    try:
        fs.makedirs(output_path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # the store's own error types: OSError, botocore's, gcsfs'...
        raise ConfigError(
            f"OUTPUT {output} cannot be written ({type(exc).__name__}: {exc}); check the path, its permissions "
            "(or the bucket policy), the endpoint and credentials."
        ) from exc


def prepare_output(fs: Any, output_path: str, ledger: Ledger, plan: AuditPlan, cfg: AuditConfig) -> None:
    """Before any new row is written: drop records of files redone whole and remove their old outputs (records
    first, so the ledger never points at deleted outputs), record files that cannot be read, clear staging.
    """
    if cfg.force:
        ledger.forget(f.source for f in plan.fresh)
    for source, error in plan.unreadable.items():
        file = next(f for f in plan.files if f.source == source)
        ledger.mark(
            {"source": source, "shard": file.shard, "unit": 0, "first_row": 0, "rows": 0, "file_units": None,
             "identity": file.identity, "fingerprint": plan.fingerprint, "unit_rows": cfg.unit_rows,
             "status": FAILED, "counts": {}, "histogram": {}, "parts": None, "error": error,
             "finished_at": utc_now()}
        )  # fmt: skip
    with_output = existing_shards(fs, join(output_path, SCORES_DIR)) | existing_shards(
        fs, join(output_path, FLAGGED_DIR)
    )
    for file in plan.fresh:
        if file.shard in with_output:
            remove_tree(fs, shard_dir(join(output_path, SCORES_DIR), file.shard))
            remove_tree(fs, shard_dir(join(output_path, FLAGGED_DIR), file.shard))
    remove_tree(fs, join(output_path, STAGING_DIR))
    ledger.remove_legacy()


def existing_shards(fs: Any, root: str) -> set[str]:
    """Partition values present under root: one listing."""
    if not fs.exists(root):
        return set()
    prefix = f"{schema.SHARD}="
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    return {n[len(prefix) :] for n in names if n.startswith(prefix)}


def expected_units(plan: AuditPlan, tracker: UnitTracker) -> int:
    """Units this run will process, as far as known: a file's unit count comes from the ledger or from its first
    END_OF_UNIT; a parquet file not yet opened counts as one unit until then."""
    total = 0
    for item in plan.pending:
        source = item.file.source
        known = tracker.file_units.get(source)
        if known is None:
            _, known = committed_units(plan.records.get(source, []))
        total += max((known or 1) - len(item.done_units), 0)
    return total


def take_lease(fs: Any, output_path: str, cfg: AuditConfig) -> OutputLease:
    """OUTPUT's lease, before its ledger is read or anything under it changes: a second audit of the same OUTPUT
    is refused here (LeaseHeld, exit 2), in seconds and before Ray starts."""
    lease = OutputLease(
        fs, output_path, redact_uri(cfg.output), ttl_s=cfg.lease_ttl_s, heartbeat_s=cfg.lease_heartbeat_s,
        break_lease=cfg.break_lease,
    )  # fmt: skip
    try:
        lease.acquire()
    except LeaseHeld:
        raise
    except Exception as exc:  # the store's own error types
        raise ConfigError(
            f"OUTPUT {cfg.output}: its lease (_lease.json) cannot be taken ({type(exc).__name__}: {exc}); check the "
            "path, its permissions (or the bucket policy), the endpoint and credentials."
        ) from exc
    return lease


def run(cfg: AuditConfig) -> AuditResult:
    started_at = utc_now()
    # 1. One audit at a time per OUTPUT: the lease, renewed while the run goes on, deleted however it ends.
    fs, output_path = filesystem_for(cfg.output, cfg.storage_options)
    check_output_writable(fs, output_path, cfg.output)
    lease = take_lease(fs, output_path, cfg)
    armed = threading.Event()  # the driver loop's signal handlers are in place

    def on_lost(reason: str) -> None:
        logger.error("OUTPUT %s: %s; the audit stops", redact_uri(cfg.output), redact_text(reason))
        if armed.is_set():
            os.kill(os.getpid(), STALL_SIGNAL)

    try:
        with lease.heartbeat(on_lost), interruptible(armed):
            return run_holding_lease(cfg, fs, output_path, lease, armed, started_at)
    except AuditInterrupted as exc:  # outside the driver loop: planning, clearing old outputs, the summary
        lease.check()
        reason = "stopped by SIGTERM (ray job stop, or the operator)." if str(exc) == "SIGTERM" else f"{exc}."
        raise AuditIncomplete(
            f"the audit stopped: {reason} Units committed before are kept; rerun the same command (committed "
            "units are skipped, nothing is written twice)."
        ) from None
    finally:
        lease.release()


def run_holding_lease(
    cfg: AuditConfig, fs: Any, output_path: str, lease: OutputLease, armed: threading.Event, started_at: str
) -> AuditResult:
    # 2. Check inputs, columns, threshold and model before Ray starts.
    plan = plan_audit(cfg)
    timings = dict(plan.timings_s)
    ledger = Ledger(fs, output_path)
    if (cfg.address or os.environ.get("RAY_ADDRESS")) is None and cfg.num_cpus is not None and plan.pending:
        check_cpus(cfg, cfg.num_cpus)
    # 3. Clear what a killed run or an earlier version of a file left behind.
    step = time.perf_counter()
    lease.check()
    prepare_output(fs, output_path, ledger, plan, cfg)
    timings["prepare_output"] = time.perf_counter() - step
    lease.check()
    tracker = UnitTracker()
    committer: UnitCommitter | None = None
    monitor: DriverMonitor | None = None
    throughput: dict[str, Any] = {}
    ray_stats = ""
    runtime: dict[str, Any] = {}
    error: BaseException | None = None
    if plan.pending:
        # 4. Ray and the streaming pipeline; the driver sees acknowledgements only.
        step = time.perf_counter()
        init_ray(cfg.address, cfg.num_cpus, cfg.quiet)
        resources = actor_resources(cfg, local=cfg.address is None and not os.environ.get("RAY_ADDRESS"))
        runtime = actor_runtime(cfg, resources)
        timings["ray_init"] = time.perf_counter() - step
        step = time.perf_counter()
        # A small run hands the write stage fewer inputs than its pool size; Ray warns about it on every run.
        warnings.filterwarnings(
            "ignore", message="The maximum number of concurrent tasks", category=UserWarning
        )
        progress = AuditProgress(
            expected_units(plan, tracker), interval_s=cfg.progress_interval, quiet=cfg.quiet
        )
        committer = UnitCommitter(cfg, plan, ledger, progress, lease)
        activity = start_activity_log()
        ds = build_dataset(cfg, plan.pending, resources, plan.model_fingerprint, activity)
        metrics = DriverMetrics(plan.model_fingerprint)
        monitor = DriverMonitor(
            tracker,
            progress,
            cfg.stall_timeout_s,
            metrics,
            activity_reader(activity),
            lambda: committer.last_finished,
        )
        try:
            with interruptible(armed), monitor:
                for acks in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    lease.check()
                    committer.submit(tracker.consume(acks))
                    committer.poll()
                    progress.set_total(
                        expected_units(plan, tracker) + progress.units_committed + progress.units_failed
                    )
        except BaseException as exc:  # summarize what was committed, then re-raise
            error = exc
        finally:
            # The ledger's store may fail here too: a unit left unrecorded is redone by a rerun.
            try:
                committer.poll(wait=True, timeout_s=None if error is None else COMMIT_GRACE_S)
            except Exception as exc:
                error = error or exc
            monitor.read_activity()  # the rows scored since the last tick, before the totals are taken
            throughput = progress.close()
            metrics.update(progress.snapshot())
            with contextlib.suppress(Exception):  # a log already gone with a broken cluster
                ray.kill(activity)
        # Another run owns OUTPUT now: leave its staging, ledger and _audit.json alone.
        lease.check()
        if error is None:
            # Nothing is in flight now: what staging still holds belongs to failed units or to task attempts
            # that Ray retried (their rows were acknowledged from the retry), never to a committed unit.
            remove_tree(fs, join(output_path, STAGING_DIR))
        # Distinct runtimes: identical actors on identical machines collapse into one entry.
        runtime["actors"] = [json.loads(raw) for raw in sorted(tracker.runtimes)]
        timings["pipeline"] = time.perf_counter() - step
        ray_stats = ds.stats() if error is None else ""
    # 5. Fold the ledger into one snapshot (drop records of changed files), then the summary next to the results.
    step = time.perf_counter()
    lease.check()
    current = {f.source: f for f in plan.files}
    try:
        kept = ledger.compact(
            keep=lambda r: (
                r["source"] not in current
                or record_matches(r, current[r["source"]], plan.accepted_fingerprints, cfg.unit_rows)
            )
        )
        timings["compact_ledger"] = time.perf_counter() - step
        # Nothing writes the ledger now (the driver records every unit, and its commits have been waited for), so
        # what compact kept is the ledger: no second read of it.
        records = [r for r in kept if r["source"] in current]
        result = summarize(cfg, plan, committer, tracker, records, timings, ray_stats, started_at, runtime)
        result.summary["throughput"] = throughput
        if error is not None:
            result.summary["stopped"] = stop_reason(error, monitor, cfg)
        write_json(fs, join(output_path, AUDIT_FILE), result.summary)
    except Exception as exc:  # the output store failing at the end; unit records already written stand
        stopped = f" The run had stopped: {stop_reason(error, monitor, cfg)}" if error is not None else ""
        raise AuditIncomplete(
            f"the audit could not fold its ledger or write {AUDIT_FILE} under OUTPUT {cfg.output} "
            f"({error_text(exc)}).{stopped} Committed units are kept; rerun the same command once OUTPUT accepts "
            "writes (committed units are skipped, nothing is written twice)."
        ) from exc
    if cfg.report:
        write_audit_report(cfg)
    logger.info(
        "audit done: %d units committed, %d files skipped, %d units failed; %s",
        result.units_done,
        result.files_skipped,
        len(result.failed_units),
        result.counts,
    )
    if error is not None:
        raise AuditIncomplete(
            f"the audit stopped before every unit was committed: {result.summary['stopped']} "
            f"{result.units_done} units were committed this run and are kept; rerun the same command to audit "
            "the rest (committed units are skipped, nothing is written twice)."
        ) from (None if isinstance(error, AuditInterrupted) else error)
    return result


def write_audit_report(cfg: AuditConfig) -> None:
    """OUTPUT/report.html from what was just written. A report that fails never fails the audit: it can be made
    again with `auditor report OUTPUT`."""
    from auditor.report.html import write_report

    step = time.perf_counter()
    try:
        path = write_report(cfg.output, cfg.storage_options)
    except Exception as exc:  # the traceback would quote URIs unredacted; the message is enough to retry
        logger.error(
            "the report could not be written (%s); run `auditor report %s` to retry",
            error_text(exc), redact_uri(cfg.output),
        )  # fmt: skip
        return
    logger.info("report: %s (%.1f s)", redact_uri(str(path)), time.perf_counter() - step)
