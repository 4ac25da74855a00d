"""Where the test suite's CPU goes: the machine's CPU-seconds during each test, run one test at a time.

`make test` keeps both cores of a 2-core machine busy from start to end, so its wall time is its CPU-seconds over
the cores, and what to make cheaper is what uses the CPU. Ray's daemons, workers and actors are not pytest's
children, so CPU is read from /proc/stat (every core, every process), before and after each test's setup, call and
teardown. That is only the test's own cost when nothing else runs: use it without -n, on an otherwise idle machine.

  PYTHONPATH=bench OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p cpu_per_test tests   # -> runs/cpu_per_test.jsonl
  .venv/bin/python bench/cpu_per_test.py runs/cpu_per_test.jsonl [--top 25]

OMP_NUM_THREADS=1 gives torch in the test process the one thread each of `make test`'s three workers gets on 2
cores. CPU_PER_TEST_OUT names another output file; rows are appended, so two partial runs add up.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from pathlib import Path

import pytest

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_OUT = "runs/cpu_per_test.jsonl"


def machine_cpu_seconds() -> float:
    """Busy CPU-seconds of the whole machine since boot (every field of /proc/stat but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields) - idle - iowait) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The plugin ---------------------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        raise pytest.UsageError(
            "cpu_per_test measures the whole machine around each test: run it without -n (one test at a time), "
            "or every worker's CPU counts for every test."
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    machine, own, started = machine_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    yield
    row = {
        "test": item.nodeid,
        "wall_s": round(time.monotonic() - started, 2),
        "machine_cpu_s": round(machine_cpu_seconds() - machine, 2),
        "pytest_cpu_s": round(own_cpu_seconds() - own, 2),
    }
    out = Path(os.environ.get("CPU_PER_TEST_OUT", DEFAULT_OUT))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


# The report ---------------------------------------------------------------------------------------------------
def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path} line {number} is not a JSON row of cpu_per_test ({exc})") from None
    return rows


def report(rows: list[dict], top: int) -> str:
    machine = sum(r["machine_cpu_s"] for r in rows)
    lines = [
        f"{len(rows)} tests: {machine:.0f} machine CPU-s, {sum(r['wall_s'] for r in rows):.0f} s of wall "
        f"one after another; {machine / 2:.0f} s on 2 fully busy cores",
        "",
        "| machine CPU-s | tests | module |",
        "|---|---|---|",
    ]
    modules: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for row in rows:
        module = row["test"].split("::")[0]
        modules[module] += row["machine_cpu_s"]
        counts[module] += 1
    lines += [f"| {cpu:.0f} | {counts[module]} | `{module}` |" for module, cpu in modules.most_common()]
    lines += ["", "| machine CPU-s | of it pytest's own | wall s | test |", "|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: -r["machine_cpu_s"])[:top]:
        lines.append(
            f"| {row['machine_cpu_s']:.0f} | {row['pytest_cpu_s']:.0f} | {row['wall_s']:.0f} | `{row['test']}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tabulate cpu_per_test's rows: machine CPU-s per test module and the costliest tests.",
        allow_abbrev=False,
    )
    parser.add_argument("rows", nargs="+", help=f"JSON-lines files the plugin wrote (default {DEFAULT_OUT})")
    parser.add_argument(
        "--top", type=int, default=25, help="how many of the costliest tests to list (default 25)"
    )
    args = parser.parse_args(argv)
    print(report(read_rows(args.rows), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
