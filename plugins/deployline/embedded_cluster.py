"""The Compose topology as plain processes: PostgreSQL, Redis, and Airflow with the CeleryExecutor.

``make test-distributed`` runs Deployline on it: API server, scheduler, DAG processor, triggerer
and two Celery workers, each a process group of its own, as ``docker-compose.yaml`` runs them in
containers. The workers share nothing but the database, the broker, git and S3: each has its own
``AIRFLOW_HOME``, ``DEPLOYLINE_WORK_DIR``, ``HOME`` and temporary folder, and task logs go to S3
(Airflow's remote logging), not to a shared folder. Worker 1 also serves the local driver's
queue, so it is the host of the local environments.

The Airflow settings shared with Compose and Helm come from ``deploy/airflow.env``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deployline import embedded
from deployline.config import PROJECT_ROOT

SETTINGS_FILE = PROJECT_ROOT / "deploy" / "airflow.env"
ENVIRONMENT_QUEUE = "deployline_local_environments"  # the pipeline config's default
REDIS_ENV = "DEPLOYLINE_REDIS_SERVER"


def shared_settings(path: Path = SETTINGS_FILE) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``deploy/airflow.env`` (Compose's env_file format: no quotes, no expansion)."""
    settings = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise embedded.StackError(f"{path}:{number}: expected KEY=VALUE, found {line!r}")
        settings[key.strip()] = value.strip()
    return settings


def redis_server() -> str:
    """The ``redis-server`` binary: ``$DEPLOYLINE_REDIS_SERVER`` or the one on PATH (``make
    test-distributed`` installs Debian's when missing and it runs as root)."""
    found = os.environ.get(REDIS_ENV) or shutil.which("redis-server")
    if not found:
        raise embedded.StackError(
            "no redis-server: install Debian's (apt-get install redis-server; `make test-distributed` does it "
            f"when run as root) or point {REDIS_ENV} at a redis-server binary")
    return found


def start_redis(stack: embedded.Stack, folder: Path, log_dir: Path) -> str:
    """Redis on 127.0.0.1 and a free port, with a password and no persistence; returns the broker URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port, password = embedded.free_port(), secrets.token_urlsafe(18)
    conf = folder / "redis.conf"  # the password in a file of ours, not on the command line
    conf.write_text(f"bind 127.0.0.1\nport {port}\nrequirepass {password}\nsave \"\"\nappendonly no\n"
                    f"dir {folder}\nprotected-mode yes\n")
    os.chmod(conf, 0o600)
    proc = stack.start("redis", [redis_server(), str(conf)], {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                       log_dir / "redis.log", stop_last=True)

    def ready():
        if proc.poll() is not None:
            raise embedded.StackError(stack.describe_exit(stack.component("redis")))
        import redis

        return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2).ping()

    embedded.wait_until(ready, 30, f"redis on 127.0.0.1:{port}", interval=0.3)
    return f"redis://:{password}@127.0.0.1:{port}/0"


@dataclass
class Worker:
    name: str
    queues: tuple[str, ...]
    home: Path  # its AIRFLOW_HOME, HOME, work and temporary folders are all under here

    @property
    def work_dir(self) -> Path:
        return self.home / "deployline"


@dataclass
class Cluster:
    base: str
    env: dict[str, str]
    workers: list[Worker] = field(default_factory=list)

    def worker(self, name: str) -> Worker:
        return next(w for w in self.workers if w.name == name)


def cluster_env(env: dict[str, str], broker_url: str, database_url: str, logs_url: str) -> dict[str, str]:
    """``env`` (from ``embedded.airflow_env``) turned into the Celery cluster's: the shared settings
    of deploy/airflow.env, the broker, Celery's result backend, task logs in S3, and the secrets
    every component must share (they would come from Compose's .env or Helm's secrets)."""
    env = dict(env) | shared_settings()
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "8",  # as docker-compose.yaml
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        # psycopg2 named: SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3, which Airflow does not need.
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
        "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
        "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": logs_url,
        "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": "aws_default",
    })
    return env


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def start_workers(stack: embedded.Stack, env: dict[str, str], root: Path, log_dir: Path,
                  workers: list[Worker]) -> None:
    airflow = str(Path(sys.executable).parent / "airflow")
    for worker in workers:
        for folder in ("airflow", "home", "tmp", "deployline"):
            (worker.home / folder).mkdir(parents=True, exist_ok=True)
        own = dict(env) | {
            "AIRFLOW_HOME": str(worker.home / "airflow"),
            "HOME": str(worker.home / "home"),
            "TMPDIR": str(worker.home / "tmp"),
            "DEPLOYLINE_WORK_DIR": str(worker.work_dir),
            # Workers on one machine: each its own log server port (a worker on its own host needs none).
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(embedded.free_port()),
        }
        stack.start(worker.name, [airflow, "celery", "worker", "--queues", ",".join(worker.queues),
                                  "--celery-hostname", f"{worker.name}@%h", "--without-mingle", "--without-gossip"],
                    own, log_dir / f"{worker.name}.log")


def start_cluster(stack: embedded.Stack, root: Path, moto_endpoint: str, log_dir: Path,
                  extra: dict[str, str] | None = None, logs_bucket: str = "deployline-logs",
                  api_port: int | None = None) -> Cluster:
    """PostgreSQL, Redis, the Airflow control plane and two Celery workers (see the module)."""
    database = embedded.start_database(stack, root / "postgres", log_dir)
    broker = start_redis(stack, root / "redis", log_dir)
    embedded.ensure_bucket(moto_endpoint, logs_bucket)
    home = root / "airflow"
    env = embedded.airflow_env(home, api_port or embedded.free_port(), moto_endpoint, database | (extra or {}))
    env = cluster_env(env, broker, database[embedded.DATABASE_URL], f"s3://{logs_bucket}/logs")
    base = embedded.start_airflow(stack, env, log_dir)  # the control plane: shares AIRFLOW_HOME with nothing else
    workers = [Worker("worker-1", ("default", ENVIRONMENT_QUEUE), root / "worker-1"),
               Worker("worker-2", ("default",), root / "worker-2")]
    start_workers(stack, env, root, log_dir, workers)
    names = [w.name for w in workers]
    embedded.wait_until(lambda: _workers_ready(stack, env, names), 120, "both Celery workers", interval=2)
    return Cluster(base, env, workers)


def _workers_ready(stack: embedded.Stack, env: dict[str, str], names: list[str]) -> bool:
    """Every worker answers Celery's ping (as Compose's healthcheck asks)."""
    stack.check_alive()
    airflow_celery = [sys.executable, "-m", "celery", "--app",
                      "airflow.providers.celery.executors.celery_executor.app", "inspect", "ping", "--timeout", "5"]
    done = subprocess.run(airflow_celery, env=env, capture_output=True, text=True, timeout=60)
    return all(f"{name}@" in done.stdout for name in names)


def kill_worker(stack: embedded.Stack, name: str) -> list[int]:
    """SIGKILL a worker and everything it runs, as when its machine or container dies; returns the pids."""
    import psutil

    root = stack.component(name).proc
    victims = [root.pid]
    try:
        victims += [p.pid for p in psutil.Process(root.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(root.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return victims
