"""The etcd side of fleet mode, without Envoy: a local 3-member cluster (etcd_cluster.py) starts,
serves the JSON gateway, survives one member down, loses quorum with two down, recovers on
restart with its data, and is gone without a trace after stop_all."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import harness
from etcd_cluster import STARTED_ETCD, EtcdCluster, EtcdError, prefix_range_end

ARBITRARY = bytes(range(256)) + b"\x00\xff\n\r\"\\{}"


@pytest.fixture
def cluster(tmp_path):
    c = EtcdCluster(tmp_path / "etcd").start()
    yield c
    c.stop_all()


def _put_eventually(c: EtcdCluster, key: str, value: str, within: float) -> float:
    """Retry a put (1 s per member) until it succeeds; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            c.put(key, value, timeout=1)
            return time.monotonic() - t0
        except EtcdError:
            if time.monotonic() - t0 > within:
                raise
            time.sleep(0.05)


def test_prefix_range_end():
    assert prefix_range_end(b"sk/spend/") == b"sk/spend0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"") == b"\0"
    assert prefix_range_end(b"\xff\xff") == b"\0"


def test_three_members_become_healthy(cluster):
    assert [cluster.healthy(i) for i in range(3)] == [True, True, True]
    assert len(cluster.client_urls) == 3 and len(set(cluster.client_urls)) == 3
    assert all(u.startswith("http://127.0.0.1:") for u in cluster.client_urls)
    assert cluster.endpoints == [("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in cluster.client_urls]
    assert cluster.leader() in (0, 1, 2)
    for i, m in enumerate(cluster.members):
        assert m in STARTED_ETCD
        assert m.log_path.parent == m.data_dir.parent == cluster.workdir
        log = cluster.log_text(i)
        # zap writes JSON lines; the default logger would print a capnslog deprecation warning.
        assert log.startswith("{") and "capnslog" not in log


def test_kv_round_trip_through_json_gateway(cluster):
    cluster.put("sk/spend/alice", "100")
    cluster.put("sk/spend/bob", ARBITRARY)
    cluster.put("sk/spend/ünï", b"")
    cluster.put("sk/spend0", "just past the prefix")
    cluster.put("sk/spend", "the prefix without its slash")
    assert cluster.get("sk/spend/alice") == b"100"
    assert cluster.get("sk/spend/bob") == ARBITRARY
    assert cluster.get("sk/spend/ünï") == b""  # etcd leaves the empty value out of the JSON
    assert cluster.get("sk/spend/nobody") is None

    assert cluster.range_prefix("sk/spend/") == {
        "sk/spend/alice": b"100", "sk/spend/bob": ARBITRARY, "sk/spend/ünï": b""}
    assert cluster.range_prefix("nothing/") == {}
    assert len(cluster.range_prefix("")) == 5

    cluster.put("sk/spend/alice", "150")
    assert cluster.get("sk/spend/alice") == b"150"
    assert cluster.delete("sk/spend/alice") == 1
    assert cluster.delete("sk/spend/alice") == 0
    assert cluster.get("sk/spend/alice") is None
    assert set(cluster.range_prefix("sk/spend/")) == {"sk/spend/bob", "sk/spend/ünï"}

    # Every member serves the same data (the helpers use the first one that answers).
    cluster.kill(0)
    cluster.kill(1)  # no quorum now, but a serializable read is answered locally
    res = cluster.call("kv/range", {"key": "c2svc3BlbmQvYm9i", "serializable": True}, timeout=1)
    assert res["kvs"][0]["key"] == "c2svc3BlbmQvYm9i"  # base64("sk/spend/bob")


def test_one_member_down_keeps_writes_working(cluster):
    cluster.put("before", "1")
    leader = cluster.leader()
    follower = next(i for i in range(3) if i != leader)

    # A follower down: writes go on at once (refused connections are skipped in < 1 ms).
    cluster.kill(follower)
    assert not cluster.members[follower].running
    t0 = time.monotonic()
    cluster.put("one-down", "2", timeout=2)
    assert time.monotonic() - t0 < 1
    assert cluster.get("before") == b"1"
    cluster.restart(follower)
    assert cluster.healthy(follower)

    # The leader down: writes to the followers hang until a new leader is elected (~1-2 s).
    leader = cluster.leader()
    cluster.kill(leader)
    took = _put_eventually(cluster, "leader-down", "3", within=6)
    assert took < 6
    assert cluster.leader() not in (None, leader)
    assert cluster.get("one-down") == b"2" and cluster.get("leader-down") == b"3"

    cluster.restart(leader)  # rejoins as a follower

    # A graceful stop (SIGTERM) of a follower also leaves the cluster writable.
    follower = next(i for i in range(3) if i != cluster.leader())
    t0 = time.monotonic()
    cluster.stop(follower)
    assert time.monotonic() - t0 < 5
    cluster.put("stopped", "4", timeout=1)
    cluster.restart(follower)
    cluster.wait_healthy(timeout=5)
    assert cluster.range_prefix("") == {
        "before": b"1", "one-down": b"2", "leader-down": b"3", "stopped": b"4"}


def test_two_members_down_lose_quorum_then_recover(cluster):
    cluster.put("fleet/a", ARBITRARY)
    cluster.put("fleet/b", "kept")
    leader = cluster.leader()
    dead = [leader, next(i for i in range(3) if i != leader)]
    survivor = next(i for i in range(3) if i not in dead)
    for i in dead:
        cluster.kill(i)

    # etcd's own /health check waits up to 1 s for a quorum read, then says false (503).
    deadline = time.monotonic() + 5
    while cluster.healthy(survivor, timeout=2):
        assert time.monotonic() < deadline, "survivor still healthy without quorum"
        time.sleep(0.1)

    # A put fails (etcd itself would hang 7 s): refused by the dead, timed out by the survivor.
    t0 = time.monotonic()
    with pytest.raises(EtcdError, match="no member answered"):
        cluster.put("fleet/c", "lost", timeout=0.5)
    assert time.monotonic() - t0 < 2

    # Restarting the dead members (same command, same data dirs) restores quorum and data.
    cluster.restart(dead[0])  # two of three: healthy again
    cluster.restart(dead[1])
    assert [cluster.healthy(i) for i in range(3)] == [True, True, True]
    assert cluster.get("fleet/a") == ARBITRARY
    assert cluster.get("fleet/b") == b"kept"
    cluster.put("fleet/c", "after")
    assert set(cluster.range_prefix("fleet/")) == {"fleet/a", "fleet/b", "fleet/c"}
    assert "restart of" in cluster.log_text(dead[0])  # the log file is appended to


def test_stop_all_is_fast_and_leaves_nothing(tmp_path):
    c = EtcdCluster(tmp_path / "etcd").start()
    pids = [m.proc.pid for m in c.members]
    ports = [p for m in c.members for p in (m.client_port, m.peer_port)]
    t0 = time.monotonic()
    c.stop_all()
    assert time.monotonic() - t0 < 2  # SIGKILL: no 7 s leadership transfer
    assert all(not m.running for m in c.members)
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # exited and reaped
            os.kill(pid, 0)
    assert all(harness.port_is_free(p) for p in ports)
    assert not _etcd_processes_using(tmp_path)
    assert [c.healthy(i, timeout=0.5) for i in range(3)] == [False, False, False]
    c.stop_all()  # idempotent


def _etcd_processes_using(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"etcd" in cmdline and str(path).encode() in cmdline:
            found.append(int(entry.name))
    return found
