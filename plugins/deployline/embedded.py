"""The embedded default on one machine: moto for AWS, a local bare git repository, ``airflow standalone``.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

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
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the thing may not be up yet
            last_error = exc
        time.sleep(interval)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last_error})" if last_error else ""))


def git(*args: str, cwd: Path | None = None) -> str:
    env = os.environ | {
        "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "Deployline Demo"),
        "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "demo@deployline.invalid"),
        "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "Deployline Demo"),
        "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "demo@deployline.invalid"),
    }
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
    path.write_text(json.dumps(passwords))
    return passwords


def airflow_env(
    home: Path, api_port: int, moto_endpoint: str, extra: dict[str, str] | None = None, paused: bool = False
) -> dict[str, str]:
    """Environment for ``airflow standalone`` on this project (see docs/PERFORMANCE.md for the tuning)."""
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
        "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_uri(moto_endpoint),
        # The simple auth manager and its users, even when the FAB provider is installed (it is, for
        # tests/unit/test_access_control.py) and the caller's shell selects FAB.
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        # Approval gates read the decision's note and event log through the REST API.
        "AIRFLOW_CONN_DEPLOYLINE_API": json.dumps({
            "conn_type": "http", "host": f"http://localhost:{api_port}",
            "login": "admin", "password": passwords["admin"]}),
        "DEPLOYLINE_WORK_DIR": str(home / "deployline"),
        "PYTHONUNBUFFERED": "1",
        # SQLite gives up on a locked database after 5 s; under load that failed REST calls with
        # "Database error" and once stopped the triggerer for good. Writers wait longer instead,
        # and workers wait for the API server longer than a writer waits for the lock.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "deployline.embedded.SQLITE_CONNECT_ARGS",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "deployline.embedded.SQLITE_CONNECT_ARGS_ASYNC",
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT / "plugins"), env.get("PYTHONPATH")) if p),
    })
    env.update(extra or {})
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
class Stack:
    """Processes of one embedded stack; ``stop()`` ends each of them and their children."""

    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    logs: list = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        self.logs.append(log)
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with code {proc.returncode}")

    def stop(self, grace: float = 20) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for _, proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # and whatever it left in its group
            except ProcessLookupError:
                pass
        for log in self.logs:
            log.close()
        self.processes.clear()
        self.logs.clear()


def start_moto(stack: Stack, port: int, log_path: Path) -> str:
    if not port_is_free(port):
        raise StackError(f"port {port} for moto is in use (set DEPLOYLINE_MOTO_PORT to another port)")
    # moto_server with S3 conditional writes made atomic, as they are on AWS (see moto_atomic).
    plugins = os.pathsep.join(p for p in (str(PROJECT_ROOT / "plugins"), os.environ.get("PYTHONPATH")) if p)
    stack.start("moto", [sys.executable, "-m", "deployline.moto_atomic", "-H", "127.0.0.1", "-p", str(port)],
                os.environ | AWS_KEYS | {"PYTHONPATH": plugins}, log_path)
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


def _boto_keys() -> dict:
    return {
        "aws_access_key_id": AWS_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_KEYS["AWS_SECRET_ACCESS_KEY"],
    }


def start_airflow(stack: Stack, env: dict, log_path: Path, timeout: float = 240) -> str:
    port = int(env["AIRFLOW__API__PORT"])
    if not port_is_free(port):
        raise StackError(f"port {port} for the Airflow API server is in use (set DEPLOYLINE_API_PORT)")
    airflow = Path(sys.executable).parent / "airflow"
    proc = stack.start("airflow standalone", [str(airflow), "standalone"], env, log_path)
    base = f"http://localhost:{port}"
    import requests

    def healthy():
        if proc.poll() is not None:
            raise StackError(f"airflow standalone exited with code {proc.returncode}; see {log_path}")
        health = requests.get(f"{base}/api/v2/monitor/health", timeout=5).json()
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all((health.get(p) or {}).get("status") == "healthy" for p in parts)

    wait_until(healthy, timeout, f"Airflow on {base} (log: {log_path})", interval=1)
    return base


def password(home: Path, user: str = "admin") -> str:
    return json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())[user]
