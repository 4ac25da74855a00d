"""Shared fixtures: tiny SD folders built from configs once per session; no downloads, ever."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray a test starts (in-process, a CLI run's own, LocalRayCluster's nodes) inherits this: the dashboard agent's
# node stats (psutil over every worker, each 5 s by default) feed only the dashboard's views, which no test reads;
# the Prometheus metrics the tests scrape are exported apart from them. With its log monitors off too, an idle
# 2-node test cluster took 5.4 CPU-s a minute instead of 7.6 (one measurement; the whole run: BENCHMARKS.md §5c).
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests that start a Ray cluster of their own (the `ray_cluster` fixture, or the `own_ray_cluster` mark, whose
# argument names the group) run one after another on the worker of a group that holds a Ray already: with three
# multi-node Rays at once on 2 cores (load average 18), `ray start` timed out registering a raylet (Ray allows it
# 30 s) and a drill's 60 s stall watchdog fired before the score actor was up (2026-12-01, one whole run).
OWN_CLUSTER_GROUP = "drills"
# Under pytest-xdist (`make test`: --dist loadgroup), the tests that share an expensive per-process fixture run on one
# worker, so that fixture starts once: a local Ray (ray_local), the drills' 2-node cluster, the trained toy.
FIXTURE_GROUPS = {
    "drills": "drills",
    "ray_cluster": OWN_CLUSTER_GROUP,
    "ray_local": "ray_local",
    "toy_model_dir": "toy_model",
    "flow_toy": "flow_toy",
}
# Sent to the workers first, in this order (with --no-loadscope-reorder): the single-threaded toy rebuild on a
# worker of its own from the start, then the groups longest first; the rest fills in behind. The toy groups used to
# sit behind a dozen small modules in the queue and were taken last, by the rebuild's worker: that chain ended the
# run with one worker busy for its last ~10 min (two whole runs, 2026-12-01; BENCHMARKS.md §5).
FIRST = ("test_rebuild_from_scratch_matches_the_shipped_model",)
FIRST_GROUPS = ("drills", "ray_local", "toy_model", "flow_toy")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    groups = {}
    for item in items:
        names = {group for fixture, group in FIXTURE_GROUPS.items() if fixture in item.fixturenames}
        own_cluster = item.get_closest_marker("own_ray_cluster")
        if own_cluster is not None:
            names.add(own_cluster.args[0] if own_cluster.args else OWN_CLUSTER_GROUP)
        names = sorted(names)
        if names:
            groups[item.nodeid] = "_".join(names)
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))

    def rank(item) -> int:
        if item.name in FIRST:
            return 0
        group = groups.get(item.nodeid)
        return 1 + FIRST_GROUPS.index(group) if group in FIRST_GROUPS else 1 + len(FIRST_GROUPS)

    items.sort(key=rank)  # stable: collection order within each rank


class XdistGroupSuffix:
    """pytest-xdist's loadgroup puts `@<group>` on a test's node id (its scheduler groups by it) through
    `item._nodeid`, which pytest 9 no longer reads (`item._id`): without this, every group is silently split
    across workers (seen with xdist 3.8 + pytest 9.2: each worker started its own Ray and trained its own toy).
    A no-op wherever xdist's own suffix took."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not config.getvalue("loadgroup"):
            return
        from _pytest.nodeid import coerce_node_id

        for item in items:
            marks = item.iter_markers("xdist_group")
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks})
            if names and "@" not in item.nodeid:
                item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config
    if hasattr(config, "workerinput"):  # an xdist worker: its collection is what the scheduler groups
        config.pluginmanager.register(XdistGroupSuffix(), "auditor-xdist-group-suffix")
        share_cores_among_workers(int(config.workerinput["workercount"]))


def share_cores_among_workers(workers: int) -> None:
    """Give each xdist worker its share of the cores for torch, and the same to the processes it starts (CLI
    drivers; Ray sets its own workers' share). torch defaults to every core in every worker: three workers with two
    OpenMP threads each on 2 cores, beside Ray, made the toy's mitigation loop 4x slower than one thread
    (53 s vs 13 s with one other busy process; BENCHMARKS.md §5a). An OMP_NUM_THREADS the caller set is kept, and
    torch takes its first level ("4,2" is OpenMP's nested form)."""
    share = max(1, (os.cpu_count() or 1) // workers)
    given = os.environ.setdefault("OMP_NUM_THREADS", str(share)).split(",")[0].strip()
    torch.set_num_threads(int(given) if given.isdigit() and int(given) > 0 else share)


_CONFIG = None


def pytest_runtest_logreport(report):
    """Name a failure the moment it happens (on the xdist controller, or a run without xdist), so that a run cut
    off by a time limit still says what failed; the -rfE summary at the end repeats them."""
    if not report.failed or _CONFIG is None or hasattr(_CONFIG, "workerinput"):
        return
    reporter = _CONFIG.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    reason = f" - {crash.message.splitlines()[0][:200]}" if crash is not None and crash.message else ""
    worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None)
    where = f" [{worker}]" if worker else ""
    reporter.write_line("")  # off the progress line of -q
    reporter.write_line(
        f"FAILED {report.nodeid} ({report.when}, {report.duration:.0f} s){where}{reason}", red=True, bold=True
    )
    reporter.flush()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test starts with the process's torch thread count: `ScoreActor` sets it for its process (right in a
    Ray actor), which in a test process changed it for every later test, and CPU results depend on it in the last
    bits (scores differ by ~1e-6 between 1 and 2 threads)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Random tiny SD v1-style model (epsilon prediction), 4x16x16 latents."""
    from auditor.toy.models import TINY, build_random_sd

    return build_random_sd(tmp_path_factory.mktemp("tiny-eps") / "model", TINY, seed=0)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> Path:
    """Random micro SD v1-style model (epsilon prediction), 4x8x8 latents: the integration tests' model. Their
    checks are on rows, units, files and processes, not on shapes, and each of their ~60 audits scores its
    captions in a third of the tiny model's time (0.97 against 3.2 CPU-s for 96 captions x 4 generations, one
    thread; BENCHMARKS.md §5c)."""
    from auditor.toy.models import MICRO, build_random_sd

    return build_random_sd(tmp_path_factory.mktemp("micro-eps") / "model", MICRO, seed=0)


@pytest.fixture(scope="session")
def micro_scorer(micro_model_dir):
    from auditor import Scorer

    return Scorer.from_pretrained(micro_model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory) -> Path:
    """Random tiny SD 2.x-style model (v-prediction), with a non-square latent to catch shape assumptions."""
    from auditor.toy.models import TINY, build_random_sd

    return build_random_sd(
        tmp_path_factory.mktemp("tiny-v") / "model", TINY, seed=1, prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def tiny_scorer(tiny_model_dir):
    from auditor import Scorer

    return Scorer.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (free port) for the session; credentials through the environment only."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """The toy memorizing model, `test` preset, seed 0: trained once per session (about 1-2 min on 2 CPU cores).

    A diffusers SD folder plus `toy_manifest.json`: `auditor.toy.manifest.load_manifest(toy_model_dir)` gives the
    memorized captions (each with its trigger word and training latent), seen-once and held-out captions.
    """
    from auditor.toy.train import build_toy_model

    path, _ = build_toy_model(tmp_path_factory.mktemp("toy") / "model", "test", seed=0)
    return path


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random tiny pipelines of the newer families, built from configs with offline tokenizers (a few seconds):
    sdxl, sd3 (with T5), sd3-no-t5 (text_encoder_3 recorded as null), pixart-sigma.
    """
    from auditor.toy.families import build_random_pixart, build_random_sd3, build_random_sdxl

    root = tmp_path_factory.mktemp("families")
    return {
        "sdxl": build_random_sdxl(root / "sdxl", seed=0),
        "sd3": build_random_sd3(root / "sd3", seed=0),
        "sd3-no-t5": build_random_sd3(root / "sd3-no-t5", seed=1, t5=False),
        "pixart-sigma": build_random_pixart(root / "pixart", seed=0),
    }
