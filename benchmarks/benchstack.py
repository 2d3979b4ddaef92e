"""The embedded default for the benchmarks, as ``make demo`` starts it: moto, a seeded bare
repository, PostgreSQL (or SQLite, to compare) and the Airflow components with Deployline's
``airflow_env`` (or Airflow's defaults).

``with embedded_stack(...) as bench:`` yields the running stack; on leaving (also on SIGTERM
or an error) Airflow and moto are stopped, and so are the environments the pipeline left
running (pre-production, production and its address outlive Airflow on purpose).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "plugins") not in sys.path:
    sys.path.insert(0, str(ROOT / "plugins"))

from deployline import embedded  # noqa: E402
from deployline.airflow_api import AirflowApi  # noqa: E402
from deployline.config import dump_config  # noqa: E402
from deployline.sensors import pipeline_run_id  # noqa: E402

APP = "sample_service"
PIPELINE = f"{APP}_pipeline"
DEMO_CONFIG = ROOT / "include" / "pipelines" / f"{APP}.yaml"
# Deployline's tuning in airflow_env that --airflow-defaults drops (docs/PERFORMANCE.md).
TUNING_PREFIXES = ("AIRFLOW__SCHEDULER__", "AIRFLOW__DAG_PROCESSOR__", "AIRFLOW__CORE__PARALLELISM")


def ts(value: str | None) -> float | None:
    """An ISO 8601 time from the REST API as a Unix timestamp (None stays None)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages (kept with every result: the machine is shared)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def tuned_env(env: dict[str, str], airflow_defaults: bool = False,
              overrides: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` without Deployline's scheduler/DAG-processor/parallelism settings when
    ``airflow_defaults``, then with ``overrides`` (an empty value removes a variable)."""
    env = dict(env)
    if airflow_defaults:
        for key in [k for k in env if k.startswith(TUNING_PREFIXES)]:
            del env[key]
    for key, value in (overrides or {}).items():
        if value == "":
            env.pop(key, None)
        else:
            env[key] = value
    return env


def tuning_of(env: dict[str, str]) -> dict[str, str]:
    """The scheduler, DAG processor, triggerer and parallelism settings in force (as set in ``env``)."""
    keys = (*TUNING_PREFIXES, "AIRFLOW__TRIGGERER__")
    return {k: v for k, v in sorted(env.items()) if k.startswith(keys)}


@dataclass
class Bench:
    root: Path
    stack: embedded.Stack
    moto: str
    bare: Path
    clone: Path
    seed: str
    home: Path
    base: str
    api: AirflowApi
    env: dict
    started_at: float  # when the Airflow components were started
    healthy_s: float
    database: str  # "postgres", "sqlite" or "postgres+celery"
    pushes: int = field(default=0)

    def approver(self) -> AirflowApi:
        return AirflowApi(self.base, "approver", embedded.password(self.home, "approver"))

    def push_commit(self, note: str, path: str = "NOTES.md") -> tuple[str, float]:
        """Commit a change to ``path`` (an application change) and push it; returns (sha, pushed at)."""
        self.pushes += 1
        target = self.clone / path
        target.write_text(f"{note} ({self.pushes})\n")
        embedded.git("add", "-A", cwd=self.clone)
        embedded.git("commit", "--quiet", "-m", note, cwd=self.clone)
        sha = embedded.git("rev-parse", "HEAD", cwd=self.clone)
        pushed_at = time.time()
        embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=self.clone)
        return sha, pushed_at

    def wait_for_polled_run(self, sha: str, timeout: float = 300) -> dict:
        """The pipeline run the poll starts for ``sha``, once it exists."""
        run_id = pipeline_run_id(sha)
        return embedded.wait_until(lambda: _find_run(self.api, PIPELINE, run_id), timeout, f"run {run_id}", 0.5)

    def components(self) -> dict[str, int]:
        """pid of each Airflow component still running (scheduler, triggerer, dag-processor, api-server)."""
        return {name: proc.pid for name, proc in self.stack.processes
                if name in embedded.AIRFLOW_COMPONENTS and proc.poll() is None}


def _find_run(api: AirflowApi, dag_id: str, run_id: str) -> dict | None:
    return next((r for r in api.runs(dag_id) if r["dag_run_id"] == run_id), None)


def write_config(root: Path, changes: dict) -> Path:
    """A pipelines folder with the demo config, top-level keys replaced by ``changes``."""
    import yaml

    folder = root / "pipelines"
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(DEMO_CONFIG.read_text()) | changes
    (folder / DEMO_CONFIG.name).write_text(dump_config(config))
    return folder


@contextmanager
def embedded_stack(bucket: str = "deployline-bench", airflow_defaults: bool = False,
                   overrides: dict[str, str] | None = None, config_changes: dict | None = None,
                   database: str = "postgres", celery: bool = False,
                   pipelines_dir: Path | None = None) -> Iterator[Bench]:
    """moto, the seeded repository, the database and Airflow's components, as ``make demo`` starts them.

    ``airflow_defaults``: without Deployline's tuning; ``overrides``: further Airflow settings;
    ``config_changes``: top-level keys of the demo pipeline config replaced (else the demo config);
    ``database``: ``postgres`` (the default) or ``sqlite`` (the old default, for comparison);
    ``celery``: the Celery cluster of ``make test-distributed`` instead (PostgreSQL, Redis, two
    workers); ``pipelines_dir``: a folder of pipeline configs of the caller's own.
    A component that exits fails every wait at once (``Stack.watch``).
    """
    # Stopped from outside: still run the finally below, so nothing is left running.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    stack = embedded.Stack()
    with tempfile.TemporaryDirectory(prefix="deployline-bench-") as tmp:
        root = Path(tmp)
        home = root / "airflow"
        environment_hosts = [home]  # where the local environments' state is (stopped at the end)
        try:
            logs = root / "logs"
            moto = embedded.start_moto(stack, embedded.free_port(), logs / "moto.log")
            embedded.ensure_bucket(moto, bucket)
            bare, clone = root / "repo.git", root / "clone"
            seed = embedded.seed_repository(bare, clone)
            extra = {"DEPLOYLINE_DEMO_REPO": str(bare), "DEPLOYLINE_ARTIFACT_BUCKET": bucket}
            if config_changes:
                extra["DEPLOYLINE_PIPELINES_DIR"] = str(write_config(root, config_changes))
            if pipelines_dir:
                extra["DEPLOYLINE_PIPELINES_DIR"] = str(pipelines_dir)
            if celery:
                from deployline import embedded_cluster

                started = time.time()
                cluster = embedded_cluster.start_cluster(stack, root, moto, logs, extra=extra | (overrides or {}))
                base, env, database = cluster.base, cluster.env, "postgres+celery"
                environment_hosts = [w.home for w in cluster.workers]
            else:
                if database == "sqlite":
                    extra[embedded.DATABASE_URL] = f"sqlite:///{root / 'airflow.db'}"
                else:
                    extra |= embedded.start_database(stack, root / "postgres", logs)
                env = embedded.airflow_env(home, embedded.free_port(), moto, extra)
                env = tuned_env(env, airflow_defaults, overrides)
                started = time.time()
                base = embedded.start_airflow(stack, env, logs)
            print(f"airflow settings: {tuning_of(env)}", file=sys.stderr)
            healthy = time.time() - started
            stack.watch(restart=False)
            print(f"airflow on {database} healthy in {healthy:.1f}s (load {loadavg()})", file=sys.stderr)
            api = AirflowApi(base, "admin", embedded.password(home))
            yield Bench(root, stack, moto, bare, clone, seed, home, base, api, env, started, healthy, database)
        finally:
            stack.stop()
            for host in environment_hosts:
                try:
                    embedded.stop_environments(host)
                except Exception as exc:  # never hide the benchmark's own error
                    print(f"stopping the environments failed: {exc}", file=sys.stderr)
            if os.environ.get("DEPLOYLINE_BENCH_KEEP_LOGS"):
                keep = Path(os.environ["DEPLOYLINE_BENCH_KEEP_LOGS"])
                keep.mkdir(parents=True, exist_ok=True)
                if (root / "logs").exists():  # each component's log
                    shutil.copytree(root / "logs", keep, dirs_exist_ok=True)
                if (home / "logs").exists():  # the task and trigger logs
                    shutil.copytree(home / "logs", keep / "task-logs", dirs_exist_ok=True)
            signal.signal(signal.SIGTERM, previous)
