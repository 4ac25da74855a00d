"""End-to-end audit pipeline on this machine: throughput vs the raw batched scorer, and peak memory vs corpus size.

Run on an otherwise idle machine (timings on shared cores are meaningless); paste the tables into BENCHMARKS.md.

  python bench/pipeline.py throughput [--preset small] [--captions 20000] [--batch-size 32]
      (a) raw: Scorer.score_tokenized over the same captions in batches, torch on all cores, one process;
      (b) pipeline: `auditor audit` (parquet in -> Ray Data -> one actor -> parquet out) on a fresh local Ray.
      efficiency = (a) time / (b) time, target >= 0.85.
      On 2 cores the actor gets 2 torch threads: local Ray with --num-cpus 3 (logical) and --cpus-per-actor 2,
      which leaves one logical CPU for the read/tokenize task (actors holding every CPU hang the run).
  python bench/pipeline.py memory [--preset micro] [--sizes 50000 200000]
      Peak RSS of the driver plus every process it started (Ray's daemons and workers), sampled every 0.2 s,
      for each corpus size in a fresh process; target: flat (ratio largest/smallest <= 1.2).
Add --quick for a seconds-long smoke run of either mode (small sizes; not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
        pq.write_table(table, folder / f"part-{index:05d}.parquet")
    return captions


def build_model(folder: Path, preset: str) -> Path:
    from auditor.toy.models import PRESETS, build_random_sd

    if not (folder / "unet").exists():
        build_random_sd(folder, PRESETS[preset], seed=0)
    return folder


def audit_argv(corpus: Path, out: Path, model: Path, batch_size: int, threads: int) -> list[str]:
    return [
        str(corpus), str(out), "--model", str(model), "--dtype", "fp32", "--batch-size", str(batch_size),
        "--num-cpus", str(threads + 1), "--cpus-per-actor", str(threads), "--gpus-per-actor", "0", "--quiet",
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
    return {"captions": len(captions), "raw_s": raw, "pipeline_total_s": piped, "pipeline_stage_s": inner}


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
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["throughput", "memory", "_run-one"])
    parser.add_argument("--preset", default=None, help="toy model preset (throughput: small, memory: micro)")
    parser.add_argument("--captions", type=int, default=20_000, help="throughput: corpus size")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[50_000, 200_000], help="memory: corpus sizes"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="smoke run with small sizes (not a measurement)")
    parser.add_argument("--work-dir", help="keep corpora/models here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("audit_argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "_run-one":
        run_one(args)
        return 0
    if args.quick:
        args.captions, args.sizes = 600, [300, 1200]
    args.preset = args.preset or ("small" if args.mode == "throughput" else "micro")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, preset {args.preset}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        results = throughput(args, work) if args.mode == "throughput" else memory(args, work)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"mode": args.mode, "preset": args.preset, **results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
