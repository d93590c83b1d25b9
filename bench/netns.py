"""An emulated multi-node cluster on one machine: network namespaces, a bridge, tbf-limited links.

Why: the LSH all-to-all pays off when the *inter-node* link is the bottleneck, and a single
machine has none. This module builds one:

* one network namespace per node (``mlsh-<pid>-node<k>``) and one for the switch
  (``mlsh-<pid>-switch``, holding a Linux bridge ``br0``); nothing is added to the caller's
  own namespace, so the host's network is never touched;
* one veth pair per node: ``mlsh<k>`` inside the node namespace with address
  ``10.77.0.<k+1>/24``, its peer ``port<k>`` attached to the bridge; ``lo`` up everywhere;
* a token-bucket qdisc (``tc qdisc ... root tbf rate <R>mbit burst <B> latency <L>ms``) on
  BOTH ends of every veth: the node end's egress is the node's upload, the bridge port's egress
  its download, so each node's NIC is limited to R in each direction, like a real NIC.
  Bandwidth ``None`` or ``0`` means unlimited (no qdisc).

Processes started in a node namespace talk to other nodes over the bridge (limited) and to
processes of the same node through that namespace's ``lo`` (unlimited): the kernel delivers
traffic to one of its own addresses (``10.77.0.<k+1>`` included) via the ``local`` routing
table on ``lo`` (``ip -n mlsh-<pid>-node0 route get 10.77.0.1`` prints ``local ... dev lo``),
which :func:`main` ``--check`` shows and measures.

Cleanup: deleting a namespace deletes its veth ends and their qdiscs, so :meth:`close` kills
the processes it started and deletes every namespace it created. It runs on normal exit, on an
exception (context manager), at interpreter exit, and on SIGINT / SIGTERM (handlers that clean
up, then re-raise the signal's usual effect). Namespaces of earlier runs whose pid no longer
exists (a ``kill -9``) are removed on entry by :func:`remove_stale`.

Requires root and a working ``ip netns``; otherwise :class:`NetnsError` says so in one sentence.

    sudo python bench/netns.py --check --bandwidth 40      # build 2 nodes, measure, clean up
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

PREFIX = "mlsh-"
SUBNET = "10.77.0"
_TIMEOUT_S = 20


class NetnsError(RuntimeError):
    """The emulated cluster cannot be built or driven; the message is one sentence."""


def _run(cmd: Sequence[str], check: bool = True, timeout: float = _TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run one ``ip`` / ``tc`` command; raise :class:`NetnsError` (one sentence) on failure."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NetnsError(f"{cmd[0]} is not installed ({exc.strerror})") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"'{' '.join(cmd)}' did not finish within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsError(f"'{' '.join(cmd)}' failed: {err[-1] if err else 'exit ' + str(proc.returncode)}")
    return proc


def check_supported() -> None:
    """Raise :class:`NetnsError` unless we are root and ``ip netns`` works."""
    if os.geteuid() != 0:
        raise NetnsError("the emulated cluster needs root (network namespaces and tc); run as root")
    try:
        _run(["ip", "netns", "list"])
    except NetnsError as exc:
        raise NetnsError(f"'ip netns' is unavailable here: {exc}") from None


def list_namespaces() -> List[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (in our pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids_in(namespace: str) -> None:
    """SIGKILL every process still inside ``namespace`` (leftovers of our own runs)."""
    out = _run(["ip", "netns", "pids", namespace], check=False).stdout
    for token in out.split():
        if token.isdigit() and int(token) != os.getpid():
            try:
                os.kill(int(token), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def delete_namespace(namespace: str) -> None:
    """Kill what runs inside ``namespace`` and delete it (its veths and qdiscs go with it)."""
    _kill_pids_in(namespace)
    _run(["ip", "netns", "del", namespace], check=False)


def remove_stale(prefix: str = PREFIX) -> List[str]:
    """Delete ``<prefix><pid>-*`` namespaces whose pid no longer exists; return their names."""
    removed = []
    for name in list_namespaces():
        m = re.match(rf"^{re.escape(prefix)}(\d+)-", name)
        if m and not pid_alive(int(m.group(1))):
            delete_namespace(name)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Node:
    """One emulated node: its namespace, NIC (veth end) name and address."""
    index: int
    namespace: str
    ifname: str
    address: str
    port: str  # the bridge-side veth end, in the switch namespace


class EmulatedCluster:
    """``nodes`` network namespaces joined by a bridge, each NIC limited to ``bandwidth_mbit``.

    Use as a context manager; :meth:`popen` starts a command inside a node, :meth:`set_bandwidth`
    changes the limit of every link in place, :meth:`close` tears everything down.
    """

    def __init__(self, nodes: int = 2, bandwidth_mbit: Optional[float] = None,
                 latency_ms: float = 50.0, burst_kb: Optional[float] = None,
                 tag: Optional[str] = None, tcp_slow_start_after_idle: Optional[bool] = None):
        """Describe the cluster; nothing is built before :meth:`start` / ``__enter__``."""
        if not 1 <= nodes <= 200:
            raise NetnsError(f"--nodes must be between 1 and 200, not {nodes}")
        self.prefix = f"{PREFIX}{os.getpid()}-{tag + '-' if tag else ''}"
        self.switch = self.prefix + "switch"
        self.nodes = [Node(k, f"{self.prefix}node{k}", f"mlsh{k}", f"{SUBNET}.{k + 1}", f"port{k}")
                      for k in range(nodes)]
        self.bandwidth_mbit = bandwidth_mbit
        self.latency_ms = latency_ms
        self.burst_kb = burst_kb
        self.tcp_slow_start_after_idle = tcp_slow_start_after_idle
        self._created: List[str] = []
        self._procs: List[subprocess.Popen] = []
        self._old_handlers: dict = {}
        self._lock = threading.RLock()
        self._closed = False

    # -- building ---------------------------------------------------------------------------
    def start(self) -> "EmulatedCluster":
        """Check support, remove stale namespaces, build the namespaces, bridge, veths, qdiscs."""
        check_supported()
        remove_stale()
        atexit.register(self.close)
        try:
            self._add_ns(self.switch)
            self._ns(self.switch, "link", "add", "br0", "type", "bridge")
            self._ns(self.switch, "link", "set", "br0", "up")
            for node in self.nodes:
                self._add_ns(node.namespace)
                self._ns(self.switch, "link", "add", node.port, "type", "veth", "peer", "name",
                         node.ifname, "netns", node.namespace)
                self._ns(self.switch, "link", "set", node.port, "master", "br0")
                self._ns(self.switch, "link", "set", node.port, "up")
                self._ns(node.namespace, "addr", "add", f"{node.address}/24", "dev", node.ifname)
                self._ns(node.namespace, "link", "set", node.ifname, "up")
                if self.tcp_slow_start_after_idle is not None:
                    _run(self.exec_prefix(node.index) + [
                        "sysctl", "-qw", f"net.ipv4.tcp_slow_start_after_idle={int(self.tcp_slow_start_after_idle)}"])
            self.set_bandwidth(self.bandwidth_mbit)
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        self._ns(name, "link", "set", "lo", "up")

    @staticmethod
    def _ns(namespace: str, *args: str) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", namespace, *args])

    def _qdisc(self, namespace: str, dev: str, mbit: Optional[float]) -> None:
        if not mbit:
            _run(["tc", "-n", namespace, "qdisc", "del", "dev", dev, "root"], check=False)
            return
        # The bucket must hold at least one GSO super-packet (64 KiB) or tbf drops it, and
        # about 4 ms of traffic so the kernel timer granularity does not cap the rate.
        burst = int(self.burst_kb * 1024) if self.burst_kb else max(65536 + 4096, int(mbit * 1e6 / 8 * 0.004))
        _run(["tc", "-n", namespace, "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", f"{mbit}mbit", "burst", str(burst), "latency", f"{self.latency_ms}ms"])

    def set_bandwidth(self, mbit: Optional[float]) -> None:
        """Limit every node's NIC to ``mbit`` Mbit/s in each direction (None/0: unlimited)."""
        for node in self.nodes:
            self._qdisc(node.namespace, node.ifname, mbit)   # node egress: upload
            self._qdisc(self.switch, node.port, mbit)        # bridge-port egress: download
        self.bandwidth_mbit = mbit

    # -- using ------------------------------------------------------------------------------
    def exec_prefix(self, k: int) -> List[str]:
        """The argv prefix that runs a command inside node ``k``'s namespace."""
        return ["ip", "netns", "exec", self.nodes[k].namespace]

    def popen(self, k: int, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` inside node ``k`` in its own process group; :meth:`close` kills it."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_prefix(k) + list(cmd), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def route(self, k: int, address: str) -> str:
        """``ip route get <address>`` inside node ``k`` (which device the kernel would use)."""
        return self._ns(self.nodes[k].namespace, "route", "get", address).stdout.strip()

    def qdiscs(self) -> dict:
        """``tc qdisc show`` of every veth end, keyed by ``namespace/dev``."""
        out = {}
        for node in self.nodes:
            for ns, dev in ((node.namespace, node.ifname), (self.switch, node.port)):
                out[f"{ns}/{dev}"] = _run(["tc", "-n", ns, "qdisc", "show", "dev", dev]).stdout.strip()
        return out

    def link_stats(self) -> dict:
        """Bytes sent, packets dropped and overlimits summed over all limited veth ends."""
        total = {"bytes": 0, "dropped": 0, "overlimits": 0}
        for node in self.nodes:
            for ns, dev in ((node.namespace, node.ifname), (self.switch, node.port)):
                out = _run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev]).stdout
                m = re.search(r"Sent (\d+) bytes \d+ pkt \(dropped (\d+), overlimits (\d+)", out)
                if m:
                    for key, value in zip(total, m.groups()):
                        total[key] += int(value)
        return total

    # -- tearing down -----------------------------------------------------------------------
    def kill_processes(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process groups started with :meth:`popen`, SIGKILL them after ``grace_s``."""
        with self._lock:
            procs, self._procs = self._procs, []
        live = [p for p in procs if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace_s
            for p in live:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            live = [p for p in live if p.poll() is None]
            if not live:
                break

    def close(self) -> None:
        """Kill our processes and delete every namespace we created; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.kill_processes()
        for name in reversed(self._created):
            delete_namespace(name)
        self._created = []
        atexit.unregister(self.close)

    def _on_signal(self, signum, frame) -> None:
        self.close()
        self._restore_handlers()
        previous = self._old_handlers.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        # The cluster is gone, so even a signal that used to be ignored ends the program.
        raise SystemExit(128 + signum)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        for sig, handler in list(self._old_handlers.items()):
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler)

    def __enter__(self) -> "EmulatedCluster":
        """Build the cluster and install the SIGINT / SIGTERM cleanup handlers."""
        self._install_handlers()
        try:
            return self.start()
        except BaseException:
            self._restore_handlers()
            raise

    def __exit__(self, *exc) -> None:
        """Tear the cluster down whatever happened inside the block."""
        try:
            self.close()
        finally:
            self._restore_handlers()


# -- measuring ------------------------------------------------------------------------------
_RECEIVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - (t0 or time.perf_counter()), flush=True)
"""
_SENDER = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = b"x" * (1 << 16); end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end: c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def measure_tcp_mbit(cluster: EmulatedCluster, src: int, dst: int, seconds: float = 1.5,
                     port: int = 47011) -> float:
    """TCP goodput in Mbit/s from node ``src`` to node ``dst``'s address (``src == dst``: lo)."""
    recv = cluster.popen(dst, [sys.executable, "-c", _RECEIVER, cluster.nodes[dst].address, str(port)],
                         stdout=subprocess.PIPE, text=True)
    try:
        if recv.stdout.readline().strip() != "ready":
            raise NetnsError("the TCP receiver did not start")
        send = cluster.popen(src, [sys.executable, "-c", _SENDER, cluster.nodes[dst].address,
                                   str(port), str(seconds)])
        send.wait(timeout=seconds + 30)
        out, _ = recv.communicate(timeout=30)
        nbytes, elapsed = out.split()
        return int(nbytes) * 8 / max(float(elapsed), 1e-9) / 1e6
    finally:
        if recv.poll() is None:
            recv.kill()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: build a cluster, show routes and qdiscs, measure TCP throughput, clean up."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--bandwidth", type=float, default=40.0, help="Mbit/s per NIC and direction (0: unlimited)")
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--check", action="store_true", help="measure node0->node1 and node0->node0 (lo)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        with EmulatedCluster(args.nodes, args.bandwidth) as cluster:
            report = {"namespaces": [n.namespace for n in cluster.nodes] + [cluster.switch],
                      "route_same_node": cluster.route(0, cluster.nodes[0].address),
                      "route_other_node": cluster.route(0, cluster.nodes[-1].address),
                      "qdiscs": cluster.qdiscs()}
            if args.check and args.nodes >= 2:
                report["mbit_node0_to_node1"] = measure_tcp_mbit(cluster, 0, 1, args.seconds)
                report["mbit_node0_to_node0_lo"] = measure_tcp_mbit(cluster, 0, 0, args.seconds)
    except NetnsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
