"""Secrets stay in Airflow connections: none shows up in a task log, an XCom or the registry."""

import ast
import base64

import pytest
from harness import BUCKET, SECRETS

pytestmark = [pytest.mark.e2e, pytest.mark.after_the_suite]  # every other test has run: all logs exist


def forms(secret: str) -> list[str]:
    """The secret and the encodings it travels in (git's Basic authorization header), and hex (what a
    build that dumps its environment writes)."""
    return [secret, base64.b64encode(f"ci-bot:{secret}".encode()).decode(), secret.encode().hex()]


def test_a_build_that_dumps_its_environment_finds_no_secret(e2e):
    """A commit's build.py printed its environment, hex-encoded (test_commit_to_artifact)."""
    dumps = []
    for path in (e2e.home / "logs").rglob("*"):
        if path.is_file() and "task_id=2-commit.build" in str(path):
            for line in path.read_text(errors="replace").splitlines():
                if "environment (hex): " in line:
                    dumps.append(bytes.fromhex(line.split("environment (hex): ")[1].split('"')[0].split()[0]).decode())
    assert dumps, "no build dumped its environment: the check below would prove nothing"
    for dump in dumps:
        names = [name for name, _ in ast.literal_eval(dump)]
        leaked = [n for n in names if n.startswith(("AIRFLOW", "AWS_", "_AIRFLOW")) or "SECRET" in n or "PASSWORD" in n]
        assert not leaked and "DEPLOYLINE_VERSION" in names, names
        assert not any(value in dump for values in map(forms, SECRETS.values()) for value in values)


def test_connection_secrets_never_leak(e2e):
    # Every run of the session so far used both: the repository's connection on every git call
    # (poll, resolve, checkout) and aws_default on every AWS call.
    wanted = {name: forms(secret) for name, secret in SECRETS.items()}
    found = []

    logs = [p for p in (e2e.home / "logs").rglob("*") if p.is_file()]
    for path in logs:
        text = path.read_text(errors="replace")
        found += [(name, str(path)) for name, values in wanted.items() if any(v in text for v in values)]

    from sqlalchemy import create_engine, text

    engine = create_engine(e2e.database_url)
    try:
        with engine.connect() as db:
            xcoms = db.execute(text("SELECT dag_id, run_id, task_id, key, value::text FROM xcom")).fetchall()
    finally:
        engine.dispose()
    for dag_id, run_id, task_id, key, value in xcoms:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        found += [(name, f"xcom {dag_id}/{run_id}/{task_id}/{key}") for name, values in wanted.items()
                  if any(v in text for v in values)]

    records = 0
    for page in e2e.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            if not item["Key"].endswith((".json", ".csv", ".html", ".txt", ".log")):
                continue  # artifacts (tarballs) are built from the repository, which holds no secret
            records += 1
            body = e2e.s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read().decode(errors="replace")
            found += [(name, f"s3://{BUCKET}/{item['Key']}") for name, values in wanted.items()
                      if any(v in body for v in values)]

    # The scan really read something: task logs of several DAGs, XComs and release records.
    assert len(logs) > 20 and len(xcoms) > 20 and records > 3, (len(logs), len(xcoms), records)
    assert found == [], found


def test_nothing_the_stack_started_listens_beyond_loopback(e2e):
    """Issue 18: Airflow's log servers listened on every interface (0.0.0.0:8793/8794), whatever
    the demo's port settings. The embedded stack starts none; everything else binds loopback."""
    import psutil

    listening = []
    for _name, process in e2e.stack.processes:
        try:
            family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in family:
            try:
                sockets = member.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            listening += [(member.pid, " ".join(member.cmdline()[:3]), s.laddr.ip, s.laddr.port)
                          for s in sockets if s.status == psutil.CONN_LISTEN]
    assert listening, "no listening socket found: the check would prove nothing"
    assert [entry for entry in listening if entry[2] not in ("127.0.0.1", "::1")] == []


def test_task_logs_start_without_the_gitwildmatch_deprecation(e2e):
    """Issue 18: every task log began with pathspec's GitWildMatchPattern DeprecationWarning (from
    Airflow's .airflowignore matching); deploy/airflow.env and the embedded stack hide that one."""
    logs = [p for p in (e2e.home / "logs").rglob("*.log") if "dag_id=" in str(p)]
    assert logs
    assert [str(p) for p in logs if "GitWildMatchPattern" in p.read_text(errors="replace")][:3] == []
