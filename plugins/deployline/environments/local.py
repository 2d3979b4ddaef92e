"""The ``local`` driver: an environment is real processes on 127.0.0.1, N workers behind one proxy.

Processes run in their own session, so they outlive the Airflow task that started them; they are
recorded in ``<root>/<name>/state.json`` with their pid and create time, so that teardown and list
work from any later process and a recycled pid is never signalled.  Everything that changes an
environment holds its fcntl lock; port allocation holds one lock for the whole root, so environments
provisioned at the same time by different processes never get the same port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

import deployline
from deployline import artifacts
from deployline.commands import command_environment, process_start_ticks
from deployline.config import LocalDriverSettings
from deployline.environments.base import (
    EnvironmentDriver,
    EnvironmentFailed,
    EnvironmentInfo,
    EnvironmentSpec,
    RouterInfo,
)
from deployline.local_proxy import RELOAD_INTERVAL
from deployline.workdirs import work_dir

PORT_RANGE = (20000, 32000)  # below Linux's ephemeral ports, so outgoing connections do not take them
# After this, the proxy routes every new request by a rewritten backends.json (it looks every RELOAD_INTERVAL).
SWITCH_GRACE = 3 * RELOAD_INTERVAL
STOP_TIMEOUT = 5.0
START_TIMEOUT = 30.0  # for workers added by resize to listen
LOG_TAIL = 20
ROUTER_STAGE = "router"  # the state of a production address; not an environment
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_PLUGINS_DIR = Path(deployline.__file__).resolve().parents[1]
_children: dict[int, subprocess.Popen] = {}  # started by this Python: to reap them and read exit codes


class LocalDriver(EnvironmentDriver):
    name = "local"

    def __init__(self, s3_client, settings: LocalDriverSettings | None = None, root: Path | None = None):
        self.s3 = s3_client
        self.settings = settings or LocalDriverSettings()
        self.root = Path(root) if root is not None else work_dir() / "environments"

    # ------------------------------------------------------------------ the interface

    def provision(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        with self._lock(spec.name):
            state = self._read_state(spec.name)
            if state is not None and state.get("status") == "ready":
                if state["version"] != spec.version:
                    raise EnvironmentFailed(
                        f"environment {spec.name} exists with version {state['version']}, not {spec.version}"
                    )
                try:
                    self._restart_dead(state)
                except OSError as exc:
                    raise EnvironmentFailed(f"environment {spec.name}: cannot restart a process: {exc}") from exc
                return self._info(self._resize(state, spec.size))
            self._remove(spec.name)  # the leftover of an interrupted provision, if any
            return self._create_or_clean_up(spec)

    def wait_until_healthy(self, name: str, health_path: str, timeout: float) -> EnvironmentInfo:
        deadline = time.monotonic() + timeout
        while True:
            state = self._require(name)
            failing = self._failing(state, health_path)
            if not failing:
                return self._info(state)
            if time.monotonic() >= deadline:
                entry, answer = failing[0]
                problems = "; ".join(f"{_label(e)}: GET {health_path} -> {a}" for e, a in failing)
                raise EnvironmentFailed(
                    f"environment {name} not healthy after {timeout:g}s: {problems}\n"
                    f"last lines of {entry['log']}:\n{_tail(entry['log'])}"
                )
            time.sleep(0.1)

    def health_problem(self, name: str, health_path: str) -> str | None:
        state = self._read_state(name)
        if state is None:
            return f"environment {name} does not exist"
        try:
            failing = self._failing(state, health_path)
        except EnvironmentFailed as exc:
            return str(exc)
        return "; ".join(f"{_label(e)}: GET {health_path} -> {a}" for e, a in failing) or None

    def _failing(self, state: dict, health_path: str) -> list[tuple[dict, str]]:
        """Processes that do not answer ``health_path`` with 2xx; raises when one has died."""
        failing = []
        for entry in state["processes"]:  # workers first, then the proxy
            if entry.get("pid") is None:  # being started by a resize
                failing.append((entry, "starting"))
                continue
            if not _alive(entry):
                raise EnvironmentFailed(self._died(state["name"], entry))
            ok, answer = _get(entry["port"], health_path)
            if not ok:
                failing.append((entry, answer))
        return failing

    def get(self, name: str) -> EnvironmentInfo | None:
        state = self._read_state(name)
        return self._info(state) if state else None

    def resize(self, name: str, size: int) -> EnvironmentInfo:
        with self._lock(name):
            return self._info(self._resize(self._require(name), size))

    def teardown(self, name: str) -> bool:
        with self._lock(name):
            return self._remove(name)

    def list(self, application: str | None = None) -> list[EnvironmentInfo]:
        if not self.root.is_dir():
            return []
        states = (self._read_state(p.name) for p in sorted(self.root.iterdir()) if (p / "state.json").is_file())
        return [self._info(s) for s in states
                if s and s["stage"] != ROUTER_STAGE and application in (None, s["application"])]

    def set_backends(self, name: str, backends: list[str | int]) -> None:
        """Point the proxy at ``backends`` (URLs or local ports) atomically; for a blue/green switch.

        Requests already sent to an old backend complete; stop old backends only after SWITCH_GRACE.
        """
        urls = [f"http://127.0.0.1:{b}" if isinstance(b, int) else b for b in backends]
        _write_json(self._folder(name) / "backends.json", {"backends": urls})

    def update(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        with self._lock(spec.name):
            state = self._read_state(spec.name)
            if state is None or state.get("status") != "ready":
                self._remove(spec.name)
                return self._create_or_clean_up(spec)
            try:
                self._restart_dead(state)
            except OSError as exc:
                raise EnvironmentFailed(f"environment {spec.name}: cannot restart a process: {exc}") from exc
            if state["version"] != spec.version:
                state = self._replace_release(state, spec)
            else:
                state = self._finish_replacement(state)
            return self._info(self._resize(state, spec.size))

    # ------------------------------------------------------------------ production address (blue/green)

    def ensure_router(self, application: str) -> RouterInfo:
        name = router_name(application)
        with self._lock(name):
            state = self._read_state(name)
            if state is not None and state.get("status") == "ready":
                try:
                    self._restart_dead(state)  # on its own port again, when it is free
                except OSError as exc:
                    raise EnvironmentFailed(f"router {name}: cannot restart its proxy: {exc}") from exc
                self._wait_listening(name, state["processes"])
                return self._router_info(state)
            self._remove(name)
            (self._folder(name) / "logs").mkdir(parents=True)
            state = {"name": name, "application": application, "stage": ROUTER_STAGE, "version": "",
                     "artifact": {}, "status": "provisioning", "processes": [], "routed_to": None,
                     "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
            try:
                (entry,) = self._reserve(state, ["proxy"], port=self.settings.production_port)
                self.set_backends(name, [])
                self._start(state, entry)
                self._wait_listening(name, [entry])
            except BaseException:
                self._remove(name)
                raise
            state["status"] = "ready"
            self._write_state(state)
            return self._router_info(state)

    def router(self, application: str) -> RouterInfo | None:
        state = self._read_state(router_name(application))
        return self._router_info(state) if state else None

    def green_spec(self, router: RouterInfo, spec: EnvironmentSpec) -> EnvironmentSpec:
        return spec  # any environment can sit behind the router: it proxies to the environment's own address

    def test_endpoint(self, router: RouterInfo, name: str) -> str:
        return self.endpoint(name)

    def switch(self, application: str, name: str | None) -> RouterInfo:
        router = router_name(application)
        with self._lock(router):
            state = self._require(router)
            self.set_backends(router, [self.endpoint(name)] if name else [])
            state["routed_to"] = name
            self._write_state(state)
        time.sleep(SWITCH_GRACE)  # from now on every new request goes to ``name``
        return self._router_info(state)

    def remove_router(self, application: str) -> bool:
        return self.teardown(router_name(application))

    # ------------------------------------------------------------------ creating and changing

    def _create_or_clean_up(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        try:
            return self._create(spec)
        except BaseException as exc:  # also a task being killed: leave no process behind
            self._remove(spec.name)
            if not isinstance(exc, Exception) or isinstance(exc, artifacts.ArtifactError | EnvironmentFailed):
                raise
            raise EnvironmentFailed(f"environment {spec.name}: provisioning failed: {exc}") from exc

    def _unpack(self, spec: EnvironmentSpec, release: str) -> None:
        folder = self._folder(spec.name)
        # Verified before anything is unpacked or started: a tampered artifact never runs.
        tarball = artifacts.download_verified(self.s3, spec.artifact, folder / f"{release}.tar.gz")
        with tarfile.open(tarball) as tar:
            tar.extractall(folder / release, filter="data")  # no absolute paths, links out, devices...
        tarball.unlink()

    def _replace_release(self, state: dict, spec: EnvironmentSpec) -> dict:
        """New workers of ``spec.version`` next to the old ones, the proxy switched to them, the old stopped."""
        release = _release_dir(spec.version)
        shutil.rmtree(self._folder(spec.name) / release, ignore_errors=True)
        self._unpack(spec, release)
        old, previous = _workers(state), {k: state.get(k) for k in ("version", "artifact", "image_id")}
        state.update(version=spec.version, artifact=spec.artifact, image_id=spec.image_id)
        new = self._reserve(state, ["worker"] * spec.size, release=release)
        try:
            for entry in new:
                self._start(state, entry)
            self._wait_listening(spec.name, new)
        except Exception as exc:
            _stop(new)
            state["processes"] = [p for p in state["processes"] if p not in new]
            state.update(previous)  # the old version keeps serving
            self._write_state(state)
            if isinstance(exc, EnvironmentFailed):
                raise
            raise EnvironmentFailed(f"environment {spec.name}: cannot start version {spec.version}: {exc}") from exc
        self.set_backends(spec.name, [p["port"] for p in new])
        state["processes"] = [p for p in state["processes"] if p not in old]
        self._write_state(state)
        time.sleep(SWITCH_GRACE)  # the proxy sends new requests to the new workers before the old ones stop
        _stop(old)
        for folder in {p.get("release", "release") for p in old} - {release}:
            shutil.rmtree(self._folder(spec.name) / folder, ignore_errors=True)
        return state

    def _finish_replacement(self, state: dict) -> dict:
        """Finish what ``_replace_release`` left when it was killed: the state says the new version and
        holds its workers, but also the old ones (and the proxy may still send to those)."""
        release = _release_dir(state["version"])
        workers = _workers(state)
        old = [w for w in workers if w.get("release", "release") != release]
        if not old or len(old) == len(workers):
            return state
        new = [w for w in workers if w not in old]
        self._wait_listening(state["name"], new)  # _restart_dead may just have started them again
        self.set_backends(state["name"], [w["port"] for w in new])
        state["processes"] = [p for p in state["processes"] if p not in old]
        self._write_state(state)
        time.sleep(SWITCH_GRACE)  # as in _replace_release: new requests go to the new workers first
        _stop(old)
        for folder in {w.get("release", "release") for w in old} - {release}:
            shutil.rmtree(self._folder(state["name"]) / folder, ignore_errors=True)
        return state

    def _create(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        folder = self._folder(spec.name)
        (folder / "logs").mkdir(parents=True)
        release = _release_dir(spec.version)
        self._unpack(spec, release)
        state = {**dataclasses.asdict(spec), "driver": self.name, "status": "provisioning", "processes": [],
                 "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        new = self._reserve(state, ["worker"] * spec.size + ["proxy"], release=release)
        for entry in new:
            if entry["role"] == "proxy":  # last: it starts with the workers' list in place
                self._write_backends(state)
            self._start(state, entry)
        state["status"] = "ready"
        self._write_state(state)
        return self._info(state)

    def _resize(self, state: dict, size: int) -> dict:
        if size < 1:
            raise EnvironmentFailed(f"environment {state['name']}: size must be at least 1, got {size}")
        workers = _workers(state)
        if size > len(workers):
            release = workers[0].get("release", "release") if workers else _release_dir(state["version"])
            new = self._reserve(state, ["worker"] * (size - len(workers)), release=release)
            try:
                for entry in new:
                    self._start(state, entry)
                self._wait_listening(state["name"], new)
            except Exception as exc:
                _stop(new)
                state["processes"] = [p for p in state["processes"] if p not in new]
                self._write_state(state)
                if isinstance(exc, EnvironmentFailed):
                    raise
                raise EnvironmentFailed(f"environment {state['name']}: cannot start workers: {exc}") from exc
            self._write_backends(state)
            time.sleep(SWITCH_GRACE)  # when resize returns, the proxy uses the new workers
        elif size < len(workers):
            removed = workers[size:]
            state["processes"] = [p for p in state["processes"] if p not in removed]
            self._write_backends(state)
            self._write_state(state)
            time.sleep(SWITCH_GRACE)  # the proxy stops sending new requests to them before they stop
            _stop(removed)
        state["size"] = size
        self._write_state(state)
        return state

    def _restart_dead(self, state: dict) -> None:
        """Start again, on the same port when possible, the processes that died since provisioning."""
        dead = [p for p in state["processes"] if not _alive(p)]
        if not dead:
            return
        _stop(dead)  # reaps them if they were ours
        with self._ports_lock():
            taken = self._taken_ports()
            for entry in dead:
                if entry["port"] in taken or not _bindable(entry["port"]):
                    entry["port"] = self._free_ports(1, taken)[0]
                taken.add(entry["port"])
                entry["pid"] = None  # reserved
            self._write_state(state)
        if any(entry["role"] == "worker" for entry in dead):  # a worker's port may have changed
            self._write_backends(state)
        for entry in dead:
            self._start(state, entry)

    def _reserve(self, state: dict, roles: list[str], release: str | None = None,
                 port: int | None = None) -> list[dict]:
        """New process entries with free ports, recorded in the state before the lock is released.

        ``port``: the one port wanted (a router's configured production port); ``release``: the
        folder new workers run in.
        """
        with self._ports_lock():
            taken = self._taken_ports()
            if port is not None:
                if port in taken or not _bindable(port):
                    raise EnvironmentFailed(f"environment {state['name']}: port {port} is in use")
                ports = [port]
            else:
                ports = self._free_ports(len(roles), taken)
            new = [{"role": role, "port": p, "pid": None} | ({"release": release} if role == "worker" else {})
                   for role, p in zip(roles, ports, strict=True)]
            state["processes"] = _workers(state) + [p for p in new if p["role"] == "worker"] + [
                p for p in state["processes"] + new if p["role"] == "proxy"
            ]
            self._write_state(state)
        return new

    def _start(self, state: dict, entry: dict) -> None:
        folder = self._folder(state["name"])
        home = folder / "home"
        home.mkdir(exist_ok=True)
        # Allow-listed, as for a commit's commands: the application never sees the worker's
        # credentials. DEPLOYLINE_ENVIRONMENT(S_DIR) name the processes of an environment (not secret).
        env = command_environment(home, {"DEPLOYLINE_ENVIRONMENT": state["name"], "DEPLOYLINE_STAGE": state["stage"],
                                         "DEPLOYLINE_ENVIRONMENTS_DIR": str(self.root)})
        if entry["role"] == "worker":
            command = ["bash", "-c", self.settings.start_command.format(port=entry["port"])]
            cwd = folder / entry.get("release", "release")
            env.update(self.settings.env)
            env["DEPLOYLINE_VERSION"] = state["version"]
        else:
            backends = str(folder / "backends.json")
            command = [sys.executable, "-m", "deployline.local_proxy", "--port", str(entry["port"]), "--backends",
                       backends]
            cwd = folder
            env["PYTHONPATH"] = str(_PLUGINS_DIR)
            state["endpoint"] = f"http://127.0.0.1:{entry['port']}"
        entry["log"] = str(folder / "logs" / f"{entry['role']}-{entry['port']}.log")
        with open(entry["log"], "ab") as log:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        _children[process.pid] = process
        try:
            created = psutil.Process(process.pid).create_time()
        except psutil.Error:
            created = None  # already gone: it shows as dead
        entry.update(pid=process.pid, create_time=created, start_ticks=process_start_ticks(process.pid),
                     command=command)
        self._write_state(state)  # at once: a crash now still leaves the pid for teardown

    def _wait_listening(self, name: str, entries: list[dict]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for entry in entries:
            while not _listening(entry["port"]):
                if not _alive(entry):
                    raise EnvironmentFailed(self._died(name, entry))
                if time.monotonic() >= deadline:
                    raise EnvironmentFailed(f"environment {name}: {_label(entry)} not listening after "
                                            f"{START_TIMEOUT:g}s; last lines of {entry['log']}:\n{_tail(entry['log'])}")
                time.sleep(0.05)

    def _remove(self, name: str) -> bool:
        folder = self._folder(name)
        if not folder.exists():
            return False
        state = self._read_state(name)
        _stop(state["processes"] if state else [])
        shutil.rmtree(folder, ignore_errors=True)
        return True

    # ------------------------------------------------------------------ files, locks and ports

    def _folder(self, name: str) -> Path:
        if not _NAME.match(name):
            raise EnvironmentFailed(f"environment name {name!r} is not a safe folder name")
        return self.root / name

    def _read_state(self, name: str) -> dict | None:
        try:
            return json.loads((self._folder(name) / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _require(self, name: str) -> dict:
        state = self._read_state(name)
        if state is None:
            raise EnvironmentFailed(f"environment {name} does not exist")
        return state

    def _write_state(self, state: dict) -> None:
        _write_json(self._folder(state["name"]) / "state.json", state)

    def _write_backends(self, state: dict) -> None:
        self.set_backends(state["name"], [p["port"] for p in _workers(state)])

    @contextlib.contextmanager
    def _flock(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
            yield

    def _lock(self, name: str):
        self._folder(name)  # validates the name
        return self._flock(self.root / ".locks" / f"{name}.lock")

    def _ports_lock(self):
        return self._flock(self.root / ".locks" / "ports.lock")

    def _taken_ports(self) -> set[int]:
        """Ports of live processes and of reservations (pid None) in every environment's state."""
        taken = set()
        for path in self.root.glob("*/state.json"):
            state = self._read_state(path.parent.name) or {}
            taken.update(p["port"] for p in state.get("processes", []) if p.get("pid") is None or _alive(p))
        return taken

    @staticmethod
    def _free_ports(count: int, taken: set[int]) -> list[int]:
        low, high = PORT_RANGE
        start = random.randrange(low, high)  # a random start: concurrent allocators rarely scan the same ports
        ports = []
        for offset in range(high - low):
            port = low + (start - low + offset) % (high - low)
            if port not in taken and _bindable(port):
                ports.append(port)
                if len(ports) == count:
                    return ports
        raise EnvironmentFailed(f"no {count} free ports in {low}-{high}")

    def _info(self, state: dict) -> EnvironmentInfo:
        processes = [{k: p.get(k) for k in ("role", "pid", "port", "log")} | {"alive": _alive(p)}
                     for p in state["processes"]]
        return EnvironmentInfo(
            name=state["name"], application=state["application"], stage=state["stage"],
            version=state["version"], size=len(_workers(state)), endpoint=state.get("endpoint", ""),
            driver=self.name, created_at=state["created_at"], labels=state.get("labels", {}),
            details={"status": state.get("status"), "folder": str(self._folder(state["name"])),
                     "artifact": (state.get("artifact") or {}).get("uri"), "image_id": state.get("image_id"),
                     "processes": processes},
        )

    def _router_info(self, state: dict) -> RouterInfo:
        return RouterInfo(application=state["application"], name=state["name"], endpoint=state.get("endpoint", ""),
                          live=state.get("routed_to"), driver=self.name,
                          details={"status": state.get("status"), "folder": str(self._folder(state["name"])),
                                   "processes": self._info(state).details["processes"]})

    def _died(self, name: str, entry: dict) -> str:
        code = _exit_code(entry)
        how = f"exited with code {code}" if code is not None else "is not running"
        log = entry.get("log")
        return f"environment {name}: {_label(entry)} {how}; last lines of {log}:\n{_tail(log)}"


# ---------------------------------------------------------------------- processes


def router_name(application: str) -> str:
    return f"dl-{application.replace('_', '-')}-router"


def _release_dir(version: str) -> str:
    return "release-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", version)


def _workers(state: dict) -> list[dict]:
    return [p for p in state["processes"] if p["role"] == "worker"]


def _label(entry: dict) -> str:
    return f"{entry['role']} on port {entry['port']} (pid {entry.get('pid')})"


def _alive(entry: dict) -> bool:
    """The recorded process is still running (not a recycled pid, not a zombie)."""
    if not entry.get("pid") or entry.get("create_time") is None:
        return False
    child = _children.get(entry["pid"])
    if child is not None and child.poll() is not None:
        return False  # ours, and now reaped
    try:
        process = psutil.Process(entry["pid"])
        ticks = process_start_ticks(entry["pid"])
        if entry.get("start_ticks") is not None and ticks is not None:
            # The kernel's start time in ticks since boot never moves. create_time (boot time +
            # ticks) does when the clock is stepped: on a machine whose clock was adjusted by
            # seconds, environments were taken for dead and never stopped.
            same = ticks == entry["start_ticks"]
        else:
            same = abs(process.create_time() - entry["create_time"]) < 1.0
        return same and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _exit_code(entry: dict) -> int | None:
    child = _children.get(entry.get("pid"))
    return child.poll() if child is not None else None  # only known for processes this Python started


def _stop(entries: list[dict]) -> None:
    """SIGTERM each live process group, SIGKILL what is left after STOP_TIMEOUT; never a recycled pid."""
    procs = []
    for entry in entries:
        if not _alive(entry):
            continue
        try:
            leader = psutil.Process(entry["pid"])
            procs += [leader, *leader.children(recursive=True)]
            os.killpg(entry["pid"], signal.SIGTERM)  # its own session: the group is the worker and its children
        except (psutil.Error, OSError):
            pass  # gone meanwhile
    left = _wait_gone(procs, STOP_TIMEOUT)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()  # psutil checks that the pid is still this process
    _wait_gone(left, 2.0)
    for entry in entries:
        if entry.get("pid") in _children and _children[entry["pid"]].poll() is not None:
            del _children[entry["pid"]]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    child = _children.get(process.pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        # An orphan's zombie stays until init reaps it (some container inits never do): it is gone.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: str | None, lines: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return b"\n".join(fh.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except (OSError, TypeError):
        return "(no log)"


# ---------------------------------------------------------------------- sockets and files


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _get(port: int, path: str) -> tuple[bool, str]:
    """GET http://127.0.0.1:<port><path> with http.client: no proxy settings from the environment apply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return 200 <= response.status < 300, f"HTTP {response.status}"
    except (OSError, http.client.HTTPException) as exc:
        return False, repr(exc)
    finally:
        conn.close()


def _write_json(path: Path, data: dict) -> None:
    """Write temp + os.replace: readers (the proxy, other processes) never see half a file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(temp, path)
