"""One Celery cluster per session, as docker-compose.yaml runs it but as plain processes:
PostgreSQL, Redis, API server, scheduler, DAG processor, triggerer and two Celery workers that share
nothing but the database, the broker, git and S3 (``deployline.embedded_cluster``); moto for AWS
and a local bare repository. Each component's log is kept in test-artifacts/distributed/.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the user's actions: harness.E2E

from deployline import embedded, embedded_cluster  # noqa: E402
from deployline.airflow_api import AirflowApi  # noqa: E402
from deployline.config import dump_config  # noqa: E402
from harness import APP, E2E  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts" / "distributed"
BUCKET = "deployline-distributed"


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    signal.signal(signal.SIGTERM, _interrupt)  # the finally below must run: our processes are in their own sessions
    root = tmp_path_factory.mktemp("cluster")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    stack = embedded.Stack()
    workers: list = []
    try:
        moto = embedded.start_moto(stack, embedded.free_port(), ARTIFACTS / "moto.log")
        embedded.ensure_bucket(moto, BUCKET)
        bare, clone = root / "repos" / "sample-service.git", root / "clone"
        seed = embedded.seed_repository(bare, clone)
        pipelines = root / "pipelines"
        pipelines.mkdir()
        config = yaml.safe_load((ROOT / "include" / "pipelines" / f"{APP}.yaml").read_text())
        config["polling"] = {"schedule": "* * * * *", "poke_interval": 3, "timeout": 55}
        loose = {"p95_ms": 2000, "p99_ms": 5000, "max_error_rate": 0.01, "min_rps": 5}
        config["capacity"] = {"locustfile": "tests/load/locustfile.py",
                              "expected": {"users": 2, "spawn_rate": 2, "duration_seconds": 3, "thresholds": loose},
                              "peak": {"users": 4, "spawn_rate": 4, "duration_seconds": 3, "thresholds": loose}}
        config["production"] = {"drain_seconds": 1, "verify_seconds": 5, "check_interval": 0.5}
        (pipelines / f"{APP}.yaml").write_text(dump_config(config))
        found = embedded_cluster.start_cluster(stack, root, moto, ARTIFACTS, extra={
            "DEPLOYLINE_PIPELINES_DIR": str(pipelines), "DEPLOYLINE_DEMO_REPO": str(bare),
            "DEPLOYLINE_ARTIFACT_BUCKET": BUCKET})
        workers = found.workers
        # Like Compose's `restart: always`: a component that dies is reported and started again.
        stack.watch(restart=True)
        home = root / "airflow"
        api = AirflowApi(found.base, "admin", embedded.password(home))
        import boto3

        s3 = boto3.client("s3", endpoint_url=moto, region_name=embedded.REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        # The environments live on worker 1 (the local driver's queue): its work dir holds them.
        session = E2E(api, s3, clone, bare, home, seed, stack, found.env[embedded.DATABASE_URL],
                      work_dir=workers[0].work_dir, bucket=BUCKET)
        session.cluster = found
        yield session
    finally:
        stack.stop(grace=10)
        for worker in workers:  # pre-production, production and its address outlive their tasks
            embedded.stop_environments(worker.home)
        for worker in workers:
            if (worker.home / "airflow" / "logs").exists():
                shutil.copytree(worker.home / "airflow" / "logs", ARTIFACTS / f"{worker.name}-task-logs",
                                dirs_exist_ok=True)
