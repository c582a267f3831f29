"""Real Redis topologies on free local ports: a Redis Cluster, and a master with a replica.

Shared by the tests (``tests/cluster_helpers.py`` turns a missing ``redis-server`` into a
skip) and the benchmarks (bench/replicas.py ``--cluster``), so both start a cluster the
same way. Each node is its own ``redis-server`` process without persistence, in a folder of
its own; the cluster is made by ``redis-cli --cluster create`` exactly as an
operator would. Readiness is polled with deadlines (never a fixed sleep): a busy
machine only makes the start slower.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

START_S = 60.0
"""How long a topology may take to become ready (2 busy cores make it slow, not wrong)."""


_HANDED_OUT: set[int] = set()
"""Ports (and their bus ports) this process has handed to nodes."""


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, neither of them handed to a
    node before: a node started a moment ago may not have bound its port yet, and the
    kernel may offer it again."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535 or port in _HANDED_OUT or port + 10000 in _HANDED_OUT:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        _HANDED_OUT.update((port, port + 10000))
        return port


class MissingRedis(RuntimeError):
    """``redis-server`` or ``redis-cli`` is not installed (the tests skip on it)."""


def _binaries(*names: str) -> list[str]:
    found = [shutil.which(name) for name in names]
    missing = [name for name, path in zip(names, found, strict=True) if path is None]
    if missing:
        raise MissingRedis(
            f"{', '.join(missing)} not installed (Debian: apt-get install redis-server "
            "redis-tools); the Redis Cluster and replication tests need real servers"
        )
    return [str(path) for path in found]


def wait_for(check: Callable[[], bool], what: str, timeout: float = START_S) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Node:
    """One private ``redis-server`` process on a free port, in a folder of its own."""

    def __init__(self, binary: str, workdir: Path, args: list[str]) -> None:
        self.port = _free_cluster_port()
        self.dir = workdir / str(self.port)
        self.dir.mkdir(parents=True)
        self.command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(self.dir), *args]  # fmt: skip
        self.proc = self._start()
        self.client = redis.Redis(port=self.port, socket_timeout=10)

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def serving(self) -> bool:
        """Whether this node's own process answers on its port.

        Ports are picked free and then handed to ``redis-server``, so on a machine shared
        with other test runs another process may take the port first: our server then
        exits (it cannot bind), and a ping alone would be answered by theirs, whose data
        their tests flush under ours. Raises once our process has exited.
        """
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"redis-server on port {self.port} exited ({self.proc.returncode}): "
                "is the port (or its cluster bus port, +10000) taken?"
            )
        return self.info("server")["process_id"] == self.proc.pid

    def restart(self) -> None:
        """Start it again on its port and folder (a cluster node rejoins from nodes.conf)."""
        self.proc = self._start()

    def info(self, section: str) -> dict[str, object]:
        return dict(self.client.info(section))

    def online_replicas(self) -> int:
        """How many replicas this master counts as online: the ones ``WAIT`` asks and counts.

        A replica reports ``master_link_status:up`` as soon as it has loaded the master's
        data, and only then sends the acknowledgement that puts it online on the master;
        a write's ``WAIT`` in between neither asks it nor counts it, and the next
        acknowledgement comes up to a second later (every replica sends one a second).
        """
        replication = self.info("replication")
        return sum(
            1
            for key, value in replication.items()
            if key.startswith("slave") and isinstance(value, dict) and value["state"] == "online"
        )

    def kill(self) -> None:
        """``kill -9``."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a script running on: SIGTERM waits for it
                self.kill()


class LocalCluster:
    """A Redis Cluster of ``masters`` masters with one replica each.

    Attributes:
        url: the store URL naming every node (``redis+cluster://127.0.0.1:p1,...``).
        nodes: the nodes by port.
    """

    def __init__(self, workdir: Path, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        server, cli = _binaries("redis-server", "redis-cli")
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms)]
        self.nodes: dict[int, Node] = {}
        try:
            for _ in range(masters * 2):
                node = Node(server, workdir, [*args, "--cluster-config-file", "nodes.conf"])
                self.nodes[node.port] = node
            for node in self.nodes.values():
                wait_for(node.serving, f"redis-server on port {node.port}")
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=START_S,
            )
            self.wait_healthy(masters)
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.nodes)

    def alive(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.proc.poll() is None]

    def masters(self) -> list[Node]:
        """The live nodes that are masters now."""
        return [node for node in self.alive() if node.info("replication")["role"] == "master"]

    def wait_healthy(self, masters: int) -> None:
        """Wait until the cluster has converged: every node is up, sees the cluster ok and
        every other node connected and healthy, all of them agree on which master serves
        which slots, ``masters`` masters serve, and every replica is in sync with its master
        and online on it (so ``WAIT`` counts it: :meth:`Node.online_replicas`).

        ``cluster_state:ok`` alone is not agreement: a node says ok once its own map covers
        every slot, while another may still route a slot to a master that was replaced
        (a client asking it would be sent to the wrong node). Raises if a node's process
        exited.
        """

        def healthy() -> bool:
            views = set()
            for node in self.nodes.values():
                if not node.serving():
                    return False
                if node.client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
                replication = node.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
                known = node.client.execute_command("CLUSTER NODES")
                if len(known) != len(self.nodes) or any(
                    "fail" in peer["flags"] or not peer["connected"] for peer in known.values()
                ):
                    return False
                views.add(
                    frozenset(
                        (address.split("@")[0], str(peer["slots"]))
                        for address, peer in known.items()
                        if "master" in peer["flags"] and peer["slots"]
                    )
                )
            serving = self.masters()
            return (
                len(views) == 1
                and {address for address, _ in views.pop()}
                == {f"127.0.0.1:{node.port}" for node in serving}
                and len(serving) == masters
                and sum(node.online_replicas() for node in serving) == len(self.nodes) - masters
            )

        wait_for(healthy, f"a healthy cluster of {masters} masters")

    def flush(self) -> None:
        for node in self.masters():
            node.client.flushall()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


@contextlib.contextmanager
def local_cluster(workdir: Path, node_timeout_ms: int = 1000) -> Iterator[LocalCluster]:
    cluster = LocalCluster(workdir, node_timeout_ms=node_timeout_ms)
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def replicated_redis(workdir: Path) -> Iterator[tuple[Node, Node]]:
    """A master and one replica of it (``--replicaof``), the replica in sync."""
    [server] = _binaries("redis-server")
    master = Node(server, workdir, [])
    replica = None
    try:
        wait_for(master.serving, "the master")
        replica = Node(server, workdir, ["--replicaof", "127.0.0.1", str(master.port)])
        wait_for(
            lambda: replica.serving() and master.online_replicas() == 1,  # type: ignore[union-attr]
            "the replica to sync (online on the master)",
        )
        yield master, replica
    finally:
        master.stop()
        if replica is not None:
            replica.stop()
