"""`make fleet`: `scripts/fleet.sh` (what it runs after building) is started as a user would, on
free ports, and the curl commands and the revoke command it prints are executed exactly as
printed: both Envoys serve the demo token, one revocation in etcd reaches both, and a Ctrl-C (a
SIGINT to the whole process group, as a terminal sends it) stops 3 etcd members, 2 Envoys and the
mock, and frees every port."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

import harness
from printed_script import PrintedScript

PROJECT = harness.PROJECT


def etcd_port_base() -> int:
    """A base whose etcd ports (clients base+1..3, peers base+11..13) are all free."""
    for _ in range(100):
        base = harness.free_port()
        ports = [base + d for d in (1, 2, 3, 11, 12, 13)]
        if max(ports) < 65536 and all(_bindable(p) for p in ports):
            return base
    raise RuntimeError("no free etcd port range")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class FleetCommand(PrintedScript):
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        base = etcd_port_base()
        self.etcd_ports = [base + d for d in (1, 2, 3, 11, 12, 13)]
        self.ports = {"listen1": harness.free_port(), "listen2": harness.free_port(),
                      "admin1": harness.free_port(), "admin2": harness.free_port(),
                      "mock": harness.free_port()}
        env = {k: v for k, v in os.environ.items()
               if k != "MISTRAL_API_KEY" and not k.startswith("SHIELDKEY_")}
        env.update(SHIELDKEY_FLEET_DIR=str(state_dir), SHIELDKEY_ETCD_PORT_BASE=str(base),
                   SHIELDKEY_FLEET_PORT_1=str(self.ports["listen1"]),
                   SHIELDKEY_FLEET_PORT_2=str(self.ports["listen2"]),
                   SHIELDKEY_FLEET_ADMIN_PORT_1=str(self.ports["admin1"]),
                   SHIELDKEY_FLEET_ADMIN_PORT_2=str(self.ports["admin2"]),
                   SHIELDKEY_FLEET_MOCK_PORT=str(self.ports["mock"]))
        super().__init__("scripts/fleet.sh", env)

    @property
    def all_ports(self) -> list[int]:
        return [*self.etcd_ports, *self.ports.values()]

    def processes(self) -> dict[int, str]:
        """Processes of this fleet (etcd, Envoy, mock): those whose command line names the state
        directory or that run in it."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.proc.pid:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if str(self.state_dir) in cmdline or cwd == str(self.state_dir):
                found[int(entry.name)] = cmdline.strip()
        return found



@pytest.fixture
def fleet_command(tmp_path):
    run = FleetCommand(tmp_path / "fleet")
    try:
        assert run.ready.wait(90), run.output
        assert run.proc.poll() is None, f"fleet.sh exited early:\n{run.output}"
        yield run
    finally:
        run.stop()
        print(run.output)


def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=PROJECT, capture_output=True, text=True, timeout=30)


def status_and_reply(curl: str) -> tuple[int, dict]:
    """The printed curl with `-w` added to learn the status too."""
    result = sh(curl.replace("curl -s ", "curl -s -w '\\n%{http_code}' ", 1))
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body)


def test_the_fleet_command_runs_a_fleet_and_its_printed_commands_work(fleet_command):
    run = fleet_command
    token = re.search(r"Your demo token \(shown once\): (sk_shield_t_demo_\S+)", run.output).group(1)
    started = run.processes()
    assert sum("/etcd " in c or c.startswith("etcd ") for c in started.values()) == 3, started
    assert sum("envoy" in c.split(" ")[0] for c in started.values()) == 2, started

    curls = [run.block_after(f"curl through envoy-{n}:") for n in (1, 2)]
    for curl, port in zip(curls, (run.ports["listen1"], run.ports["listen2"])):
        assert token in curl and f"127.0.0.1:{port}/" in curl, curl
        reply = json.loads(sh(curl).stdout)
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"], reply
        assert status_and_reply(curl)[0] == 200

    # The mock saw the sealed upstream key (from etcd), never the token.
    seen = json.loads(harness_get(f"http://127.0.0.1:{run.ports['mock']}/__mock/requests"))
    assert len(seen) >= 4 and all(token not in json.dumps(r) for r in seen)

    revoke = run.block_after("Revoke it")
    assert revoke.startswith("SHIELDKEY_ETCD=http://127.0.0.1:") and revoke.endswith(
        "target/release/shieldkey revoke demo"), revoke
    revoked_at = time.monotonic()
    result = sh(revoke)
    assert result.returncode == 0, result.stderr
    for curl in curls:
        while True:
            status, reply = status_and_reply(curl)
            if status == 401 and reply.get("code") == "shield_token_revoked":
                break
            assert time.monotonic() - revoked_at < 2, (status, reply)
            time.sleep(0.02)

    # Printed once as such and once in each curl; nowhere else.
    assert run.output.count(token) == 3, run.output

    stop_started = time.monotonic()
    try:
        assert run.interrupt() != 0
    except subprocess.TimeoutExpired:
        # Say what was left (seen when the test run had SIGINT ignored: `PrintedScript`).
        raise AssertionError(f"Ctrl-C did not stop the fleet within 30 s:\n{_stop_report(run)}")
    stop_s = time.monotonic() - stop_started
    for port in run.all_ports:
        assert harness.port_is_free(port), f"port {port} still in use after Ctrl-C"
    left = {pid: cmd for pid, cmd in started.items() if Path(f"/proc/{pid}").exists()
            and not _zombie(pid)}
    assert not left, f"still running after Ctrl-C: {left}"
    assert not run.processes(), run.processes()
    # The leader is stopped after its followers, so it does not wait to hand over leadership.
    assert stop_s < 6, stop_s


def _stop_report(run) -> str:
    """The processes of the script's group and of the fleet still there (state, what the kernel
    has them waiting on), and the end of each log of the fleet's state directory."""
    lines = []
    group = os.getpgid(run.proc.pid) if run.proc.poll() is None else run.proc.pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pgid = os.getpgid(int(entry.name))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(") ", 1)[1].split(" ", 1)[0]
            wchan = (entry / "wchan").read_text()
        except (OSError, IndexError):
            continue
        if pgid == group or str(run.state_dir) in cmdline:
            lines.append(f"  pid {entry.name} state {state} wchan {wchan}: {cmdline.strip()[:200]}")
    for log in sorted(run.state_dir.rglob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-8:]
        lines.append(f"--- {log.relative_to(run.state_dir)}:")
        lines.extend(f"  {line[:300]}" for line in tail)
    return "\n".join(lines)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def harness_get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()
