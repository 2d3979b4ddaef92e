"""Run a configured shell command with its output streamed to the task log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from hashlib import sha1
from pathlib import Path

import psutil
from airflow.sdk.exceptions import AirflowFailException

from deployline.workdirs import work_dir

log = logging.getLogger(__name__)

# What a commit's command (build, tests, load tests) sees of the worker's environment: what a shell
# and the tools on PATH need, never the worker's secrets (Airflow's database and connections, AWS
# keys). The caller adds what the stage documents and the config's ``env``.
INHERITED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


# What a trusted tool (git, moto) started by Deployline itself sees: the above plus what reaching
# a server needs (home and its config, proxies, CA bundles, the SSH agent); never the worker's
# whole environment, which holds Airflow's and AWS's secrets.
TOOL_INHERITED = INHERITED + (
    "HOME", "TMPDIR", "USER", "LOGNAME", "XDG_CONFIG_HOME",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "GIT_SSL_CAINFO",
    "SSH_AUTH_SOCK", "GIT_SSH_COMMAND", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM", "GIT_CONFIG_NOSYSTEM",
)


def tool_environment(env: dict[str, str] | None = None, prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The allow-listed environment of a trusted tool: TOOL_INHERITED, variables starting with one
    of ``prefixes`` (a tool's own settings, e.g. ``MOTO_``), then ``env``."""
    base = {key: value for key, value in os.environ.items()
            if key in TOOL_INHERITED or (prefixes and key.startswith(prefixes))}
    base.setdefault("PATH", DEFAULT_PATH)
    return base | (env or {})


def command_environment(home: str | Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The allow-listed environment of a command: INHERITED, HOME and TMPDIR in ``home``, then ``env``."""
    base = {key: os.environ[key] for key in INHERITED if key in os.environ}
    base.setdefault("PATH", DEFAULT_PATH)
    return base | {"HOME": str(home), "TMPDIR": str(home)} | (env or {})


class CommandFailed(AirflowFailException):
    """A command exited non-zero or timed out; the message has the command and its last lines.

    Final: a failing build or test fails again when retried, so Airflow does not retry it.  A
    task's retries are for what is not the command's fault (a killed worker, say).
    """

    def __init__(self, command: str, reason: str, tail: list[str]):
        self.command, self.reason, self.tail = command, reason, tail
        shown = "\n".join(tail) if tail else "(no output)"
        super().__init__(f"command {command!r} {reason}; last output:\n{shown}")


class CommandStopped(CommandFailed):
    """``stop_when`` gave a reason to stop the command (its process group was stopped)."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _group_file(command: str, cwd: str | Path) -> Path:
    """Where the process group of ``command`` running in ``cwd`` is noted while it runs."""
    key = sha1(f"{Path(cwd).resolve()}\0{command}".encode()).hexdigest()[:16]
    return work_dir() / "commands" / f"{key}.pgid"


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux: /proc/<pid>/stat, field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after its end.
    fields = stat[stat.rindex(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _stop_leftover(marker: Path, logger: logging.Logger) -> None:
    """Stop the group an earlier try left running: its task was killed before it could."""
    try:
        pgid, started = marker.read_text().split()
        pgid = int(pgid)
        # The same process still (ids are reused): its start time in ticks is the one noted (the
        # wall-clock create_time moves when the clock is stepped).
        alive = process_start_ticks(pgid) == int(started)
    except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
        alive = False
    if alive:
        try:
            os.killpg(pgid, signal.SIGKILL)
            logger.warning("stopped process group %d, left running by an earlier try of this command", pgid)
        except ProcessLookupError:
            pass
    marker.unlink(missing_ok=True)


def run_command(
    command: str,
    cwd: str | Path,
    timeout: float,
    env: dict[str, str] | None = None,
    logger: logging.Logger | None = None,
    tail_lines: int = 40,
    stop_when: Callable[[], str | None] | None = None,
    stop_check_seconds: float = 5.0,
) -> list[str]:
    """Run ``command`` with bash in ``cwd``; every output line goes to ``logger``.

    Returns the last ``tail_lines`` lines.  Raises ``CommandFailed`` on a non-zero
    exit or when ``timeout`` seconds pass (the whole process group is killed then), and
    ``CommandStopped`` when ``stop_when()``, asked every ``stop_check_seconds``, returns a reason.
    """
    logger = logger or log
    tail: deque[str] = deque(maxlen=tail_lines)
    if not Path(cwd).is_dir():
        raise CommandFailed(command, f"cannot run: working folder {cwd} does not exist", [])
    logger.info("$ %s  (in %s, timeout %ss)", command, cwd, timeout)
    marker = _group_file(command, cwd)
    _stop_leftover(marker, logger)
    import tempfile

    home = tempfile.TemporaryDirectory(prefix="deployline-command-")  # its HOME and TMPDIR, removed after
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=command_environment(home.name, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        # Own process group, so a timeout stops the command's children too.
        start_new_session=True,
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:  # the group's id and start: a retry after a killed worker stops what is left of it
        marker.write_text(f"{proc.pid} {process_start_ticks(proc.pid)}")
    except psutil.NoSuchProcess:
        pass  # it has finished already
    timed_out = threading.Event()

    def on_timeout():
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    stopped: list[str] = []
    finished = threading.Event()

    def watch():
        while not finished.wait(stop_check_seconds):
            try:
                reason = stop_when()
            except Exception:  # a failed look is no reason to stop the command
                logger.warning("could not tell whether to stop %r", command, exc_info=True)
                continue
            if reason:
                stopped.append(reason)
                _kill_group(proc)
                return

    watcher = threading.Thread(target=watch, daemon=True) if stop_when else None
    if watcher:
        watcher.start()
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
        finished.set()
        if watcher:
            watcher.join(timeout=stop_check_seconds + 30)
        marker.unlink(missing_ok=True)
        home.cleanup()
    elapsed = time.monotonic() - started
    if stopped:
        raise CommandStopped(command, f"was stopped: {stopped[0]}", list(tail))
    if timed_out.is_set():
        raise CommandFailed(command, f"timed out after {timeout}s", list(tail))
    if code != 0:
        hint = " (command not found: is the tool installed?)" if code == 127 else ""
        raise CommandFailed(command, f"exited with code {code}{hint}", list(tail))
    logger.info("command finished in %.1fs", elapsed)
    return list(tail)
