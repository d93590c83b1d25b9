"""bench/netns.py: tbf-limited links between network namespaces, and cleanup on every exit path.

Needs root and a working ``ip netns``; skipped (with the reason) otherwise. About 10 s.
"""
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("bench_netns", os.path.join(ROOT, "bench", "netns.py"))
netns = importlib.util.module_from_spec(_spec)
sys.modules["bench_netns"] = netns  # dataclasses look their module up
_spec.loader.exec_module(netns)


def _skip_reason():
    try:
        netns.check_supported()
    except netns.NetnsError as exc:
        return str(exc)
    return None


_REASON = _skip_reason()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"emulated cluster unavailable: {_REASON}")


def _ours(pid=None):
    return [n for n in netns.list_namespaces() if n.startswith(f"mlsh-{pid or os.getpid()}-")]


@needs_netns
def test_rate_limit_holds_and_unlimited_is_much_faster_and_nothing_is_left():
    with netns.EmulatedCluster(2, 40.0, tag="t") as cluster:
        assert len(_ours()) == 3
        limited = netns.measure_tcp_mbit(cluster, 0, 1, seconds=1.5, port=47021)
        download = netns.measure_tcp_mbit(cluster, 1, 0, seconds=1.0, port=47022)
        same_node = netns.measure_tcp_mbit(cluster, 0, 0, seconds=0.5, port=47023)
        assert "dev lo" in cluster.route(0, cluster.nodes[0].address)
        cluster.set_bandwidth(None)
        unlimited = netns.measure_tcp_mbit(cluster, 0, 1, seconds=0.5, port=47024)
    assert 0.5 * 40 <= limited <= 1.1 * 40, limited
    assert 0.5 * 40 <= download <= 1.1 * 40, download
    assert same_node > 10 * 40, same_node          # traffic within a node goes over lo
    assert unlimited > 10 * 40, unlimited
    assert _ours() == []


@needs_netns
def test_exception_inside_the_block_cleans_up():
    with pytest.raises(ZeroDivisionError):
        with netns.EmulatedCluster(2, 100.0, tag="e"):
            assert len(_ours()) == 3
            1 / 0
    assert _ours() == []


@needs_netns
def test_sigterm_cleans_up_and_exits():
    script = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("n", {os.path.join(ROOT, 'bench', 'netns.py')!r})
        n = importlib.util.module_from_spec(spec); sys.modules["n"] = n; spec.loader.exec_module(n)
        with n.EmulatedCluster(2, 10.0):
            print("up", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert len(_ours(proc.pid)) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _ours(proc.pid) == []


@needs_netns
def test_stale_namespace_of_a_dead_pid_is_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    for _ in range(50):  # a pid that exists is not stale; find one that does not
        if not netns.pid_alive(dead.pid):
            break
        time.sleep(0.01)
    stale = f"mlsh-{dead.pid}-node0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        alive = f"mlsh-{os.getpid()}-keep"
        subprocess.run(["ip", "netns", "add", alive], check=True)
        try:
            removed = netns.remove_stale()
            assert stale in removed and alive not in removed
            names = netns.list_namespaces()
            assert stale not in names and alive in names
        finally:
            netns.delete_namespace(alive)
    finally:
        netns.delete_namespace(stale)


def test_not_root_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsError, match="needs root"):
        netns.check_supported()
    assert netns.main(["--nodes", "2"]) == 2
