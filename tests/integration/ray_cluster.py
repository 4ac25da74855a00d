"""A real 2-node Ray cluster on this machine for integration tests and fault drills: a head and a second raylet.

Test support only (imports no ray: every Ray call runs in a subprocess driver). Everything it starts is private:
its own --temp-dir under /tmp, its own ports, its own auth token file; it finds its processes by that temp dir and
never runs a broad `ray stop`, so an in-process `ray.init()` (the `ray_local` fixture) or another engineer's
cluster on the same machine is left alone.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# Ray resolves 127.0.0.1 (and "localhost") to the machine's interface address; any other loopback address is
# kept as given, so the nodes, their agents and every driver talk over lo only.
NODE_IP = "127.0.0.2"
# Below Linux's ephemeral range (32768-60999 by default), so outgoing connections never take a port we picked.
PORT_RANGE = (10_000, 32_000)
WORKER_PORTS = 30  # worker processes per node (each takes one port): actors, tasks, Ray Data's pool
NODE_ENV = (
    "AUDITOR_TEST_RAY_NODE"  # "<temp dir>:head" or "<temp dir>:worker", inherited by every process of a node
)
RAY_BIN = str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class NodePorts:
    """The ports of one raylet (and, for the head, of the GCS and its services). Workers take min..max."""

    node_manager: int
    object_manager: int
    agent_listen: int
    agent_grpc: int
    metrics_export: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int
    gcs: int | None = None
    client_server: int | None = None
    dashboard: int | None = None
    # Prometheus servers of the head's dashboard and autoscaler monitor: fixed defaults (44227, 44217) in Ray,
    # which two clusters on one machine would share; set through the environment, there is no flag.
    dashboard_metrics: int | None = None
    autoscaler_metrics: int | None = None

    @classmethod
    def from_block(cls, base: int, head: bool) -> NodePorts:
        return cls(
            node_manager=base,
            object_manager=base + 1,
            agent_listen=base + 2,
            agent_grpc=base + 3,
            metrics_export=base + 4,
            runtime_env_agent=base + 5,
            gcs=base + 6 if head else None,
            client_server=base + 7 if head else None,
            dashboard=base + 8 if head else None,
            dashboard_metrics=base + 9 if head else None,
            autoscaler_metrics=base + 10 if head else None,
            min_worker=base + 11,
            max_worker=base + 11 + WORKER_PORTS - 1,
        )

    def flags(self) -> list[str]:
        flags = [
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            f"--dashboard-agent-listen-port={self.agent_listen}",
            f"--dashboard-agent-grpc-port={self.agent_grpc}",
            f"--metrics-export-port={self.metrics_export}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
            f"--min-worker-port={self.min_worker}",
            f"--max-worker-port={self.max_worker}",
        ]
        if self.gcs is not None:
            flags += [
                f"--port={self.gcs}",
                f"--ray-client-server-port={self.client_server}",
                f"--dashboard-port={self.dashboard}",
            ]
        return flags

    def env(self) -> dict[str, str]:
        if self.gcs is None:
            return {}
        return {
            "DASHBOARD_METRIC_PORT": str(self.dashboard_metrics),
            "AUTOSCALER_METRIC_PORT": str(self.autoscaler_metrics),
        }


BLOCK_SIZE = 11 + WORKER_PORTS


def _port_free(port: int) -> bool:
    # Ray binds its servers on all interfaces; a port taken on any address fails this bind too.
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def find_port_block(size: int = BLOCK_SIZE, attempts: int = 200) -> int:
    """First port of `size` consecutive ports that are all free now (a random start, so parallel runs rarely meet)."""
    rng = secrets.SystemRandom()
    for _ in range(attempts):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - size)
        if all(_port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports in {PORT_RANGE} after {attempts} tries")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    state: str
    cmdline: str
    # Clock ticks (os.sysconf("SC_CLK_TCK") a second): user + system CPU so far, and the start after boot, which
    # tells a reused pid from the process that had it.
    cpu_ticks: int
    start_ticks: int
    # The comm field: the name of a process whose cmdline is empty (a kernel thread, a zombie).
    comm: str


def read_proc(pid: int, *, environ: bool = True) -> tuple[ProcInfo, bytes] | None:
    """The process's /proc facts and its raw environment block (b"" with environ=False, which a sampling loop wants:
    reading every process's environment is the costly part); None when it is gone or not ours to read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        env = b""
        if environ:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it start at the last ')'.
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    info = ProcInfo(
        pid=pid,
        ppid=int(fields[1]),
        sid=int(fields[3]),
        state=fields[0],
        cmdline=cmdline,
        cpu_ticks=int(fields[11]) + int(fields[12]),
        start_ticks=int(fields[19]),
        comm=comm,
    )
    return info, env


def list_processes(*, environ: bool = True) -> Iterator[tuple[ProcInfo, bytes]]:
    """Every live (non-zombie) process: its info and its raw environment block (b"" with environ=False)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = read_proc(int(entry), environ=environ)
            if found is not None and found[0].state != "Z":
                yield found


def _kill_all(match, grace_s: float, timeout_s: float = 15.0) -> list[int]:
    """SIGTERM (when grace_s > 0), then SIGKILL, every process `match(info, environ)` selects, until none is left.

    Rescans after each round: a raylet may spawn a worker between the scan and the kill.
    """
    killed: set[int] = set()
    me = os.getpid()
    sig = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
    deadline = time.monotonic() + timeout_s
    term_until = time.monotonic() + grace_s
    while True:
        pids = [info.pid for info, env in list_processes() if info.pid != me and match(info, env)]
        if not pids:
            return sorted(killed)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} survived SIGKILL for {timeout_s} s")
        if sig == signal.SIGTERM and time.monotonic() > term_until:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                killed.add(pid)
        time.sleep(0.1 if sig == signal.SIGKILL else 0.3)


class LocalRayCluster:
    """A head raylet (`head_cpus`) and a second raylet (`worker_cpus`) on this machine, with token auth.

        with LocalRayCluster() as cluster:
            subprocess.run([..., "--address", cluster.address], env=cluster.driver_env())
            cluster.kill_worker_node()

    Every process it starts carries `AUDITOR_TEST_RAY_NODE=<temp dir>:<head|worker>` in its environment, and Ray
    passes its environment on to the node's workers and actors, whose command lines become `ray::…`: that marker,
    not a process name, is how `kill_worker_node()` and `stop()` find exactly this cluster's processes.
    `node_timeout_s` sets how fast the head declares a silent node dead (health checks every 0.5 s; Ray's own
    defaults take several times longer).
    """

    def __init__(
        self,
        head_cpus: int = 1,
        worker_cpus: int = 2,
        *,
        object_store_mb: int = 128,
        env: Mapping[str, str] | None = None,
        dashboard: bool = False,
        node_timeout_s: float = 5.0,
        start_timeout_s: float = 120.0,
        token_in_env: bool = False,
    ) -> None:
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.object_store_mb = object_store_mb
        self.extra_env = dict(env or {})
        self.dashboard = dashboard
        self.node_timeout_s = node_timeout_s
        self.start_timeout_s = start_timeout_s
        # The token as KubeRay's authOptions passes it, RAY_AUTH_TOKEN in every process's environment, instead of
        # RAY_AUTH_TOKEN_PATH naming the private file.
        self.token_in_env = token_in_env
        self.temp_dir: Path | None = None
        self.head_ports: NodePorts | None = None
        self.worker_ports: NodePorts | None = None
        self._token_path: Path | None = None
        self._started = False

    # 1. Lifecycle ------------------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The GCS address (`host:port`) for `ray.init(address=...)`, RAY_ADDRESS and `--address`."""
        if self.head_ports is None:
            raise RuntimeError("the cluster is not started")
        return f"{NODE_IP}:{self.head_ports.gcs}"

    @property
    def token(self) -> str:
        """The cluster's auth token (kept in <temp dir>/auth_token)."""
        if self._token_path is None:
            raise RuntimeError("the cluster is not started")
        return self._token_path.read_text().strip()

    @property
    def token_file(self) -> Path | None:
        return self._token_path

    @property
    def dashboard_url(self) -> str:
        """`ray job submit --address` (and the state API's) endpoint; needs `dashboard=True`."""
        if not self.dashboard:
            raise RuntimeError("the dashboard is off: pass LocalRayCluster(dashboard=True) to submit jobs")
        return f"http://127.0.0.1:{self.head_ports.dashboard}"

    def start(self) -> LocalRayCluster:
        if self._started:
            raise RuntimeError("the cluster is already started")
        # Short: Ray's AF_UNIX socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay < 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self._token_path = self.temp_dir / "auth_token"
        self._token_path.write_text(secrets.token_hex(32))
        self._token_path.chmod(0o600)
        self._started = True
        atexit.register(self.stop)
        try:
            self._start_node(head=True)
            # `ray start` returns once the GCS has registered its raylet: no need to poll for the node here.
            self._start_node(head=False)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process of this cluster (drivers started with driver_env() too) and delete its temp dir."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        try:
            _kill_all(self._is_cluster_process, grace_s=2.0)
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def kill_worker_node(self) -> list[int]:
        """SIGKILL the second raylet and everything it runs (workers, actors, agents, log monitor); returns pids."""
        return _kill_all(lambda info, env: self._node_marker("worker") in env, grace_s=0)

    def restart_worker_node(self) -> None:
        """Kill the second raylet if it runs and start a fresh one (new ports), registered with the head on return."""
        self.kill_worker_node()
        self._start_node(head=False)

    # 2. Drivers ----------------------------------------------------------------------------------------------------
    def driver_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a driver subprocess needs: RAY_ADDRESS, token auth, and this cluster's marker."""
        env = self._env(base)
        env["RAY_ADDRESS"] = self.address
        env[NODE_ENV] = f"{self.temp_dir}:driver"
        return env

    def run_driver(self, code: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run `code` in a fresh Python that has connected with `ray.init()`; raises with its output if it fails."""
        script = "import ray\nray.init(log_to_driver=False)\n" + textwrap.dedent(code)
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=self.driver_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"driver exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-4000:]}"
            )
        return done

    def _driver_json(self, code: str, timeout_s: float) -> object:
        out = self.run_driver(code, timeout_s=timeout_s).stdout
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"driver printed no RESULT line:\n{out}")
        return json.loads(lines[-1][len("RESULT ") :])

    def wait_for_alive_nodes(self, count: int, timeout_s: float = 60.0) -> list[dict]:
        """Poll (in one driver) until exactly `count` nodes are alive; their `nodes()` rows. Raises on timeout."""
        code = f"""
            import json, time
            deadline = time.monotonic() + {timeout_s}
            while True:
                nodes = [
                    {{"node_id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0.0),
                      "node_manager_port": n["NodeManagerPort"]}}
                    for n in ray.nodes()
                ]
                alive = [n for n in nodes if n["alive"]]
                if len(alive) == {count} or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            print("RESULT " + json.dumps(alive))
        """
        alive = self._driver_json(code, timeout_s=timeout_s + 60)
        if len(alive) != count:
            raise TimeoutError(f"{len(alive)} alive nodes after {timeout_s} s, expected {count}: {alive}")
        return alive

    def nodes(self) -> list[dict]:
        """Alive nodes as the head sees them: node_id, alive, cpus, node_manager_port."""
        code = """
            import json
            print("RESULT " + json.dumps([
                {"node_id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0.0),
                 "node_manager_port": n["NodeManagerPort"]}
                for n in ray.nodes() if n["Alive"]
            ]))
        """
        return self._driver_json(code, timeout_s=120)

    def actor_pids(self, class_name: str) -> dict[int, str]:
        """pid -> node id of every ALIVE actor of `class_name` (e.g. "ScoreActor"), from outside the job.

        With the dashboard on this asks Ray's state API (`ray.util.state.list_actors`); the state API is served by
        the dashboard, so without it this reads the same actor table from the GCS (`ray._private.state.actors`).
        """
        if self.dashboard:
            code = f"""
                import json
                from ray.util.state import list_actors
                rows = list_actors(filters=[("class_name", "=", {class_name!r}), ("state", "=", "ALIVE")])
                print("RESULT " + json.dumps({{str(a.pid): a.node_id for a in rows}}))
            """
        else:
            code = f"""
                import json
                from ray._private import state
                rows = [a for a in state.actors().values()
                        if a["ActorClassName"] == {class_name!r} and a["State"] == "ALIVE"]
                print("RESULT " + json.dumps({{str(a["Pid"]): a["Address"]["NodeID"] for a in rows}}))
            """
        return {int(pid): node for pid, node in self._driver_json(code, timeout_s=120).items()}

    def processes(self) -> list[ProcInfo]:
        """This cluster's live processes (raylets, GCS, agents, workers, drivers started with driver_env())."""
        return [info for info, env in list_processes() if self._is_cluster_process(info, env)]

    # 3. Internals --------------------------------------------------------------------------------------------------
    def _node_marker(self, role: str) -> bytes:
        return f"{NODE_ENV}={self.temp_dir}:{role}\0".encode()

    def _is_cluster_process(self, info: ProcInfo, environ: bytes) -> bool:
        marker = f"{NODE_ENV}={self.temp_dir}:".encode()
        return marker in environ or str(self.temp_dir) in info.cmdline

    def _env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):  # an outer cluster's settings must not leak in
            env.pop(key, None)
        env.update(self.extra_env)
        env["RAY_AUTH_MODE"] = "token"
        if self.token_in_env:
            env.pop("RAY_AUTH_TOKEN_PATH", None)
            env["RAY_AUTH_TOKEN"] = self.token
        else:
            # never ~/.ray/auth_token, which other clusters share
            env["RAY_AUTH_TOKEN_PATH"] = str(self._token_path)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def _start_node(self, head: bool) -> None:
        role = "head" if head else "worker"
        env = self._env()
        env[NODE_ENV] = f"{self.temp_dir}:{role}"
        if head:
            # How long the GCS waits for a silent raylet before declaring it dead (the drills wait on this).
            period_ms = 500
            env["RAY_health_check_period_ms"] = str(period_ms)
            env["RAY_health_check_timeout_ms"] = str(period_ms)
            env["RAY_health_check_failure_threshold"] = str(
                max(1, round(self.node_timeout_s * 1000 / period_ms))
            )
        last_error = ""
        for _ in range(3):  # a port picked free can be taken before Ray binds it: pick another block
            ports = NodePorts.from_block(find_port_block(), head=head)
            cmd = [RAY_BIN, "start", f"--node-ip-address={NODE_IP}", f"--temp-dir={self.temp_dir}"]
            cmd += ["--disable-usage-stats", f"--object-store-memory={self.object_store_mb * 1024 * 1024}"]
            # No log monitor: it polls the node's log folder every 0.1 s (a glob per poll, more as workers come
            # and go) to stream worker output to drivers, and every driver here runs with log_to_driver off.
            cmd += ["--include-log-monitor=false"]
            if head:
                cmd += [
                    "--head",
                    f"--num-cpus={self.head_cpus}",
                    f"--include-dashboard={str(self.dashboard).lower()}",
                ]
            else:
                cmd += [f"--address={self.address}", f"--num-cpus={self.worker_cpus}"]
            cmd += ports.flags()
            env.update(ports.env())
            log = self.temp_dir / f"ray-start-{role}.log"
            with open(log, "a") as out:
                # Own session: the daemons it leaves behind are not in pytest's process group (a Ctrl-C there
                # would otherwise hit them first); stop() still finds them by their environment.
                done = subprocess.run(
                    cmd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=self.start_timeout_s,
                    start_new_session=True,
                )
            if done.returncode == 0:
                if head:
                    self.head_ports = ports
                else:
                    self.worker_ports = ports
                return
            last_error = log.read_text()[-3000:]
            _kill_all(lambda info, e, role=role: self._node_marker(role) in e, grace_s=0)
            if head:
                # a failed head may have left a session behind; the next try must start clean
                for child in self.temp_dir.glob("session_*"):
                    shutil.rmtree(child, ignore_errors=True)
        raise RuntimeError(f"`ray start` of the {role} node failed 3 times; last output:\n{last_error}")
