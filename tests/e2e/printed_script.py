"""A script a user runs in a terminal (`make run`, `make fleet`): started in its own session, its
output collected, the commands it prints under a heading extracted to be run exactly as printed."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import harness


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PrintedScript:
    def __init__(self, script: str, env: dict[str, str], ready_line: str = "Ctrl-C stops"):
        # As from a terminal: SIGINT handled by default. A test run started in the background of
        # a shell without job control inherits SIGINT ignored, and a shell started so cannot trap
        # it (the scripts' Ctrl-C handling would then never run).
        self.proc = subprocess.Popen([script], cwd=harness.PROJECT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_default_sigint)
        self.ready_line = ready_line
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(self.ready_line):
                self.ready.set()
        self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def block_after(self, heading: str) -> str:
        """The indented lines printed under a heading such as `curl:`."""
        lines = self.output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 1
        block = []
        for line in lines[start:]:
            if not line.startswith("  "):
                break
            block.append(line[2:])
        return "\n".join(block)

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C: SIGINT to the script's whole process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=30)
