"""A local etcd cluster for the fleet-mode tests: members run as plain processes on free loopback
ports, with data dirs and one log file per member in a work dir, plus small helpers that talk to
etcd's JSON gateway (`POST /v3/kv/...`, HTTP/1.1, base64 keys and values).

Checked against etcd 3.4.23 (Debian `etcd-server`); see /work/shared/reference/etcd-fleet.md.
"""

from __future__ import annotations

import atexit
import base64
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import harness

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def _pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL --` when available: the member then dies with the thread that
    started it, even when pytest itself is SIGKILLed (atexit does not run then). setpriv execs
    etcd, so the pid is etcd's own."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    try:
        out = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"] if "--pdeathsig" in out else []


_PREFIX = _pdeathsig_prefix()

# Every member started by this process (registered at its first start; a restart reuses the
# entry), so that a failing test can print etcd logs and exit can kill what is left.
STARTED_ETCD: list["EtcdMember"] = []


class EtcdError(RuntimeError):
    """A JSON-gateway call that no member answered successfully."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _to_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def prefix_range_end(prefix: bytes) -> bytes:
    """The `range_end` that makes a range cover every key starting with `prefix`: the prefix with
    its last byte incremented (trailing 0xff bytes dropped first); b"\\0" (whole keyspace) for an
    empty or all-0xff prefix."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"
    p[-1] += 1
    return bytes(p)


class EtcdMember:
    """One member process. `proc` is replaced on every restart; the log file is appended to."""

    def __init__(self, cluster: "EtcdCluster", index: int, name: str, client_port: int,
                 peer_port: int, data_dir: Path, log_path: Path):
        self.cluster = cluster
        self.index = index
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        c = self.cluster
        return [
            *_PREFIX, ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", c.initial_cluster, "--initial-cluster-token", c.token,
            "--initial-cluster-state", "new",
            "--logger=zap", "--log-outputs=stderr",
            *c.extra_args,
        ]

    def spawn(self) -> None:
        assert not self.running, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            if log.tell():
                log.write(f"---- restart of {self.name} ----\n".encode())
                log.flush()
            # Own session: a Ctrl-C aimed at pytest must not reach etcd (atexit kills it instead).
            # Start clusters from the main thread: with setpriv, members die with their thread.
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=_etcd_env(),
                                         start_new_session=True)
        if self not in STARTED_ETCD:
            STARTED_ETCD.append(self)

    def wait_peer_serving(self, deadline: float) -> bool:
        """Wait until this member's peer port answers `GET /members` (or it exits, or the
        deadline passes); True when it answered."""
        while time.monotonic() < deadline and self.running:
            try:
                with urllib.request.urlopen(f"{self.peer_url}/members", timeout=0.5) as r:
                    r.read()
                    return True
            except (OSError, ValueError):
                time.sleep(0.01)
        return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _etcd_env() -> dict[str, str]:
    # etcd also reads its flags from ETCD_* variables, and refuses to start when one conflicts
    # with a flag: start members from a clean slate.
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}


class EtcdCluster:
    """`members` etcd processes forming one cluster. Indexes are 0-based.

    Typical use (a fixture): `c = EtcdCluster(tmp_path).start(); yield c; c.stop_all()`.
    """

    _ids = itertools.count()

    def __init__(self, workdir: Path, members: int = 3, *, extra_args: list[str] | None = None):
        if members < 1:
            raise ValueError("members must be >= 1")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n = next(self._ids)
        self.size = members
        self.extra_args = list(extra_args or [])
        self.token = f"shieldkey-{os.getpid()}-{self.n}-{secrets.token_hex(4)}"
        self.members: list[EtcdMember] = []
        self._pick_ports()

    # ---- lifecycle -----------------------------------------------------------------------

    def _pick_ports(self) -> None:
        taken = {p for m in STARTED_ETCD if m.running for p in (m.client_port, m.peer_port)}
        ports: list[int] = []
        while len(ports) < 2 * self.size:
            p = harness.free_port()
            if p not in ports and p not in taken:
                ports.append(p)
        self.members = [
            EtcdMember(self, i, f"m{i}", ports[2 * i], ports[2 * i + 1],
                       self.workdir / f"etcd{self.n}-m{i}.data",
                       self.workdir / f"etcd{self.n}-m{i}.log")
            for i in range(self.size)
        ]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout: float = 20) -> "EtcdCluster":
        """Start every member from empty data dirs and wait until all are healthy.

        Members are started one after the other, each once its peer port serves HTTP: a new
        member first asks every peer whether it is already part of a cluster, and a peer that
        has bound its port but does not serve yet costs it a 1 s timeout (about 2 s for three
        members started at once, against about 0.35 s this way). A member that lost a race for
        its port (another process took it after `free_port`) makes the whole cluster start again
        on new ports, up to 3 times."""
        for attempt in range(3):
            deadline = time.monotonic() + timeout
            for m in self.members:
                m.spawn()
                m.wait_peer_serving(deadline)
            try:
                self.wait_healthy(timeout=max(0.1, deadline - time.monotonic()))
                return self
            except RuntimeError:
                port_race = any(not m.running and "address already in use" in m.log_text()
                                for m in self.members)
                if not port_race or attempt == 2:
                    raise
            # Start over on fresh ports, with fresh data dirs and logs.
            self.stop_all()
            for m in self.members:
                if m in STARTED_ETCD:
                    STARTED_ETCD.remove(m)
                shutil.rmtree(m.data_dir, ignore_errors=True)
                m.log_path.replace(m.log_path.with_suffix(f".log.attempt{attempt}"))
            self.token = f"shieldkey-{os.getpid()}-{self.n}-{secrets.token_hex(4)}"
            self._pick_ports()
        raise AssertionError("unreachable")

    def wait_healthy(self, indexes: list[int] | None = None, timeout: float = 20) -> None:
        """Wait until every member in `indexes` (default: all) answers /health with true.
        Raises RuntimeError with the members' logs on timeout or if one of them exits."""
        indexes = list(range(self.size)) if indexes is None else list(indexes)
        pending = set(indexes)
        deadline = time.monotonic() + timeout
        while pending:
            for i in sorted(pending):
                m = self.members[i]
                if not m.running:
                    raise RuntimeError(f"etcd member {m.name} exited with "
                                       f"{m.proc.returncode if m.proc else None}:\n{self.logs_text()}")
                if self.healthy(i, timeout=min(1.5, max(0.1, deadline - time.monotonic()))):
                    pending.discard(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd members {sorted(pending)} not healthy after {timeout} s:\n"
                                   f"{self.logs_text()}")
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL member i and reap it."""
        self.members[i].kill()

    def stop(self, i: int, timeout: float = 15) -> None:
        """SIGTERM member i and wait for it to exit (SIGKILL after `timeout`). A leader first
        tries to hand over leadership, which can take several seconds."""
        m = self.members[i]
        if m.running:
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                m.kill()

    def restart(self, i: int, *, wait: bool = True, timeout: float = 20) -> None:
        """Start member i again with the same command and data dir (stopping it first if it
        still runs); wait until it is healthy unless `wait` is False (needed when it cannot
        reach quorum on its own, e.g. when restarting several members of a dead cluster)."""
        m = self.members[i]
        if m.running:
            self.stop(i)
        m.spawn()
        if wait:
            self.wait_healthy([i], timeout=timeout)

    def stop_all(self) -> None:
        """SIGKILL every member and reap them (fast: no leadership transfer)."""
        for m in self.members:
            if m.running:
                m.proc.kill()
        for m in self.members:
            if m.proc is not None:
                m.proc.wait()

    # ---- inspection ----------------------------------------------------------------------

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of every member's client port, for Envoy cluster definitions."""
        return [("127.0.0.1", m.client_port) for m in self.members]

    def healthy(self, i: int, timeout: float = 2) -> bool:
        """True when member i answers `GET /health` with {"health":"true"}. Without quorum etcd
        answers 503 {"health":"false"}, after up to 1 s of its own."""
        try:
            with urllib.request.urlopen(f"{self.members[i].client_url}/health", timeout=timeout) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):  # refused, timeout, HTTPError (503), bad JSON
            return False

    def leader(self, timeout: float = 1) -> int | None:
        """Index of the current leader as seen by the first running member that answers
        (`maintenance/status` and `cluster/member/list`), or None (no quorum, or none answers)."""
        names = {m.name: m.index for m in self.members}
        for m in self.members:
            if not m.running:
                continue
            try:
                leader_id = self._call_one(m, "maintenance/status", {}, timeout).get("leader")
                listed = self._call_one(m, "cluster/member/list", {}, timeout).get("members", [])
            except (OSError, ValueError):
                continue
            for member in listed:
                if leader_id and member.get("ID") == leader_id:
                    return names.get(member.get("name"))
            return None
        return None

    def log_text(self, i: int) -> str:
        return self.members[i].log_text()

    def logs_text(self, lines: int = 30) -> str:
        out = []
        for m in self.members:
            tail = "\n".join(m.log_text().splitlines()[-lines:])
            out.append(f"---- etcd {m.name} ({m.log_path.name}, last {lines} lines) ----\n{tail}")
        return "\n".join(out)

    # ---- JSON gateway ----------------------------------------------------------------------

    def _call_one(self, m: EtcdMember, method: str, body: dict, timeout: float) -> dict:
        req = urllib.request.Request(f"{m.client_url}/v3/{method}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def call(self, method: str, body: dict, timeout: float = 2) -> dict:
        """POST /v3/<method> (e.g. "kv/put") to the members in order until one answers 200.
        A 4xx answer (the request itself is wrong) is raised at once; refused connections,
        timeouts and 5xx move on to the next member. Raises EtcdError when none succeeded."""
        errors = []
        for m in self.members:
            try:
                return self._call_one(m, method, body, timeout)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")
                if 400 <= e.code < 500 and e.code != 408:
                    raise EtcdError(f"{method} on {m.name}: HTTP {e.code} {detail}") from e
                errors.append(f"{m.name}: HTTP {e.code} {detail}")
            except (OSError, ValueError) as e:
                errors.append(f"{m.name}: {e!r}")
        raise EtcdError(f"{method}: no member answered: " + "; ".join(errors))

    def put(self, key: str, value: bytes | str, timeout: float = 2) -> dict:
        return self.call("kv/put", {"key": _b64(key.encode()), "value": _b64(_to_bytes(value))},
                         timeout)

    def get(self, key: str, timeout: float = 2) -> bytes | None:
        res = self.call("kv/range", {"key": _b64(key.encode())}, timeout)
        kvs = res.get("kvs") or []
        return _unb64(kvs[0].get("value", "")) if kvs else None

    def range_prefix(self, prefix: str, timeout: float = 2) -> dict[str, bytes]:
        p = prefix.encode()
        res = self.call("kv/range", {"key": _b64(p or b"\0"), "range_end": _b64(prefix_range_end(p))},
                        timeout)
        return {_unb64(kv["key"]).decode(errors="surrogateescape"): _unb64(kv.get("value", ""))
                for kv in res.get("kvs") or []}

    def delete(self, key: str, timeout: float = 2) -> int:
        """Delete one key; returns how many keys were deleted (0 or 1)."""
        res = self.call("kv/deleterange", {"key": _b64(key.encode())}, timeout)
        return int(res.get("deleted", 0))


@atexit.register
def _kill_all_members() -> None:
    for m in STARTED_ETCD:
        try:
            m.kill()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
