import logging
import os

import pytest
from deployline.commands import CommandFailed, run_command


def test_output_is_streamed_to_the_log(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tail = run_command("echo one; echo two >&2; echo $GREETING", tmp_path, 10, env={"GREETING": "hi"},
                       logger=logging.getLogger("t"))
    assert tail == ["one", "two", "hi"]
    assert "two" in caplog.messages and "hi" in caplog.messages


def test_non_zero_exit_names_the_command_and_its_output(tmp_path):
    with pytest.raises(CommandFailed) as err:
        run_command("echo building; echo 'error: bad thing'; exit 3", tmp_path, 10)
    message = str(err.value)
    assert "exited with code 3" in message
    assert "error: bad thing" in message
    assert err.value.command.startswith("echo building")


def test_a_missing_tool_says_so(tmp_path):
    with pytest.raises(CommandFailed, match=r"(?s)exited with code 127 \(command not found.*no-such-build-tool"):
        run_command("no-such-build-tool --release", tmp_path, 10)


def test_timeout_kills_the_command_and_its_children(tmp_path):
    marker = tmp_path / "finished"
    with pytest.raises(CommandFailed, match="timed out after 1s"):
        run_command(f"echo started; (sleep 30; touch {marker}) & sleep 30", tmp_path, 1)
    assert not marker.exists()


def test_pipefail_catches_failures_inside_pipelines(tmp_path):
    with pytest.raises(CommandFailed, match="exited with code 1"):
        run_command("false | cat", tmp_path, 10)


def test_missing_working_folder(tmp_path):
    with pytest.raises(CommandFailed, match="working folder .*nope does not exist"):
        run_command("true", tmp_path / "nope", 10)


def test_a_failing_command_is_final_for_airflow(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException):  # no retry: a failing build fails again
        run_command("exit 3", tmp_path, 10)


def test_a_retry_stops_what_a_killed_try_left_running(tmp_path, monkeypatch, caplog):
    """The task running a command is killed (SIGKILL, no cleanup): the command's group lives on
    until the retry of the same command in the same folder stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    monkeypatch.setenv("DEPLOYLINE_WORK_DIR", str(tmp_path / "work"))
    command = "sleep ${NAP:-60}"
    task = subprocess.Popen([sys.executable, "-c", "import sys; from deployline.commands import run_command; "
                             "run_command(sys.argv[1], sys.argv[2], 120)", command, str(tmp_path)],
                            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    markers = tmp_path / "work" / "commands"
    deadline = time.monotonic() + 30
    while not list(markers.glob("*.pgid")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (marker,) = markers.glob("*.pgid")
    group = int(marker.read_text().split()[0])
    task.send_signal(signal.SIGKILL)
    task.wait()
    assert psutil.pid_exists(group)  # the killed try's command is still running

    caplog.set_level(logging.WARNING)
    run_command(command, tmp_path, 10, env={"NAP": "0"})
    assert f"stopped process group {group}, left running by an earlier try of this command" in caplog.messages
    deadline = time.monotonic() + 5
    while psutil.pid_exists(group) and psutil.Process(group).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(group) or psutil.Process(group).status() == psutil.STATUS_ZOMBIE
    assert not list(markers.glob("*.pgid"))  # nothing noted once the command has finished


def test_a_command_sees_none_of_the_workers_secrets(tmp_path, monkeypatch):
    # A commit's build must not read Airflow's database or connections, nor the AWS keys.
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow:s3cret@db/airflow")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", "aws://AKIA:s3cret@")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    tail = run_command("env | sort | base64 -w0; echo", tmp_path, 10, env={"DEPLOYLINE_VERSION": "r1-abc"})
    import base64

    seen = dict(line.split("=", 1) for line in base64.b64decode(tail[-1]).decode().splitlines() if "=" in line)
    assert "s3cret" not in base64.b64decode(tail[-1]).decode()
    assert not [k for k in seen if k.startswith(("AIRFLOW", "AWS_"))], sorted(seen)
    assert seen["DEPLOYLINE_VERSION"] == "r1-abc" and seen["PATH"]
    assert seen["HOME"] == seen["TMPDIR"] and seen["HOME"] != os.environ.get("HOME")


def test_a_command_is_stopped_when_asked_with_the_reason(tmp_path):
    """The load tests stop once the release was rejected (the other branch of the fan-in)."""
    import time

    from deployline.commands import CommandStopped

    looks = []

    def rejected_on_the_second_look():
        looks.append(time.monotonic())
        return "exploratory approval rejected by erin" if len(looks) >= 2 else None

    started = time.monotonic()
    with pytest.raises(CommandStopped) as stopped:
        run_command("echo started; sleep 120 & wait", tmp_path, timeout=300, stop_when=rejected_on_the_second_look,
                    stop_check_seconds=0.2)
    assert time.monotonic() - started < 60  # not the 120 s of the command
    assert "was stopped: exploratory approval rejected by erin" in str(stopped.value)
    assert stopped.value.tail == ["started"]


def test_a_failing_look_does_not_stop_the_command(tmp_path):
    def broken():
        raise ConnectionError("S3 is away")

    assert run_command("sleep 1; echo done", tmp_path, timeout=60, stop_when=broken,
                       stop_check_seconds=0.2) == ["done"]


def test_trusted_tools_get_an_allow_listed_environment_too(monkeypatch):
    """git and moto are Deployline's own tools, yet they need none of the worker's secrets."""
    from deployline.commands import tool_environment

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://u:p@db/airflow")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    env = tool_environment({"GIT_TERMINAL_PROMPT": "0"}, prefixes=("MOTO_",))
    assert "AWS_SECRET_ACCESS_KEY" not in env and not [k for k in env if k.startswith("AIRFLOW")]
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and env["MOTO_EC2_LOAD_DEFAULT_AMIS"] == "false"
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["PATH"]
    assert "MOTO_EC2_LOAD_DEFAULT_AMIS" not in tool_environment()


def test_git_sees_none_of_the_workers_secrets(tmp_path, monkeypatch):
    from deployline.sources import GitSource

    monkeypatch.setenv("DEPLOYLINE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    # A shell alias prints what git and whatever it runs (hooks, helpers) see.
    seen = GitSource(str(tmp_path), "main")._git("-c", "alias.showenv=!env", "showenv")
    assert "PATH=" in seen and "worker-secret" not in seen and "AWS_SECRET_ACCESS_KEY" not in seen
