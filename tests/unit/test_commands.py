import logging

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
