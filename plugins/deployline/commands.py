"""Run a configured shell command with its output streamed to the task log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)


class CommandFailed(RuntimeError):
    """A command exited non-zero or timed out; the message has the command and its last lines."""

    def __init__(self, command: str, reason: str, tail: list[str]):
        self.command, self.reason, self.tail = command, reason, tail
        shown = "\n".join(tail) if tail else "(no output)"
        super().__init__(f"command {command!r} {reason}; last output:\n{shown}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_command(
    command: str,
    cwd: str | Path,
    timeout: float,
    env: dict[str, str] | None = None,
    logger: logging.Logger | None = None,
    tail_lines: int = 40,
) -> list[str]:
    """Run ``command`` with bash in ``cwd``; every output line goes to ``logger``.

    Returns the last ``tail_lines`` lines.  Raises ``CommandFailed`` on a non-zero
    exit or when ``timeout`` seconds pass (the whole process group is killed then).
    """
    logger = logger or log
    tail: deque[str] = deque(maxlen=tail_lines)
    if not Path(cwd).is_dir():
        raise CommandFailed(command, f"cannot run: working folder {cwd} does not exist", [])
    logger.info("$ %s  (in %s, timeout %ss)", command, cwd, timeout)
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=os.environ | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        # Own process group, so a timeout stops the command's children too.
        start_new_session=True,
    )
    timed_out = threading.Event()

    def on_timeout():
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info("%s", line)
        code = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    if timed_out.is_set():
        raise CommandFailed(command, f"timed out after {timeout}s", list(tail))
    if code != 0:
        hint = " (command not found: is the tool installed?)" if code == 127 else ""
        raise CommandFailed(command, f"exited with code {code}{hint}", list(tail))
    logger.info("command finished in %.1fs", elapsed)
    return list(tail)
