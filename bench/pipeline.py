"""End-to-end audit pipeline on this machine: throughput vs the raw batched scorer, and peak memory vs corpus size.

Run on an otherwise idle machine (timings on shared cores are meaningless); paste the tables into BENCHMARKS.md.

  python bench/pipeline.py throughput [--preset small] [--captions 20000] [--batch-size 32]
      (a) raw: Scorer.score_tokenized over the same captions in batches, torch on all cores, one process;
      (b) pipeline: `auditor audit` (parquet in -> Ray Data -> one actor -> parquet out) on a fresh local Ray.
      efficiency = (a) time / (b) time, target >= 0.85.
      On 2 cores the actor gets 2 torch threads: local Ray with --num-cpus 3 (logical) and --cpus-per-actor 2,
      which leaves one logical CPU for the read/tokenize task (actors holding every CPU hang the run).
  python bench/pipeline.py sizing [--preset micro] [--captions 20000] [--unit-rows 5000]
      CPU seconds per row of the non-model work (read + tokenize, stage + acknowledge, commit tasks, driver) from
      Ray Data's per-operator CPU times of one real audit: rows/s per CPU, and CPUs per GPU at 450 captions/s.
  python bench/pipeline.py memory [--preset micro] [--sizes 50000 200000]
      Peak RSS of the driver plus every process it started (Ray's daemons and workers), sampled every 0.2 s,
      for each corpus size in a fresh process; target: flat (ratio largest/smallest <= 1.2).
  python bench/pipeline.py workers [--preset micro] [--captions 50000]
      One audit (defaults but --num-cpus 2 --cpus-per-actor 1, as in memory) in a fresh process, every Ray worker
      it starts sampled every 0.1 s: peak RSS per worker and per role (read+tokenize, score actor, write stage,
      commit task: Ray's process titles), whether the worker has torch loaded (libtorch in its memory maps),
      and the time from the driver's start (process creation) and from run() to the first committed unit (the
      earliest `committed_ns` in the ledger). Also the RSS of a fresh Python that imports what a write/commit
      worker imports. To compare with an older commit, run this file from a copy of that commit's tree (it
      imports auditor from the tree it sits in, and so do the Ray workers: PYTHONPATH is set for them).
Add --quick for a seconds-long smoke run of any mode (small sizes; not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS_PER_FILE = 10_000


def write_corpus(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n distinct captions in parquet files of ROWS_PER_FILE rows (distinct, so no dedup flatters either side)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from auditor.toy.models import default_corpus

    base = default_corpus(seed=seed, size=min(n, 20_000))
    captions = [f"{base[i % len(base)]} #{i}" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, n, ROWS_PER_FILE)):
        table = pa.table({"caption": captions[start : start + ROWS_PER_FILE]})
        pq.write_table(table, folder / f"part-{index:05d}.parquet", row_group_size=1000)
    return captions


def build_model(folder: Path, preset: str) -> Path:
    from auditor.toy.models import PRESETS, build_random_sd

    if not (folder / "unet").exists():
        build_random_sd(folder, PRESETS[preset], seed=0)
    return folder


def audit_argv(
    corpus: Path, out: Path, model: Path, batch_size: int, threads: int, extra: tuple[str, ...] = ()
) -> list[str]:
    return [
        str(corpus), str(out), "--model", str(model), "--dtype", "fp32", "--batch-size", str(batch_size),
        "--num-cpus", str(threads + 1), "--cpus-per-actor", str(threads), "--gpus-per-actor", "0", "--quiet",
        "--no-report", *extra,
    ]  # fmt: skip


def raw_seconds(model: Path, captions: list[str], batch_size: int, threads: int) -> float:
    import torch

    from auditor.scoring import Scorer

    torch.set_num_threads(threads)
    scorer = Scorer.from_pretrained(model, device="cpu", dtype="fp32", batch_size=batch_size)
    scorer.score(captions[:batch_size])  # warm-up: uncond cache, allocator
    started = time.perf_counter()
    for start in range(0, len(captions), 1024):
        scorer.score_tokenized(scorer.tokenize(captions[start : start + 1024]))
    return time.perf_counter() - started


def throughput(args: argparse.Namespace, work: Path) -> dict:
    threads = os.cpu_count() or 2
    model = build_model(work / "model", args.preset)
    captions = write_corpus(work / "corpus", args.captions)
    raw = raw_seconds(model, captions, args.batch_size, threads)
    print(f"(a) raw batched scorer: {len(captions) / raw:8.1f} captions/s ({raw:.1f} s)", flush=True)
    argv = [
        sys.executable,
        "-m",
        "auditor",
        "audit",
        *audit_argv(work / "corpus", work / "out", model, args.batch_size, threads),
    ]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    piped = time.perf_counter() - started
    audit = json.loads((work / "out" / "_audit.json").read_text())
    inner = audit["timings_s"].get("pipeline", piped)
    print(
        f"(b) pipeline end to end: {len(captions) / piped:8.1f} captions/s ({piped:.1f} s incl. imports, Ray start)"
    )
    print(
        f"    pipeline stage only: {len(captions) / inner:8.1f} captions/s ({inner:.1f} s, from _audit.json)"
    )
    print(
        f"efficiency (a)/(b): end to end {raw / piped:.2f}, pipeline stage {raw / inner:.2f}  (target >= 0.85)"
    )
    rows = audit["counts"]["this_run"]["rows"]
    driver_bytes = audit["driver"]["acknowledgement_bytes"]
    print(
        f"bytes reaching the driver: {driver_bytes} for {rows} rows = {driver_bytes / rows:.3f} B/row "
        f"({audit['driver']['acknowledgements']} acknowledgements; target <= 1 B/row)"
    )
    return {"captions": len(captions), "raw_s": raw, "pipeline_total_s": piped, "pipeline_stage_s": inner,
            "driver_bytes_per_row": driver_bytes / rows}  # fmt: skip


# Ray Data operators of the audit that are not the model: their CPU time per row is what sizes a node's CPUs.
NON_MODEL_OPERATORS = ("read_and_tokenize", "stage_and_acknowledge")


def operator_cpu_seconds(ray_stats: str) -> dict[str, float]:
    """{operator name: total remote CPU seconds} from Dataset.stats() text (the lines Ray prints per operator)."""
    totals: dict[str, float] = {}
    current = None
    for line in ray_stats.splitlines():
        match = re.match(r"Operator \d+ (?:MapBatches\()?([A-Za-z_]+)\)?", line)
        if match:
            current = match.group(1)
            continue
        match = re.search(r"Remote cpu time: .*?, ([\d.]+)(us|ms|s) total", line)
        if match and current:
            value, unit = float(match.group(1)), match.group(2)
            totals[current] = totals.get(current, 0.0) + value * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
            current = None
    return totals


def sizing(args: argparse.Namespace, work: Path) -> dict:
    """CPU seconds per row of everything but the model: read + tokenize, stage (write) + acknowledge, commit tasks
    and the driver's bookkeeping, from one real audit run. The model's share is left out by construction (the
    ScoreActor operator is reported apart), so the model's size does not matter; the micro preset keeps it short.
    """
    model = build_model(work / "model", args.preset)
    captions = write_corpus(work / "corpus", args.captions)
    argv = audit_argv(work / "corpus", work / "out", model, args.batch_size, threads=1,
                      extra=("--unit-rows", str(args.unit_rows)))  # fmt: skip
    subprocess.run([sys.executable, "-m", "auditor", "audit", *argv], check=True, stdout=subprocess.DEVNULL)
    audit = json.loads((work / "out" / "_audit.json").read_text())
    rows = audit["counts"]["this_run"]["rows"]
    assert rows == len(captions), (rows, len(captions))
    cpu = operator_cpu_seconds(audit["ray_stats"])
    parts = {name: cpu.get(name, 0.0) for name in NON_MODEL_OPERATORS}
    parts["commit tasks"] = audit["driver"]["commit_task_cpu_s"]
    parts["driver (acknowledgements)"] = audit["driver"]["acknowledgement_cpu_s"]
    total = sum(parts.values())
    print(f"\nnon-model CPU per row, {rows} rows, unit {args.unit_rows} rows (model operator: "
          f"{cpu.get('ScoreActor', 0.0):.1f} CPU s, not counted)")  # fmt: skip
    print("| part | CPU s total | CPU µs per row |")
    print("|---|---|---|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.2f} | {seconds / rows * 1e6:.0f} |")
    per_row = total / rows
    print(f"| **all non-model** | {total:.2f} | {per_row * 1e6:.0f} |")
    print(f"\nrows/s per CPU for the non-model work: {1 / per_row:,.0f}")
    for rate in (450,):
        print(f"CPUs per GPU at {rate} captions/s: {rate * per_row:.2f} (before headroom)")
    return {"rows": rows, "cpu_s": parts, "cpu_s_per_row": per_row, "rows_per_s_per_cpu": 1 / per_row}


def tree_rss_bytes(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading
            total += process.memory_info().rss
    return total


def run_one(args: argparse.Namespace) -> None:
    """Child mode: audit one prepared corpus in this process while a thread samples this process tree's RSS."""
    from auditor.config import AuditConfig
    from auditor.pipeline.audit import run

    peak = {"bytes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], tree_rss_bytes(os.getpid()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = run(AuditConfig.from_argv(args.audit_argv))
    stop.set()
    sampler.join()
    print(json.dumps({"peak_rss_bytes": peak["bytes"], "seconds": time.perf_counter() - started,
                      "rows": result.counts.get("rows", 0)}))  # fmt: skip


# Ray's process title while a worker runs a task or hosts an actor -> the audit role it names.
WORKER_ROLES = {
    "read_and_tokenize": "read+tokenize",
    "ScoreActor": "score actor",
    "stage_and_acknowledge": "write stage",
    "commit_staged_unit": "commit task",
    "ActivityLog": "activity log",
}
# What a write/commit worker imports (the modules Ray loads to run stage_and_acknowledge / commit_staged_unit).
WORKER_IMPORTS = "import auditor.pipeline.stages, auditor.pipeline.commit, auditor.pipeline.committer, auditor.pipeline.audit"


def has_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return "libtorch" in fh.read()
    except OSError:
        return False


def sample_workers(stop: threading.Event, seen: dict[int, dict]) -> None:
    """Every 0.1 s: each Ray worker below this process, its titles (roles), peak RSS, torch loaded or not."""
    import psutil

    me = psutil.Process(os.getpid())
    last_maps = 0.0
    while not stop.is_set():
        check_maps = time.monotonic() - last_maps > 1.0  # reading maps costs CPU: once a second is enough
        for process in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                title = " ".join(process.cmdline())
                if not title.startswith("ray::"):
                    continue
                entry = seen.setdefault(process.pid, {"titles": set(), "peak_rss": 0, "torch": False})
                entry["titles"].add(title.split(" ")[0])
                entry["peak_rss"] = max(entry["peak_rss"], process.memory_info().rss)
                if check_maps and not entry["torch"]:
                    entry["torch"] = has_torch(process.pid)
        if check_maps:
            last_maps = time.monotonic()
        time.sleep(0.1)


def run_workers(args: argparse.Namespace) -> None:
    """Child mode of `workers`: one audit in this process while a thread samples the Ray workers it starts."""
    import psutil

    from auditor.config import AuditConfig
    from auditor.io.ledger import Ledger
    from auditor.io.storage import filesystem_for
    from auditor.pipeline.audit import run

    process_start_ns = int(psutil.Process(os.getpid()).create_time() * 1e9)
    seen: dict[int, dict] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_workers, args=(stop, seen), daemon=True)
    sampler.start()
    cfg = AuditConfig.from_argv(args.audit_argv)
    run_ns = time.time_ns()
    result = run(cfg)
    end_ns = time.time_ns()
    stop.set()
    sampler.join()
    fs, output_path = filesystem_for(cfg.output)
    first_commit_ns = min(r["committed_ns"] for r in Ledger(fs, output_path).entries().values())
    workers = []
    for pid, entry in sorted(seen.items()):
        roles = sorted({role for key, role in WORKER_ROLES.items() for t in entry["titles"] if key in t})
        workers.append({"pid": pid, "roles": roles, "titles": sorted(entry["titles"]),
                        "peak_rss_bytes": entry["peak_rss"], "torch": entry["torch"]})  # fmt: skip
    print(json.dumps({"rows": result.counts.get("rows", 0), "units": result.units_done,
                      "driver_start_to_first_commit_s": (first_commit_ns - process_start_ns) / 1e9,
                      "run_to_first_commit_s": (first_commit_ns - run_ns) / 1e9,
                      "run_s": (end_ns - run_ns) / 1e9, "workers": workers}))  # fmt: skip


def import_rss_bytes() -> tuple[int, bool]:
    """(peak RSS, torch imported) of a fresh Python that imports what a write/commit worker imports."""
    code = (
        f"import sys; {WORKER_IMPORTS}; "
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report this script's own peak.
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]; "
        "print(int(hwm) * 1024, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()  # fmt: skip
    return int(out[0]), out[1] == "True"


def workers(args: argparse.Namespace, work: Path) -> dict:
    model = build_model(work / "model", args.preset)
    corpus = work / f"corpus-{args.captions}"
    write_corpus(corpus, args.captions)
    rss, torch_imported = import_rss_bytes()
    print(f"fresh Python importing what a write/commit worker imports: {rss / 2**20:.0f} MiB RSS, "
          f"torch imported: {torch_imported}", flush=True)  # fmt: skip
    argv = audit_argv(corpus, work / "out-workers", model, args.batch_size, threads=1)
    # Ray's workers inherit the driver's environment: they import auditor from this tree too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, __file__, "_run-workers", "--", *argv], check=True,
                           capture_output=True, text=True, env=env)  # fmt: skip
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"{args.captions} captions, {measured['units']} units, {measured['rows']} rows: run() {measured['run_s']:.1f} s"
    )
    print(f"time to the first committed unit: {measured['driver_start_to_first_commit_s']:.1f} s from the driver's "
          f"start, {measured['run_to_first_commit_s']:.1f} s from run()")  # fmt: skip
    print("\n| worker pid | roles | peak RSS (MiB) | torch loaded |")
    print("|---|---|---|---|")
    for worker in measured["workers"]:
        roles = ", ".join(worker["roles"]) or "(no audit role: " + ", ".join(worker["titles"]) + ")"
        print(f"| {worker['pid']} | {roles} | {worker['peak_rss_bytes'] / 2**20:.0f} | {worker['torch']} |")
    print("\n| role | workers | peak RSS, largest (MiB) | with torch |")
    print("|---|---|---|---|")
    by_role: dict[str, list[dict]] = {}
    for worker in measured["workers"]:
        for role in worker["roles"]:
            by_role.setdefault(role, []).append(worker)
    for role in WORKER_ROLES.values():
        group = by_role.get(role, [])
        if group:
            largest = max(w["peak_rss_bytes"] for w in group) / 2**20
            print(f"| {role} | {len(group)} | {largest:.0f} | {sum(w['torch'] for w in group)} |")
    total = sum(w["peak_rss_bytes"] for w in measured["workers"]) / 2**20
    print(f"\nsum of the workers' peak RSS: {total:.0f} MiB ({len(measured['workers'])} worker processes)")
    return {"import_rss_bytes": rss, "import_torch": torch_imported, **measured}


def memory(args: argparse.Namespace, work: Path) -> dict:
    model = build_model(work / "model", args.preset)
    rows = []
    for size in args.sizes:
        corpus = work / f"corpus-{size}"
        write_corpus(corpus, size)
        argv = audit_argv(corpus, work / f"out-{size}", model, args.batch_size, threads=1)
        child = subprocess.run(
            [sys.executable, __file__, "_run-one", "--", *argv], check=True, capture_output=True, text=True
        )
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append({"captions": size, **measured})
        print(f"{size:>9} captions: peak RSS {measured['peak_rss_bytes'] / 2**20:8.0f} MiB, "
              f"{measured['seconds']:.0f} s, {measured['rows']} rows", flush=True)  # fmt: skip
    ratio = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
    print(
        f"peak memory ratio {rows[-1]['captions']}/{rows[0]['captions']} captions: {ratio:.2f} (target <= 1.2)"
    )
    return {"rows": rows, "ratio": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "mode", choices=["throughput", "memory", "sizing", "workers", "_run-one", "_run-workers"]
    )
    parser.add_argument("--preset", default=None, help="toy model preset (throughput: small, memory: micro)")
    parser.add_argument(
        "--captions", type=int, default=None, help="corpus size (throughput, sizing: 20000; workers: 50000)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[50_000, 200_000], help="memory: corpus sizes"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--unit-rows", type=int, default=5000, help="sizing: rows per work unit")
    parser.add_argument("--quick", action="store_true", help="smoke run with small sizes (not a measurement)")
    parser.add_argument("--work-dir", help="keep corpora/models here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("audit_argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "_run-one":
        run_one(args)
        return 0
    if args.mode == "_run-workers":
        run_workers(args)
        return 0
    args.captions = args.captions or (50_000 if args.mode == "workers" else 20_000)
    if args.quick:
        args.captions, args.sizes, args.unit_rows = 600, [300, 1200], 100
    args.preset = args.preset or ("small" if args.mode == "throughput" else "micro")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, preset {args.preset}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        modes = {"throughput": throughput, "memory": memory, "sizing": sizing, "workers": workers}
        results = modes[args.mode](args, work)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"mode": args.mode, "preset": args.preset, **results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
