"""SsmCommandDoneTrigger / ProvisionInstanceOperator against a moto server running in this process.

moto's send_command never runs the script and creates every invocation ``Success``; the server
shares this process's moto backend, so a test holds an invocation ``InProgress`` and then lets it
succeed or fail (status, exit code, stderr) while the trigger runs.
"""

from __future__ import annotations

import asyncio
import json
import time

import boto3
import pytest
from airflow.sdk.exceptions import TaskDeferred
from deployline import images
from deployline.images import ImageError
from deployline.ssm_commands import (
    WAITERS_FILE,
    DeploylineSsmHook,
    ProvisionInstanceOperator,
    SsmCommandDoneTrigger,
)
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ssm.models import ssm_backends

REGION = "us-east-1"
INSTANCE = "i-0123456789abcdef0"
STDERR = "x" * 5000 + "\nyum: no such package: nginx-extras"


@pytest.fixture
def ssm(moto_endpoint, monkeypatch):
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    connection = {"conn_type": "aws", "login": "testing", "password": "testing",
                  "extra": {"endpoint_url": moto_endpoint, "region_name": REGION}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    return boto3.client("ssm", region_name=REGION, endpoint_url=moto_endpoint)


def invocation(command_id: str) -> dict:
    """moto's invocation of the command on INSTANCE (what GetCommandInvocation answers)."""
    command = ssm_backends[DEFAULT_ACCOUNT_ID][REGION].get_command_by_id(command_id)
    return next(i for i in command.invocations if i["InstanceId"] == INSTANCE)


@pytest.fixture
def command(ssm):
    """A command sent to INSTANCE, its invocation held ``InProgress``; yields (id, moto's invocation)."""
    command_id = ssm.send_command(InstanceIds=[INSTANCE], DocumentName="AWS-RunShellScript",
                                  Parameters={"commands": ["echo hi"]})["Command"]["CommandId"]
    found = invocation(command_id)
    found["Status"] = found["StatusDetails"] = "InProgress"
    return command_id, found


def fail(found: dict, status: str = "Failed") -> None:
    found.update({"Status": status, "StatusDetails": status, "ResponseCode": 3, "StandardErrorContent": STDERR,
                  "StandardOutputContent": "step 1\nstep 2\n"})


def run_until(trigger, change, quiet: float = 2.5):
    async def scenario():
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        done, _ = await asyncio.wait([first], timeout=quiet)
        assert not done, f"fired while the command was in progress: {first.result() if done else None}"
        change()
        changed = time.monotonic()
        event = await asyncio.wait_for(first, timeout=5)
        await events.aclose()
        return event.payload, time.monotonic() - changed

    return asyncio.run(scenario())


def test_the_waiter_fails_on_every_terminal_status_but_success(ssm):
    hook = DeploylineSsmHook()
    assert hook.waiter_path == WAITERS_FILE and "command_done" in hook.list_waiters()
    acceptors = json.loads(WAITERS_FILE.read_text())["waiters"]["command_done"]["acceptors"]
    assert {a["state"] for a in acceptors} == {"success", "failure", "retry"}


def test_trigger_serialize_round_trips():
    trigger = SsmCommandDoneTrigger(command_id="c-1", instance_id=INSTANCE, waiter_delay=7, waiter_max_attempts=9)
    classpath, kwargs = trigger.serialize()
    assert classpath == "deployline.ssm_commands.SsmCommandDoneTrigger"
    assert kwargs == {"command_id": "c-1", "instance_id": INSTANCE, "waiter_delay": 7, "waiter_max_attempts": 9,
                      "aws_conn_id": "aws_default"}
    assert SsmCommandDoneTrigger(**kwargs).serialize() == (classpath, kwargs)
    assert isinstance(trigger.hook(), DeploylineSsmHook)


def test_trigger_waits_while_the_command_runs_then_succeeds(command):
    command_id, found = command
    trigger = SsmCommandDoneTrigger(command_id=command_id, instance_id=INSTANCE, waiter_delay=1,
                                    waiter_max_attempts=30)
    event, _ = run_until(trigger, lambda: found.update(Status="Success", StatusDetails="Success"))
    assert event == {"status": "success", "command_id": command_id, "instance_id": INSTANCE}


@pytest.mark.parametrize("status", ["Failed", "TimedOut", "Cancelled", "Undeliverable"])
def test_trigger_fails_at_once_with_status_exit_code_and_stderr(command, status):
    command_id, found = command
    trigger = SsmCommandDoneTrigger(command_id=command_id, instance_id=INSTANCE, waiter_delay=1,
                                    waiter_max_attempts=100)
    event, after = run_until(trigger, lambda: fail(found, status))
    assert after < 2.5
    assert event["status"] == "error" and event["command_status"] == status and event["exit_code"] == 3
    message = event["message"]
    assert message.startswith(f"provisioning {INSTANCE}: command {command_id} ended {status} ({status}, exit code 3)")
    assert message.endswith("yum: no such package: nginx-extras") and len(message) < 2500


def test_trigger_gives_up_after_its_attempts(command):
    command_id, _ = command
    trigger = SsmCommandDoneTrigger(command_id=command_id, instance_id=INSTANCE, waiter_delay=1,
                                    waiter_max_attempts=2)

    async def first():
        events = trigger.run()
        try:
            return (await asyncio.wait_for(events.__anext__(), timeout=10)).payload
        finally:
            await events.aclose()

    event = asyncio.run(first())
    assert event["status"] == "error" and event["message"].endswith(f"{command_id} still InProgress after 2s")


# --------------------------------------------------------------------------- operator


def operator(**kwargs):
    return ProvisionInstanceOperator(task_id="provision", instance_id=INSTANCE, script=lambda: ("echo hi", "test"),
                                     timeout=60, delivery_timeout=30, poll_interval=5, **kwargs)


def test_a_command_over_at_the_first_look_is_not_deferred(ssm):
    # moto's commands end at once: no deferral, whose trigger would fire at once and race the
    # scheduler (apache/airflow#71172).
    command_id = operator().execute({})
    assert ssm.list_commands(CommandId=command_id)["Commands"][0]["DocumentName"] == "AWS-RunShellScript"


def test_the_operator_sends_then_defers(ssm, monkeypatch):
    monkeypatch.setattr(images, "command_invocation", lambda *args: {"Status": "InProgress"})
    with pytest.raises(TaskDeferred) as deferred:
        operator().execute({})
    command_id = deferred.value.kwargs["command_id"]
    sent = ssm.list_commands(CommandId=command_id)["Commands"][0]
    assert sent["DocumentName"] == "AWS-RunShellScript" and sent["Comment"] == "test"
    assert "echo hi" in sent["Parameters"]["commands"] and sent["Parameters"]["executionTimeout"] == ["60"]
    assert deferred.value.method_name == "execute_complete"
    _, kwargs = deferred.value.trigger.serialize()
    assert (kwargs["command_id"], kwargs["instance_id"]) == (command_id, INSTANCE)
    assert (kwargs["waiter_delay"], kwargs["waiter_max_attempts"]) == (5, 18)
    assert deferred.value.timeout.total_seconds() == 110


def test_an_unregistered_agent_is_waited_for_in_the_triggerer(ssm, monkeypatch):
    """The agent registers a little after the instance runs: send again later, holding no slot meanwhile."""
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger

    send = images.try_send_provisioning
    answers = [None]  # the first send: InvalidInstanceId
    monkeypatch.setattr(images, "try_send_provisioning",
                        lambda *args, **kwargs: answers.pop(0) if answers else send(*args, **kwargs))
    task, before = operator(), len(ssm.list_commands()["Commands"])
    with pytest.raises(TaskDeferred) as deferred:
        task.execute({})
    assert isinstance(deferred.value.trigger, DateTimeTrigger) and deferred.value.method_name == "send"
    assert len(ssm.list_commands()["Commands"]) == before  # nothing sent yet
    command_id = task.send({}, event=deferred.value.trigger.moment, **deferred.value.kwargs)
    assert ssm.list_commands(CommandId=command_id)["Commands"][0]["DocumentName"] == "AWS-RunShellScript"


def test_an_agent_that_never_registers_fails_with_the_delivery_timeout(ssm, monkeypatch):
    monkeypatch.setattr(images, "try_send_provisioning", lambda *args, **kwargs: None)
    with pytest.raises(images.ImageError, match=f"provisioning {INSTANCE}: its SSM agent did not register in 30s"):
        operator().send({}, event=None, deadline=time.time() - 1)


def test_execute_complete_returns_the_command_on_success(command):
    command_id, found = command
    found.update(Status="Success", StandardOutputContent="provisioned\n")
    event = {"status": "success", "command_id": command_id, "instance_id": INSTANCE}
    assert operator().execute_complete({}, event, command_id=command_id) == command_id


def test_execute_complete_fails_with_the_commands_stderr(command):
    command_id, found = command
    fail(found)
    event = {"status": "error", "command_id": command_id, "instance_id": INSTANCE, "message": "failed"}
    with pytest.raises(ImageError, match="ended Failed \\(Failed, exit code 3\\): \\.\\.\\.x+\nyum: no such package"):
        operator().execute_complete({}, event, command_id=command_id)


@pytest.mark.parametrize("event", [None, {}, {"status": "maybe"},
                                   {"status": "success", "command_id": "other", "instance_id": INSTANCE},
                                   {"status": "success", "command_id": "c-1", "instance_id": "i-other"}])
def test_execute_complete_refuses_a_bad_event(event):
    with pytest.raises(ImageError, match="no usable event|the event is about"):
        operator().execute_complete({}, event, command_id="c-1")


def test_not_deferrable_waits_in_the_task(ssm):
    command_id = operator(deferrable=False).execute({})
    assert ssm.list_commands(CommandId=command_id)["Commands"][0]["Comment"] == "test"
