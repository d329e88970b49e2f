"""A real multi-node Ray cluster on this one machine, for the cluster tests and the bench.

Each node is a ``ray start --block`` subprocess in its own process group, with its own
ports (so it never meets another engineer's Ray on the same machine) and one temp dir
for the cluster. Nodes are stopped by killing their process group, never with
``ray stop``, which would stop every Ray session of the machine.

The cluster runs with token authentication (``RAY_AUTH_MODE=token`` and a test token in
``RAY_AUTH_TOKEN`` for every node), as ``ray start --head`` does by default when a
token exists: the drivers under test must cope with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
TOKEN = "evomerge-test-token-0123456789abcdef0123456789abcdef"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (bound and released at once)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def worker_base(seed: int) -> int:
    """The first of 41 worker ports for a node: below Linux's ephemeral range (32768+), where
    ``free_ports`` picks the other ports, so the two never meet."""
    return 12000 + (seed * 7919) % 19000


def cluster_env(token: str | None = TOKEN) -> dict[str, str]:
    """The environment of a node (and of an authenticated driver): token auth on, the test token."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(Path(__file__).resolve().parent.parent),
               # a dead node is noticed in ~3 s instead of Ray's default ~15 s (tests wait less)
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3")
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's whole process group (raylet, workers, actors): a machine lost."""
        if self.proc.poll() is None:
            # Ray's worker processes leave the node's process group: kill the whole tree as well
            victims = descendants(self.proc.pid)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(30)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class LocalCluster:
    """A head and any number of worker nodes, each ``--num-cpus`` CPUs (default 1)."""

    temp_dir: Path
    head_cpus: float = 1
    worker_cpus: float = 1
    dashboard: bool = True
    nodes: dict[str, Node] = field(default_factory=dict)
    address: str = ""
    dashboard_url: str = ""
    _n: int = 0

    def start_head(self) -> None:
        p = free_ports(12)
        self.address = f"127.0.0.1:{p[0]}"
        self.dashboard_url = f"http://127.0.0.1:{p[1]}"
        cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats", "--temp-dir", str(self.temp_dir),
               "--node-ip-address", "127.0.0.1", "--port", str(p[0]), "--dashboard-port", str(p[1]),
               "--dashboard-host", "127.0.0.1", "--include-dashboard", str(self.dashboard).lower(),
               "--node-manager-port", str(p[2]), "--object-manager-port", str(p[3]),
               "--ray-client-server-port", str(p[4]), "--dashboard-agent-listen-port", str(p[5]),
               "--dashboard-agent-grpc-port", str(p[6]), "--metrics-export-port", str(p[7]),
               "--runtime-env-agent-port", str(p[8]),
               "--min-worker-port", str(worker_base(p[9])), "--max-worker-port", str(worker_base(p[9]) + 40),
               "--num-cpus", str(self.head_cpus), "--object-store-memory", str(80 * 1024**2)]
        self._start("head", cmd)
        self._wait_nodes(1)

    def start_worker(self, name: str | None = None, home: str | None = None) -> Node:
        """A worker node (``home``: its HOME, so ``~/...`` paths resolve differently on it)."""
        self._n += 1
        name = name or f"worker{self._n}"
        p = free_ports(6)
        base = worker_base(p[5])
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--address", self.address,
               "--node-ip-address", "127.0.0.1", "--node-manager-port", str(p[0]),
               "--object-manager-port", str(p[1]), "--dashboard-agent-listen-port", str(p[2]),
               "--dashboard-agent-grpc-port", str(p[3]), "--metrics-export-port", str(p[4]),
               "--runtime-env-agent-port", str(p[5]), "--min-worker-port", str(base),
               "--max-worker-port", str(base + 40), "--num-cpus", str(self.worker_cpus),
               "--object-store-memory", str(80 * 1024**2)]
        node = self._start(name, cmd, home)
        self._wait_nodes(sum(1 for n in self.nodes.values() if n.alive()))
        return node

    def _start(self, name: str, cmd: list[str], home: str | None = None) -> Node:
        log = self.temp_dir / f"node_{name}.log"  # removed with the temp dir
        env = cluster_env() if home is None else dict(cluster_env(), HOME=home)
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = Node(name, proc, log)
        self.nodes[name] = node
        return node

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS sees them (asked through a short-lived CLI-free driver)."""
        code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", code, self.address], env=cluster_env(), capture_output=True,
                             text=True, timeout=60)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def _wait_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.proc.poll() is not None and node.proc.returncode not in (0, -9):
                    raise RuntimeError(f"node {node.name} exited: {node.log.read_text()[-2000:]}")
            if self.alive_nodes() == n:  # a node killed just before must be seen dead, the new one alive
                return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster did not reach {n} alive nodes in {timeout:.0f}s")

    def node_of(self, pid: int) -> Node | None:
        """The node whose process tree holds ``pid`` (an actor's worker process)."""
        seen = 0
        while pid > 1 and seen < 20:
            for node in self.nodes.values():
                if node.proc.pid == pid and node.alive():
                    return node
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    pid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return None
            seen += 1
        return None

    def stop(self) -> None:
        """Kill every node, workers first (their process groups; never `ray stop`)."""
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            self.nodes[name].kill()


def new_cluster(**kwargs: object) -> LocalCluster:
    """A cluster whose temp dir is short (Ray's socket paths must stay under ~107 characters)."""
    return LocalCluster(Path(tempfile.mkdtemp(prefix="emc", dir="/tmp")), **kwargs)  # type: ignore[arg-type]
