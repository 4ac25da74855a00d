"""What one small `auditor audit` run costs the machine on a real 2-node Ray: CPU-seconds (all processes) and wall.

Run on an otherwise idle machine; paste the table into BENCHMARKS.md.

  python bench/run_cost.py [--runs 3] [--processes]

The run is the fault drills' shape (tests/integration/test_drills.py): a head with 1 CPU and a second raylet with
2 CPUs (the tests' LocalRayCluster), 3 parquet files of 32 captions, the tiny random SD model, `--generations 4
--batch-size 4 --dtype fp32 --unit-rows 8`, one driver subprocess per run against the cluster. CPU is read from
/proc/stat (user + system + irq + steal, every core), so Ray's daemons, workers and actors count as well as the
driver; anything else running on the machine counts too. --processes also lists the CPU-seconds of each process
alive during the first run (sampled from /proc every 0.2 s: a process that lives less than that is missed).
The tests' Rays also get REPORTER_UPDATE_INTERVAL_MS=60000 (tests/conftest.py), which this script leaves to the
caller's environment: set it there to measure the tests' setting.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the tests' LocalRayCluster and caption corpus
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from cpu_per_test import CLOCK_TICKS, machine_cpu_seconds  # noqa: E402
from ray_cluster import LocalRayCluster, list_processes  # noqa: E402


class ProcessSampler(threading.Thread):
    """CPU-seconds of every process seen while running, by command (the first 90 characters before ' --')."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], tuple[str, float]] = {}
        self.stop = threading.Event()

    def snapshot(self) -> None:
        # Live processes only: a zombie's cmdline is empty, which named the exited driver "python".
        for info, _ in list_processes(environ=False):
            key = (info.pid, info.start_ticks)  # a reused pid is another process
            seconds = info.cpu_ticks / CLOCK_TICKS
            self.first.setdefault(key, seconds)
            self.last[key] = ((info.cmdline or info.comm).split(" --")[0][:90].strip(), seconds)

    def run(self) -> None:
        while not self.stop.is_set():
            self.snapshot()
            time.sleep(0.2)

    def table(self) -> list[tuple[float, int, str]]:
        total: collections.Counter = collections.Counter()
        count: collections.Counter = collections.Counter()
        for key, (name, seconds) in self.last.items():
            spent = seconds - self.first[key]
            if spent > 0.05:
                total[name] += spent
                count[name] += 1
        return [(seconds, count[name], name) for name, seconds in total.most_common(15)]


def write_corpus(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from audit_corpus import captions

    folder.mkdir(parents=True)
    for i in range(3):
        table = pa.table({"caption": captions(f"file {i} shows a", 32)})
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="audits, one after another, each into a new OUTPUT"
    )
    parser.add_argument(
        "--processes", action="store_true", help="CPU-seconds per process during the first run"
    )
    args = parser.parse_args(argv)

    from auditor.toy.models import TINY, build_random_sd

    root = Path(tempfile.mkdtemp(prefix="run-cost-"))
    model = build_random_sd(root / "model", TINY, seed=0)
    write_corpus(root / "in")
    env = {"OMP_NUM_THREADS": "1"}
    rows = []
    first_run = ProcessSampler() if args.processes else None
    started_cpu, started = machine_cpu_seconds(), time.monotonic()
    with LocalRayCluster(head_cpus=1, worker_cpus=2, env=env) as cluster:
        rows.append(("2-node cluster start", machine_cpu_seconds() - started_cpu, time.monotonic() - started))
        for run in range(args.runs):
            command = [
                sys.executable, "-m", "auditor", "audit", str(root / "in"), str(root / f"out-{run}"),
                "--model", str(model), "--generations", "4", "--batch-size", "4", "--dtype", "fp32",
                "--unit-rows", "8", "--no-report", "--quiet", "--address", cluster.address,
            ]  # fmt: skip
            sampler = first_run if run == 0 else None
            if sampler is not None:
                sampler.snapshot()
                sampler.start()
            cpu, wall = machine_cpu_seconds(), time.monotonic()
            done = subprocess.run(
                command, env=cluster.driver_env(os.environ | env), capture_output=True, text=True, cwd=ROOT
            )
            rows.append((f"audit run {run + 1}", machine_cpu_seconds() - cpu, time.monotonic() - wall))
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                return done.returncode
        cpu, wall = machine_cpu_seconds(), time.monotonic()
        time.sleep(30)
        rows.append(("idle cluster, 30 s", machine_cpu_seconds() - cpu, time.monotonic() - wall))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
    )
    print("\n| step | CPU-s (whole machine) | wall s |\n|---|---|---|")
    for name, cpu_s, wall_s in rows:
        print(f"| {name} | {cpu_s:.1f} | {wall_s:.1f} |")
    if first_run is not None:
        print("\nfirst run, by process:\n\n| CPU-s | processes | command |\n|---|---|---|")
        for seconds, count, name in first_run.table():
            print(f"| {seconds:.1f} | {count} | `{name}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
