"""One moto, one PostgreSQL and one real Airflow (scheduler, API server, DAG processor, triggerer)
per session.

Tests act as a user does: they push commits to the git repository, use the REST API,
and look at AWS state through the AWS API.  Each component's log is kept in test-artifacts/e2e/.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess

import boto3
import pytest
import yaml
from deployline import embedded
from deployline.airflow_api import AirflowApi
from deployline.config import dump_config
from deployline.moto_server import close_gaps
from harness import APP, ARTIFACTS, BUCKET, E2E, GIT_CONN, ROOT, SECRETS, STRICT_APP
from moto.server import ThreadedMotoServer

# moto's request log would drown the test output.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def pytest_collection_modifyitems(items):
    """Checks of what the whole suite left behind run after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("after_the_suite") is not None)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    # Stopped from outside (CI's time limit, kill): the finally below still stops the stack,
    # whose processes are in sessions of their own and would outlive pytest.
    signal.signal(signal.SIGTERM, _interrupt)
    root = tmp_path_factory.mktemp("e2e")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    close_gaps()  # as on AWS: atomic conditional writes, versioned template buckets (moto_server)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=embedded.free_port(), verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto._server.server_port}"
    stack = embedded.Stack()
    try:
        embedded.ensure_bucket(endpoint, BUCKET)
        bare, clone = root / "repos" / "sample-service.git", root / "clone"
        seed = embedded.seed_repository(bare, clone)

        pipelines = root / "pipelines"
        pipelines.mkdir()
        config = yaml.safe_load((ROOT / "include" / "pipelines" / f"{APP}.yaml").read_text())
        config["repository"]["conn_id"] = GIT_CONN  # its token must never show up (test_security)
        # Poll continuously in short pokes, so a push is seen within seconds.
        config["polling"] = {"schedule": "* * * * *", "poke_interval": 3, "timeout": 55}
        # Approvals time out after 3 minutes, so that "no decision is a rejection" can be seen.
        config["approvals"] = {"exploratory": {"mode": "hitl", "timeout_hours": 0.05},
                               "production": {"mode": "hitl", "timeout_hours": 0.05}}
        # Load tests short and light (the machine also runs Airflow); deploys with short drain and watch.
        loose = {"p95_ms": 2000, "p99_ms": 5000, "max_error_rate": 0.01, "min_rps": 5}
        config["capacity"] = {"locustfile": "tests/load/locustfile.py",
                              "expected": {"users": 2, "spawn_rate": 2, "duration_seconds": 3, "thresholds": loose},
                              "peak": {"users": 4, "spawn_rate": 4, "duration_seconds": 3, "thresholds": loose}}
        config["production"] = {"drain_seconds": 1, "verify_seconds": 8, "check_interval": 0.5}
        # The tests' admin launches self-service environments for alice, bob...; others may not.
        config["self_service"] = dict(config.get("self_service") or {}, admins=["admin"])
        (pipelines / f"{APP}.yaml").write_text(dump_config(config))
        # The same service with a throughput threshold no machine meets; triggered by hand only.
        strict = dict(config, application=STRICT_APP, polling={"schedule": None},
                      approvals={"exploratory": {"timeout_hours": 1}, "production": {"timeout_hours": 1}})
        strict["capacity"] = dict(config["capacity"], expected={
            "users": 2, "spawn_rate": 2, "duration_seconds": 3, "thresholds": dict(loose, min_rps=1_000_000)})
        (pipelines / f"{STRICT_APP}.yaml").write_text(dump_config(strict))

        home = root / "airflow"
        database = embedded.start_database(stack, root / "postgres", ARTIFACTS)
        env = embedded.airflow_env(home, embedded.free_port(), endpoint, database | {
            "DEPLOYLINE_PIPELINES_DIR": str(pipelines),
            "DEPLOYLINE_DEMO_REPO": str(bare),
            "DEPLOYLINE_ARTIFACT_BUCKET": BUCKET,
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                json.loads(embedded.aws_connection_uri(endpoint)) | {"password": SECRETS["aws secret key"]}),
            f"AIRFLOW_CONN_{GIT_CONN.upper()}": json.dumps(
                {"conn_type": "generic", "login": "ci-bot", "password": SECRETS["git token"]}),
        })
        base = embedded.start_airflow(stack, env, ARTIFACTS)
        # A component that exits fails the session's waits at once, with its name and last log
        # lines, instead of every later test waiting for runs that will never start.
        stack.watch(restart=False)
        api = AirflowApi(base, "admin", embedded.password(home))
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=embedded.REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        session = E2E(api, s3, clone, bare, home, seed, stack, database[embedded.DATABASE_URL])
        # Every module starts from the first release: its candidate exists before any test pushes.
        session.candidate_run(seed)
        yield session
    finally:
        stack.stop(grace=5)  # the tests are over: no need to wait for a graceful shutdown
        embedded.stop_environments(root / "airflow")  # pre-production, production, its address
        moto.stop()
        logs = root / "airflow" / "logs"
        if logs.exists():
            subprocess.run(["cp", "-r", str(logs), str(ARTIFACTS / "task-logs")], check=False)
