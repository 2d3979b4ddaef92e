"""The embedded stack's supervision and its PostgreSQL: real processes, a real server.

A component that exits is reported by name with its exit code and the last lines of its log;
``make demo`` restarts it (a few times), the end-to-end tests fail at once instead of waiting for
runs that no scheduler starts (issue 16). ``stop()`` leaves nothing running.
"""

import os
import signal
import sys
import time

import psutil
import pytest
from deployline import embedded, postgres

SLEEPER = [sys.executable, "-c", "import time; print('component up', flush=True); time.sleep(600)"]

WITH_A_CHILD = [sys.executable, "-c", f"import subprocess, time; subprocess.Popen({SLEEPER!r}); time.sleep(600)"]


def crasher(code: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; print('about to fail: bad setting', flush=True); sys.exit({code})"]


def wait_for(check, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_an_exited_component_fails_every_wait_at_once_with_its_name_code_and_log(tmp_path):
    stack = embedded.Stack(report=lambda message: None)
    try:
        stack.start("sleeper", SLEEPER, dict(os.environ), tmp_path / "sleeper.log")
        stack.start("scheduler", crasher(3), dict(os.environ), tmp_path / "scheduler.log")
        stack.watch(restart=False, interval=0.1)
        started = time.monotonic()
        with pytest.raises(embedded.StackError) as failed:
            embedded.wait_until(lambda: False, 120, "a run that no scheduler will start", interval=0.1)
        assert time.monotonic() - started < 60  # not the wait's own timeout
        message = str(failed.value)
        assert "scheduler (pid" in message and "exited with code 3" in message
        assert "about to fail: bad setting" in message and str(tmp_path / "scheduler.log") in message
        assert stack.component("sleeper").proc.poll() is None  # the others are left to stop()
    finally:
        stack.stop(grace=5)
    assert embedded._WATCHED == []
    embedded.wait_until(lambda: True, 1, "nothing")  # a stopped stack fails no later wait


def test_the_demo_restarts_a_killed_component_and_gives_up_on_one_that_keeps_exiting(tmp_path):
    reports = []
    stack = embedded.Stack(report=reports.append)
    try:
        first = stack.start("scheduler", WITH_A_CHILD, dict(os.environ), tmp_path / "scheduler.log")
        assert wait_for(lambda: psutil.Process(first.pid).children())
        executor = psutil.Process(first.pid).children()[0].pid  # as LocalExecutor's workers are
        stack.start("triggerer", crasher(1), dict(os.environ), tmp_path / "triggerer.log")
        stack.watch(restart=True, interval=0.1)
        os.kill(first.pid, signal.SIGKILL)
        assert wait_for(lambda: stack.component("scheduler").proc.pid != first.pid)
        assert wait_for(lambda: stack.component("scheduler").proc.poll() is None)
        # What the dead one started is gone too: a restarted scheduler has workers of its own.
        assert wait_for(lambda: not psutil.pid_exists(executor) or psutil.Process(executor).status() == "zombie")
        assert any("scheduler (pid" in r and "code -9" in r and "restarted scheduler" in r for r in reports)
        # The triggerer exits every time: restarted MAX_RESTARTS times, then the stack has failed.
        assert wait_for(lambda: stack.failure is not None, 60)
        assert stack.component("triggerer").restarts == embedded.Stack.MAX_RESTARTS
        assert "triggerer" in str(stack.failure) and "keeps exiting" in str(stack.failure)
        assert stack.component("scheduler").proc.poll() is None
    finally:
        stack.stop(grace=5)


def test_stop_ends_each_component_and_what_it_started(tmp_path):
    stack = embedded.Stack()
    parent = stack.start("worker", WITH_A_CHILD, dict(os.environ), tmp_path / "worker.log")
    assert wait_for(lambda: psutil.Process(parent.pid).children())
    child = psutil.Process(parent.pid).children()[0].pid
    stack.stop(grace=5)
    assert not psutil.pid_exists(parent.pid)
    assert wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie", 10)


def test_start_database_runs_postgresql_of_its_own_and_removes_it_on_stop(tmp_path):
    import sqlalchemy

    stack = embedded.Stack()
    try:
        settings = embedded.start_database(stack, tmp_path / "postgres", tmp_path / "logs")
        url = settings[embedded.DATABASE_URL]
        assert url.startswith("postgresql+psycopg2://postgres:") and "@127.0.0.1:" in url
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            version = conn.execute(sqlalchemy.text("SHOW server_version")).scalar()
            user = conn.execute(sqlalchemy.text("SELECT current_database()")).scalar()
        engine.dispose()
        assert version.startswith(str(postgres.VERSION)) and user == "airflow"
        server = psutil.Process(stack.pid("postgres"))
        assert server.username() != "root"  # PostgreSQL refuses root; as root we run it as nobody
        # A wrong password is refused: only the stack knows the superuser's.
        wrong = sqlalchemy.create_engine(url.replace(url.split(":")[2].split("@")[0], "wrong"))
        with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
            wrong.connect()
        wrong.dispose()
        folder = stack.component("postgres").argv[2]  # -D <data>
    finally:
        stack.stop(grace=10)
    assert not os.path.exists(folder)
    assert "database system is shut down" in (tmp_path / "logs" / "postgres.log").read_text()


def test_the_callers_own_database_is_used_and_sqlite_only_that_way(tmp_path, monkeypatch):
    stack = embedded.Stack()
    monkeypatch.setenv(embedded.DATABASE_URL, f"sqlite:///{tmp_path / 'airflow.db'}")
    settings = embedded.start_database(stack, tmp_path / "postgres", tmp_path / "logs")
    assert stack.components == [] and not (tmp_path / "postgres").exists()
    env = embedded.airflow_env(tmp_path / "airflow", 8080, "http://127.0.0.1:5000", settings)
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] == "deployline.embedded.SQLITE_CONNECT_ARGS"
    monkeypatch.delenv(embedded.DATABASE_URL)
    env = embedded.airflow_env(tmp_path / "airflow", 8080, "http://127.0.0.1:5000",
                               {embedded.DATABASE_URL: "postgresql+psycopg2://u:p@127.0.0.1:1/airflow"})
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in env  # SQLite's timeout means nothing to psycopg2
    with pytest.raises(embedded.StackError, match="no metadata database"):
        embedded.start_airflow(stack, {"AIRFLOW__API__PORT": str(embedded.free_port())}, tmp_path / "logs")


def test_a_component_that_exits_while_starting_fails_the_start_at_once(tmp_path):
    stack = embedded.Stack()
    try:
        stack.start("api-server", crasher(2), dict(os.environ), tmp_path / "api-server.log")
        started = time.monotonic()

        def healthy():
            stack.check_alive()
            return False

        with pytest.raises(embedded.StackError, match="api-server .* exited with code 2"):
            embedded.wait_until(healthy, 120, "the API server", interval=0.1)
        assert time.monotonic() - started < 60
    finally:
        stack.stop(grace=5)


def test_commits_made_in_the_demo_clone_carry_the_demos_identity(tmp_path, monkeypatch):
    """Not the machine's git config: a person trying the demo commits in the clone by hand."""
    import subprocess

    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var, raising=False)
    global_config = tmp_path / "gitconfig"
    global_config.write_text("[user]\n\tname = Machine Owner\n\temail = owner@machine.invalid\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(global_config))
    clone = tmp_path / "clone"
    embedded.seed_repository(tmp_path / "demo.git", clone)
    (clone / "NOTES.md").write_text("by hand\n")
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "commit", "--quiet", "-m", "by hand"], cwd=clone, check=True)
    author = subprocess.run(["git", "log", "-2", "--format=%an <%ae>"], cwd=clone, check=True, capture_output=True,
                            text=True).stdout.split("\n")
    assert author[:2] == ["Deployline Demo <demo@deployline.invalid>"] * 2


def test_the_embedded_moto_makes_the_artifact_store_stacks_bucket_versioned(tmp_path):
    """moto's CloudFormation ignores VersioningConfiguration; publishing needs a versioned bucket,
    so the demo (stage 0 makes the bucket) failed at publish_artifact until moto_server applied it."""
    import boto3

    stack = embedded.Stack()
    try:
        endpoint = embedded.start_moto(stack, embedded.free_port(), tmp_path / "moto.log")
        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": embedded.REGION}
        cloudformation = boto3.client("cloudformation", endpoint_url=endpoint, **keys)
        template = embedded.PROJECT_ROOT / "include/cloudformation/artifact-store.yaml"
        cloudformation.create_stack(
            StackName="store", TemplateBody=template.read_text(),
            Parameters=[{"ParameterKey": "BucketName", "ParameterValue": "versioned-by-template"}])
        s3 = boto3.client("s3", endpoint_url=endpoint, **keys)
        assert s3.get_bucket_versioning(Bucket="versioned-by-template").get("Status") == "Enabled"
    finally:
        stack.stop(grace=5)


def test_scripts_stop_the_demo_through_its_pid_file(tmp_path):
    """make passes SIGTERM on but not SIGINT (issue 18: `kill -INT` on `make demo` did nothing), so
    the demo writes its own pid: SIGINT to it stops everything it started, as Ctrl-C does."""
    import subprocess

    moto_port, api_port = embedded.free_port(), embedded.free_port()
    env = dict(os.environ, PYTHONPATH=str(embedded.PROJECT_ROOT / "plugins"))
    demo = subprocess.Popen([sys.executable, "-m", "deployline", "demo", "--state-dir", str(tmp_path / "demo"),
                             "--moto-port", str(moto_port), "--api-port", str(api_port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    pid_file = tmp_path / "demo" / "demo.pid"
    try:
        assert wait_for(lambda: pid_file.exists() and not embedded.port_is_free(moto_port), 120), "moto never came up"
        assert int(pid_file.read_text()) == demo.pid
        started = [p.pid for p in psutil.Process(demo.pid).children(recursive=True)]
        assert started  # moto at least
        os.kill(int(pid_file.read_text()), signal.SIGINT)
        output, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 0, output
    assert "stopping ..." in output and "stopped: moto and airflow are down" in output
    assert not pid_file.exists()
    assert [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"] == []
    assert embedded.port_is_free(moto_port)
