"""`run(cfg)`: plan (no Ray), start or join Ray, stream files -> tokenize -> score actors -> per-file shards.

Every input file is one Ray Data read task that streams it front to back (row numbers for ids; a corrupt file
fails alone), the CPU stage tokenizes, an actor pool scores fixed-size batches, and the driver writes each file's
rows to its own shard and marks it in the ledger once complete. Outputs are small next to the model work, so the
driver is not the bottleneck, and it is the one place that knows when a file is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray

from auditor import __version__, schema
from auditor.config import AuditConfig
from auditor.errors import ConfigError
from auditor.io.inputs import InputFile
from auditor.io.ledger import DONE, FAILED, Ledger
from auditor.io.storage import filesystem_for, join, remove_tree, write_json
from auditor.pipeline.plan import AuditPlan, plan_audit
from auditor.pipeline.sink import FLAGGED_DIR, SCORES_DIR, AuditSink, utc_now
from auditor.pipeline.stages import ScoreActor, read_and_tokenize

logger = logging.getLogger(__name__)

AUDIT_FILE = "_audit.json"
CPU_STAGE_MEMORY_BYTES = 512 * 2**20  # a worker with pyarrow + a tokenizer measured ~320 MiB
# Environment every Ray worker of a local run gets (workers inherit the driver's; these keep logs quiet).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class AuditResult:
    output: str
    files_done: int
    files_skipped: int
    failed: dict[str, str]  # source -> error
    counts: dict[str, int]  # this run, by status, plus "flagged" and "rows"
    summary: dict[str, Any] = field(default_factory=dict)  # what _audit.json holds

    @property
    def exit_code(self) -> int:
        """0: every input audited; 1: some input files failed (see failed / _audit.json)."""
        return 1 if self.failed else 0


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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
    else:
        ray.init(address=address, log_to_driver=not quiet)


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
def build_dataset(cfg: AuditConfig, files: list[InputFile], resources: dict[str, float]) -> ray.data.Dataset:
    items = [dataclasses.asdict(f) for f in files]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # One CPU stage (read + validate + tokenize), then the actor pool. The CPU stage reserves memory for its read
    # buffers; resources that differ from the actor's also keep Ray from fusing the CPU stage into the actor, where
    # it would run serially with the model instead of beside it on another CPU.
    ds = ds.map_batches(
        read_and_tokenize,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"cfg": cfg},
        num_cpus=1,
        memory=CPU_STAGE_MEMORY_BYTES,
    )
    return ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        udf_modifying_row_count=False,
        **resources,
    )


# 3. Run --------------------------------------------------------------------------------------------------------
def run(cfg: AuditConfig) -> AuditResult:
    started_at = utc_now()
    # 1. Check inputs, columns, threshold and model before Ray starts.
    plan = plan_audit(cfg)
    timings = dict(plan.timings_s)
    fs, output_path = filesystem_for(cfg.output, cfg.storage_options)
    ledger = Ledger(fs, output_path)
    if (cfg.address or os.environ.get("RAY_ADDRESS")) is None and cfg.num_cpus is not None and plan.pending:
        check_cpus(cfg, cfg.num_cpus)
    for source, error in plan.unreadable.items():
        file = next(f for f in plan.files if f.source == source)
        ledger.mark(
            {"source": source, "shard": file.shard, "status": FAILED, "fingerprint": plan.fingerprint,
             "rows": 0, "counts": {}, "error": error, "finished_at": utc_now()}
        )  # fmt: skip
    # 2. Clear what a killed run may have left of the files to redo: unmark first, so the ledger never points at
    #    deleted outputs.
    for file in plan.pending:
        ledger.unmark(file.shard)
        remove_tree(fs, join(output_path, SCORES_DIR, f"shard={file.shard}"))
        remove_tree(fs, join(output_path, FLAGGED_DIR, f"shard={file.shard}"))
    sink = AuditSink(fs, output_path, ledger, plan.pending, plan.fingerprint, cfg.explain_flagged)
    ray_stats = ""
    runtime: dict[str, Any] = {}
    if plan.pending:
        # 3. Ray and the streaming pipeline.
        step = time.perf_counter()
        init_ray(cfg.address, cfg.num_cpus, cfg.quiet)
        resources = actor_resources(cfg, local=cfg.address is None and not os.environ.get("RAY_ADDRESS"))
        runtime = actor_runtime(cfg, resources)
        actor_runtimes: set[bytes] = set()
        timings["ray_init"] = time.perf_counter() - step
        step = time.perf_counter()
        ds = build_dataset(cfg, plan.pending, resources)
        try:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                metadata = table.schema.metadata or {}
                if schema.ACTOR_RUNTIME_KEY in metadata:
                    actor_runtimes.add(metadata[schema.ACTOR_RUNTIME_KEY])
                    table = table.replace_schema_metadata(None)
                sink.consume(table)
        finally:
            sink.close()
        # Distinct runtimes: identical actors on identical machines collapse into one entry.
        runtime["actors"] = [json.loads(raw) for raw in sorted(actor_runtimes)]
        timings["pipeline"] = time.perf_counter() - step
        timings["driver_write"] = sink.write_s
        ray_stats = ds.stats()
    # 4. Summary next to the results.
    result = summarize(cfg, plan, sink, ledger, timings, ray_stats, started_at, runtime)
    write_json(fs, join(output_path, AUDIT_FILE), result.summary)
    logger.info(
        "audit done: %d files audited, %d skipped, %d failed; %s",
        result.files_done,
        result.files_skipped,
        len(result.failed),
        result.counts,
    )
    return result


def versions() -> dict[str, str]:
    import diffusers
    import pyarrow
    import torch
    import transformers

    return {
        "auditor": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


def summarize(
    cfg: AuditConfig,
    plan: AuditPlan,
    sink: AuditSink,
    ledger: Ledger,
    timings: dict[str, float],
    ray_stats: str,
    started_at: str,
    runtime: dict[str, Any],
) -> AuditResult:
    run_counts: Counter = Counter()
    for record in sink.finished.values():
        run_counts.update(record["counts"])
        run_counts["rows"] += record["rows"]
    failed = {s: r["error"] for s, r in sink.finished.items() if r["status"] == FAILED}
    failed.update(plan.unreadable)
    sources = {f.source for f in plan.files}
    records = {s: r for s, r in ledger.entries().items() if s in sources}
    total: Counter = Counter()
    for record in records.values():
        if record["status"] == DONE:
            total.update(record["counts"])
            total["rows"] += record["rows"]
    done = sum(1 for r in sink.finished.values() if r["status"] == DONE)
    summary = {
        "auditor_version": __version__,
        "started_at": started_at,
        "finished_at": utc_now(),
        "config": cfg.to_json(),
        "model_fingerprint": plan.model_fingerprint,
        "run_fingerprint": plan.fingerprint,
        "threshold": plan.threshold.value,
        "threshold_origin": plan.threshold.origin,
        "partitioning": {"style": "hive", "column": "shard", "meaning": "one value per input file"},
        "files": {
            "inputs": len(plan.files),
            "audited_this_run": done,
            "skipped_complete": len(plan.skipped),
            "failed": [{"source": s, "error": e} for s, e in sorted(failed.items())],
            "complete_in_output": sum(1 for r in records.values() if r["status"] == DONE),
        },
        "counts": {"this_run": dict(run_counts), "output_total": dict(total)},
        "runtime": runtime,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "ray_stats": ray_stats,
        "versions": versions(),
        "argv": sys.argv,
    }
    return AuditResult(cfg.output, done, len(plan.skipped), failed, dict(run_counts), summary)
