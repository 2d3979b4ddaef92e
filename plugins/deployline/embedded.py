"""The embedded default on one machine: moto for AWS, a local bare git repository, PostgreSQL and Airflow.

Used by ``make demo`` (``python -m deployline demo``) and by the end-to-end tests, so
both run the very same set-up.  Every process started here is in its own process
group and is stopped by ``Stack.stop()``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deployline.commands import tool_environment
from deployline.config import PROJECT_ROOT

SAMPLE_SERVICE = PROJECT_ROOT / "include" / "sample-service"
REGION = "us-east-1"
AWS_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
# botocore's retry policy for every client made from the connection (the amazon provider passes the
# extra's config_kwargs to botocore.config.Config): throttling (SlowDown, ThrottlingException...),
# 5xx answers and dropped connections are retried with exponential backoff and jitter; max_attempts
# counts the retries, so a call is tried 6 times before its error reaches the task.
AWS_RETRIES = {"mode": "standard", "max_attempts": 5}


class StackError(RuntimeError):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        raise_if_a_stack_failed()  # a dead scheduler will not start what we wait for
        try:
            result = check()
            if result:
                return result
        except StackError:  # a component has exited: waiting longer cannot help
            raise
        except Exception as exc:  # the thing may not be up yet
            last_error = exc
        time.sleep(interval)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last_error})" if last_error else ""))


DEMO_AUTHOR = ("Deployline Demo", "demo@deployline.invalid")


def git(*args: str, cwd: Path | None = None) -> str:
    env = tool_environment({
        "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", DEMO_AUTHOR[0]),
        "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", DEMO_AUTHOR[1]),
        "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", DEMO_AUTHOR[0]),
        "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", DEMO_AUTHOR[1]),
    })
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def seed_repository(bare: Path, clone: Path, source: Path = SAMPLE_SERVICE, branch: str = "main") -> str:
    """A bare repository with ``source`` as its first commit, and a clone to push from.

    Kept when it already exists, so a second ``make demo`` continues the same history.
    Returns the head sha.
    """
    if not (bare / "HEAD").exists():
        bare.parent.mkdir(parents=True, exist_ok=True)
        git("init", "--quiet", "--bare", f"--initial-branch={branch}", str(bare))
    if not (clone / ".git").exists():
        shutil.rmtree(clone, ignore_errors=True)
        git("clone", "--quiet", str(bare), str(clone))
    # Commits made in the clone by hand carry the demo's identity, not the machine's git config.
    git("config", "user.name", DEMO_AUTHOR[0], cwd=clone)
    git("config", "user.email", DEMO_AUTHOR[1], cwd=clone)
    if not git("ls-remote", "--heads", str(bare), branch):
        shutil.copytree(source, clone, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".ruff_cache", "dist"))
        git("checkout", "--quiet", "-B", branch, cwd=clone)
        git("add", "-A", cwd=clone)
        git("commit", "--quiet", "-m", "Import the sample service", cwd=clone)
        git("push", "--quiet", "origin", branch, cwd=clone)
    return git("rev-parse", f"refs/heads/{branch}", cwd=bare)


def aws_connection_uri(endpoint: str, region: str = REGION) -> str:
    return json.dumps({
        "conn_type": "aws",
        "login": AWS_KEYS["AWS_ACCESS_KEY_ID"],
        "password": AWS_KEYS["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": endpoint, "region_name": region, "config_kwargs": {"retries": dict(AWS_RETRIES)}},
    })


USERS = {"admin": "admin", "approver": "op", "viewer": "viewer"}  # simple auth manager: user -> role
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


SQLITE_CONNECT_ARGS = {"timeout": 20}  # seconds a connection waits for SQLite's lock (default 5)
SQLITE_CONNECT_ARGS_ASYNC = {"timeout": 20}


def prepare_users(home: Path) -> dict[str, str]:
    """Passwords of the demo users, written where the simple auth manager keeps them (it keeps existing ones)."""
    import secrets

    path = home / "simple_auth_manager_passwords.json.generated"
    passwords = json.loads(path.read_text()) if path.exists() else {}
    for user in USERS:
        passwords.setdefault(user, secrets.token_urlsafe(12))
    home.mkdir(parents=True, exist_ok=True)
    # Readable by its owner only: the admin password is in it.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(json.dumps(passwords))
    os.chmod(path, 0o600)  # a file that existed keeps its mode through O_CREAT
    return passwords


def airflow_env(
    home: Path, api_port: int, moto_endpoint: str, extra: dict[str, str] | None = None, paused: bool = False
) -> dict[str, str]:
    """Environment of the Airflow components on this project (see docs/PERFORMANCE.md for the tuning).

    ``extra`` must name the metadata database (``start_database``)."""
    venv_bin = str(Path(sys.executable).parent)
    passwords = prepare_users(home)
    env = dict(os.environ)
    env.update(AWS_KEYS)
    env.update({
        "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(paused),
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{api_port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://localhost:{api_port}",
        # A new or changed pipeline config shows up within seconds, not minutes.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        # The scheduler sleeps this long after a pass with nothing to do (default 1 s), so a task
        # waited up to 1 s for its upstream's end to be seen: gaps 0.2 s instead of 0.5-0.6 s, about
        # 10 s less per release, for about 8 % more of one core while idle (docs/PERFORMANCE.md).
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
        "AIRFLOW__CORE__PARALLELISM": "16",
        # A task whose process died with its scheduler (LocalExecutor) or worker fails after a
        # minute, not five, and is retried (deploy/airflow.env says the same for deployments).
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
        "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_uri(moto_endpoint),
        # The simple auth manager and its users, even when the FAB provider is installed (it is, for
        # tests/unit/test_access_control.py) and the caller's shell selects FAB.
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        # Approval gates read the decision's note and event log through the REST API: with a
        # read-only account (the viewer role), never an admin login.
        "AIRFLOW_CONN_DEPLOYLINE_API": json.dumps({
            "conn_type": "http", "host": f"http://localhost:{api_port}",
            "login": "viewer", "password": passwords["viewer"]}),
        "DEPLOYLINE_WORK_DIR": str(home / "deployline"),
        "PYTHONUNBUFFERED": "1",
        # As deploy/airflow.env: Airflow's .airflowignore matching warns in every task log.
        "PYTHONWARNINGS": "ignore:GitWildMatchPattern:DeprecationWarning",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Airflow's log servers are not started here (start_airflow); should a caller start one,
        # it takes a free port rather than 8793/8794, so two stacks on one machine do not collide.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT / "plugins"), env.get("PYTHONPATH")) if p),
    })
    env.update(extra or {})
    if env.get(DATABASE_URL, "").startswith("sqlite"):
        # SQLite gives up on a locked database after 5 s; under load that failed REST calls with
        # "Database error" and once stopped the triggerer for good. Writers wait longer instead.
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "deployline.embedded.SQLITE_CONNECT_ARGS"
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"] = "deployline.embedded.SQLITE_CONNECT_ARGS_ASYNC"
    return env


def stop_environments(home: Path) -> list[str]:
    """Tear down every local environment and production address under ``home`` (an AIRFLOW_HOME).

    Their processes outlive Airflow on purpose; when the embedded stack stops, they go too.
    """
    from deployline.environments.local import LocalDriver

    root = home / "deployline" / "environments"
    driver = LocalDriver(None, root=root)
    removed = []
    for state in sorted(root.glob("*/state.json")):
        if driver.teardown(state.parent.name):
            removed.append(state.parent.name)
    return removed


@dataclass
class Component:
    """One long-running process of a stack, and how to start it again."""

    name: str
    argv: list[str]
    env: dict
    log_path: Path
    proc: subprocess.Popen
    stop_signal: int = signal.SIGTERM
    popen_kwargs: dict = field(default_factory=dict)
    restarts: int = 0
    stop_last: bool = False  # the database: stopped after everything that uses it

    def last_lines(self, count: int = 15) -> str:
        return last_lines(self.log_path, count)


def last_lines(path: Path, count: int = 15) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 16384))
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(f"    | {line}" for line in lines[-count:]) or "    | (empty log)"


_WATCHED: list[Stack] = []  # stacks whose failure stops every wait_until at once


class Stack:
    """The processes of one embedded stack, each in its own process group.

    ``watch()`` looks after them from a thread: a component that exits is reported by name, with
    its exit code and the last lines of its log, then restarted (``restart=True``, as ``make
    demo`` does, a few times at most) or recorded as the stack's failure, which every
    ``wait_until`` raises at once (the end-to-end tests fail fast instead of waiting for runs
    that no scheduler will start). ``stop()`` ends each component and whatever it started.
    """

    MAX_RESTARTS = 3

    def __init__(self, report=None):
        self.components: list[Component] = []
        self.failure: StackError | None = None
        self.events: list[str] = []
        self._report = report or (lambda message: print(message, file=sys.stderr, flush=True))
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._on_stop: list = []
        self._held: set[str] = set()

    @property
    def processes(self) -> list[tuple[str, subprocess.Popen]]:
        return [(c.name, c.proc) for c in self.components]

    def pid(self, name: str) -> int:
        return self.component(name).proc.pid

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def start(self, name: str, argv: list[str], env: dict, log_path: Path,
              stop_signal: int = signal.SIGTERM, stop_last: bool = False, **popen_kwargs) -> subprocess.Popen:
        with self._lock:
            proc = self._spawn(argv, env, log_path, popen_kwargs)
            self.components.append(Component(name, argv, env, log_path, proc, stop_signal, popen_kwargs,
                                             stop_last=stop_last))
            return proc

    @staticmethod
    def _spawn(argv, env, log_path: Path, popen_kwargs: dict) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **popen_kwargs)

    def hold(self, name: str) -> None:
        """Leave ``name`` down if it exits (a lost machine that stays away), until ``release``."""
        self._held.add(name)

    def release(self, name: str) -> None:
        """Restart ``name`` at the next look if it is down (``watch(restart=True)``)."""
        self._held.discard(name)

    def on_stop(self, callback) -> None:
        """``callback()`` runs at the end of ``stop()`` (e.g. to remove a database cluster)."""
        self._on_stop.append(callback)

    def exited(self) -> list[Component]:
        return [c for c in self.components if c.proc.poll() is not None and c.name not in self._held]

    def describe_exit(self, component: Component) -> str:
        return (f"{component.name} (pid {component.proc.pid}) exited with code {component.proc.returncode}; "
                f"last lines of {component.log_path}:\n{component.last_lines()}")

    def check_alive(self) -> None:
        if self.failure:
            raise self.failure
        for component in self.exited():
            raise StackError(self.describe_exit(component))

    def watch(self, restart: bool, interval: float = 1.0) -> None:
        """Look after the components from now on (see the class)."""
        if self not in _WATCHED:
            _WATCHED.append(self)
        self._watcher = threading.Thread(target=self._watch, args=(restart, interval), daemon=True,
                                         name="deployline-stack-watch")
        self._watcher.start()

    def _watch(self, restart: bool, interval: float) -> None:
        while not self._stopping.wait(interval):
            with self._lock:
                if self._stopping.is_set():
                    return
                for component in self.exited():
                    message = self.describe_exit(component)
                    try:  # what it started (LocalExecutor's workers, the log server) goes with it
                        os.killpg(component.proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    if restart and component.restarts < self.MAX_RESTARTS:
                        component.restarts += 1
                        component.proc = self._spawn(component.argv, component.env, component.log_path,
                                                     component.popen_kwargs)
                        message += (f"\nrestarted {component.name} (pid {component.proc.pid}, "
                                    f"restart {component.restarts} of {self.MAX_RESTARTS})")
                        self.events.append(message)
                        self._report(message)
                        continue
                    self.failure = StackError(message + ("\nnot restarted again: it keeps exiting" if restart else ""))
                    self.events.append(message)
                    self._report(f"stack failed: {message}")
                    return

    def stop(self, grace: float = 20) -> None:
        """SIGTERM (or the component's stop signal) to every component at once, the database
        after the others; SIGKILL to each process group after ``grace`` seconds."""
        self._stopping.set()
        if self in _WATCHED:
            _WATCHED.remove(self)
        with self._lock:
            first = [c for c in self.components if not c.stop_last]
            for group in (first, [c for c in self.components if c.stop_last]):
                for component in reversed(group):
                    if component.proc.poll() is None:
                        try:
                            os.killpg(component.proc.pid, component.stop_signal)
                        except ProcessLookupError:
                            pass
                deadline = time.monotonic() + grace
                for component in reversed(group):
                    try:
                        component.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                    try:
                        os.killpg(component.proc.pid, signal.SIGKILL)  # and whatever it left in its group
                    except (ProcessLookupError, PermissionError):
                        pass
                    if component.proc.poll() is None:
                        component.proc.wait(timeout=10)
            self.components.clear()
        for callback in self._on_stop:
            try:
                callback()
            except Exception as exc:  # stopping goes on
                self._report(f"clean-up after stop failed: {exc}")
        self._on_stop.clear()


def raise_if_a_stack_failed() -> None:
    for stack in list(_WATCHED):
        if stack.failure:
            raise stack.failure


def start_moto(stack: Stack, port: int, log_path: Path) -> str:
    if not port_is_free(port):
        raise StackError(f"port {port} for moto is in use (set DEPLOYLINE_MOTO_PORT to another port)")
    # moto_server with two gaps to AWS closed: atomic conditional writes, versioned template buckets.
    plugins = os.pathsep.join(p for p in (str(PROJECT_ROOT / "plugins"), os.environ.get("PYTHONPATH")) if p)
    stack.start("moto", [sys.executable, "-m", "deployline.moto_server", "-H", "127.0.0.1", "-p", str(port)],
                tool_environment(AWS_KEYS | {"PYTHONPATH": plugins}, prefixes=("MOTO_",)), log_path)
    endpoint = f"http://127.0.0.1:{port}"
    import requests

    wait_until(lambda: requests.get(f"{endpoint}/moto-api/", timeout=2).ok, 30, f"moto on {endpoint}")
    return endpoint


def ensure_bucket(endpoint: str, bucket: str, region: str = REGION) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region, **_boto_keys())
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
    # As the artifact_store stack makes it: the registry keeps each artifact's object version.
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def _boto_keys() -> dict:
    return {
        "aws_access_key_id": AWS_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_KEYS["AWS_SECRET_ACCESS_KEY"],
    }


DATABASE_URL = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"


def start_database(stack: Stack, folder: Path, log_dir: Path, timeout: float = 60) -> dict[str, str]:
    """Airflow's metadata database: a PostgreSQL server of the stack's own in ``folder``.

    Returns the Airflow settings that point at it. A database named by the caller's own
    ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` is used instead (SQLite only that way: under load its
    single writer lock stopped the scheduler and the triggerer, docs/RELIABILITY.md).
    """
    from deployline import postgres

    if os.environ.get(DATABASE_URL):
        return {DATABASE_URL: os.environ[DATABASE_URL]}
    try:
        cluster = postgres.init_cluster(folder)
    except postgres.PostgresError as exc:
        raise StackError(str(exc)) from exc
    stack.on_stop(cluster.remove)
    port = free_port()
    proc = stack.start("postgres", cluster.server_argv(port), postgres.server_env(), log_dir / "postgres.log",
                       stop_signal=signal.SIGINT, stop_last=True, **postgres.run_as())  # SIGINT: fast shutdown

    def ready():
        if proc.poll() is not None:
            raise StackError(stack.describe_exit(stack.component("postgres")))
        return postgres.accepts_connections(cluster, port)

    wait_until(ready, timeout, f"PostgreSQL on 127.0.0.1:{port} (log: {log_dir / 'postgres.log'})", interval=0.3)
    postgres.create_database(cluster, port)
    return {DATABASE_URL: cluster.url(port)}


AIRFLOW_COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")


def start_airflow(stack: Stack, env: dict, log_dir: Path, timeout: float = 240,
                  components: tuple[str, ...] = AIRFLOW_COMPONENTS) -> str:
    """``airflow db migrate``, then each component as a process of its own (as Compose runs them),
    each with its log in ``log_dir``; returns the API's base URL once every component is healthy."""
    port = int(env["AIRFLOW__API__PORT"])
    if not port_is_free(port):
        raise StackError(f"port {port} for the Airflow API server is in use (set DEPLOYLINE_API_PORT)")
    if not env.get(DATABASE_URL):
        raise StackError(f"no metadata database: call start_database first or set {DATABASE_URL}")
    airflow = str(Path(sys.executable).parent / "airflow")
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "db-migrate.log", "ab") as log:
        done = subprocess.run([airflow, "db", "migrate"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=600)
    if done.returncode != 0:
        raise StackError(f"airflow db migrate failed (exit {done.returncode}); last lines of "
                         f"{log_dir / 'db-migrate.log'}:\n{last_lines(log_dir / 'db-migrate.log')}")
    # The deploy pools, as a deployment makes them when it starts (no task creates them).
    with open(log_dir / "pools.log", "ab") as log:
        done = subprocess.run([sys.executable, "-m", "deployline", "pools"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300)
    if done.returncode != 0:
        raise StackError(f"creating the deploy pools failed (exit {done.returncode}); last lines of "
                         f"{log_dir / 'pools.log'}:\n{last_lines(log_dir / 'pools.log')}")
    for name in components:
        # No log server: Airflow's binds every interface, whatever the port; on one machine the
        # API server reads the task and trigger logs from their files.
        serve_logs = ["--skip-serve-logs"] if name in ("scheduler", "triggerer") else []
        stack.start(name, [airflow, name, *serve_logs], env, log_dir / f"{name}.log")
    base = f"http://localhost:{port}"
    import requests

    def healthy():
        stack.check_alive()
        health = requests.get(f"{base}/api/v2/monitor/health", timeout=5).json()
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all((health.get(p) or {}).get("status") == "healthy" for p in parts)

    wait_until(healthy, timeout, f"Airflow on {base} (logs: {log_dir})", interval=1)
    return base


def password(home: Path, user: str = "admin") -> str:
    return json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())[user]
