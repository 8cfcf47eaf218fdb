"""A Redis master, its replica and three Sentinels on loopback: a real failover for tests.

`SentinelGroup` stands where a Fleet takes a RedisServer (`url`, `client()`, `stop()`): its
`url` is the `sentinel://` REDIS_URL that every process of the fleet gets.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.procs import RedisServer, free_port, wait_until

MASTER_NAME = "mymaster"


@dataclass
class SentinelGroup:
    workdir: Path
    master_name: str = MASTER_NAME
    down_after_ms: int = 1000  # a silent master is "down" after this; then the Sentinels vote
    failover_timeout_ms: int = 4000
    nodes: list[RedisServer] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    sentinel_procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "sentinel://" + ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def start(self) -> "SentinelGroup":
        master = RedisServer(port=free_port(), workdir=self._dir("master")).start()
        replica = RedisServer(port=free_port(), workdir=self._dir("replica"),
                              args=["--replicaof", "127.0.0.1", str(master.port)]).start()
        self.nodes = [master, replica]
        wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up", 10,
                   what="the replica in sync")
        exe = shutil.which("redis-server")
        for index in range(3):
            port = free_port()
            folder = self._dir(f"sentinel-{index}")
            conf = folder / "sentinel.conf"  # Sentinel rewrites its config: a file of its own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n")
            self.sentinel_ports.append(port)
            self.sentinel_procs.append(subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL))
        # Ready when every Sentinel knows the replica and the other two Sentinels.
        for port in self.sentinel_ports:
            sentinel = redis.Redis(port=port)
            wait_until(lambda: (state := sentinel.sentinel_master(self.master_name))["num-slaves"] >= 1
                       and state["num-other-sentinels"] >= 2, 20, interval=0.1, what=f"Sentinel {port} ready")
        return self

    def _dir(self, name: str) -> Path:
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def master_port(self) -> int:
        """The master's port as the Sentinels report it (the first one that answers)."""
        for port in self.sentinel_ports:
            try:
                return int(redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(
                    self.master_name)[1])
            except redis.RedisError:
                continue
        raise RuntimeError("no Sentinel answers")

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(node for node in self.nodes if node.port == port)

    def client(self) -> redis.Redis:
        """A plain client of the current master (not following a failover: tests ask again)."""
        return self.master().client()

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> RedisServer:
        """Until every Sentinel names another master and that node answers as a master."""
        def promoted():
            ports = {int(redis.Redis(port=p, socket_timeout=1).sentinel_get_master_addr_by_name(
                self.master_name)[1]) for p in self.sentinel_ports}
            if len(ports) != 1 or old_port in ports:
                return None
            node = next(n for n in self.nodes if n.port in ports)
            return node if node.client().info("replication")["role"] == "master" else None
        return wait_until(promoted, timeout, interval=0.1, what=f"a failover away from port {old_port}")

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for node in self.nodes:
            node.stop()
