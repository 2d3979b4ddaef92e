"""StackSettledTrigger / StackOperator against a moto server running in this process.

moto's stacks complete at once; the server shares this process's moto backend, so a test holds a
stack in progress by setting the FakeStack's status, then completes or fails it (with a failed
event, as CloudFormation writes one) while the trigger runs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import boto3
import pytest
from airflow.sdk.exceptions import TaskDeferred
from deployline import stack_readiness
from deployline.environments.base import StackOperation
from deployline.environments.cloudformation import WAITERS, WAITERS_FILE, stack_waiter
from deployline.stack_readiness import (
    DeploylineCloudFormationHook,
    StackFailed,
    StackOperator,
    StackSettledTrigger,
    stack_event_problem,
)
from moto.cloudformation.models import Event, cloudformation_backends
from moto.core import DEFAULT_ACCOUNT_ID

REGION = "us-east-1"
TEMPLATE = json.dumps({"Resources": {"Topic": {"Type": "AWS::SNS::Topic"}}})
FAILURE = "Resource handler returned message: the subnet is in use (Service: Ec2, Status Code: 400)"


@pytest.fixture
def cfn(moto_endpoint, monkeypatch):
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    connection = {"conn_type": "aws", "login": "testing", "password": "testing",
                  "extra": {"endpoint_url": moto_endpoint, "region_name": REGION}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    return boto3.client("cloudformation", region_name=REGION, endpoint_url=moto_endpoint)


@pytest.fixture
def stack(cfn):
    """A fresh stack (moto object), held in ``CREATE_IN_PROGRESS``."""
    name = f"dl-test-{uuid.uuid4().hex[:10]}"
    cfn.create_stack(StackName=name, TemplateBody=TEMPLATE)
    fake = next(s for s in cloudformation_backends[DEFAULT_ACCOUNT_ID][REGION].stacks.values() if s.name == name)
    fake.status = "CREATE_IN_PROGRESS"
    return fake


def fail(fake, status: str, resource_status: str = "CREATE_FAILED") -> None:
    """What CloudFormation does when a resource fails: a failed event, then the stack's failed state."""
    fake.events.append(Event(
        stack_id=fake.stack_id, stack_name=fake.name, logical_resource_id="Subnet", physical_resource_id="",
        resource_type="AWS::EC2::Subnet", resource_status=resource_status, resource_status_reason=FAILURE,
        resource_properties=None))
    fake.status = status


async def first_event(trigger, timeout=5.0):
    events = trigger.run()
    try:
        return (await asyncio.wait_for(events.__anext__(), timeout=timeout)).payload
    finally:
        await events.aclose()


def run_until(trigger, change, quiet: float = 2.5):
    """Run the trigger: it must not fire for ``quiet`` seconds; then ``change()`` and its first event."""

    async def scenario():
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        done, _ = await asyncio.wait([first], timeout=quiet)
        assert not done, f"fired while the stack was in progress: {first.result() if done else None}"
        change()
        changed = time.monotonic()
        event = await asyncio.wait_for(first, timeout=5)
        await events.aclose()
        return event.payload, time.monotonic() - changed

    return asyncio.run(scenario())


# --------------------------------------------------------------------------- waiters and hook


def test_the_hook_knows_the_deployline_waiters(cfn):
    hook = DeploylineCloudFormationHook()
    assert hook.waiter_path == WAITERS_FILE
    assert set(WAITERS.values()) <= set(hook.list_waiters())
    waiters = json.loads(WAITERS_FILE.read_text())["waiters"]
    failures = {a["expected"] for a in waiters["stack_created"]["acceptors"] if a["state"] == "failure"}
    assert {"CREATE_FAILED", "ROLLBACK_IN_PROGRESS", "ROLLBACK_COMPLETE", "ValidationError"} <= failures
    failures = {a["expected"] for a in waiters["stack_updated"]["acceptors"] if a["state"] == "failure"}
    assert {"UPDATE_FAILED", "UPDATE_ROLLBACK_IN_PROGRESS", "UPDATE_ROLLBACK_COMPLETE"} <= failures


def test_the_blocking_waiter_is_the_same(cfn, stack):
    stack.status = "CREATE_COMPLETE"
    stack_waiter(cfn, "stack_created").wait(StackName=stack.name, WaiterConfig={"Delay": 1, "MaxAttempts": 2})


# --------------------------------------------------------------------------- trigger


def test_trigger_serialize_round_trips():
    trigger = StackSettledTrigger(stack_name="dl-x", operation="delete", waiter_delay=7, waiter_max_attempts=9)
    classpath, kwargs = trigger.serialize()
    assert classpath == "deployline.stack_readiness.StackSettledTrigger"
    assert kwargs == {"stack_name": "dl-x", "operation": "delete", "waiter_delay": 7, "waiter_max_attempts": 9,
                      "aws_conn_id": "aws_default"}
    assert StackSettledTrigger(**kwargs).serialize() == (classpath, kwargs)
    assert isinstance(trigger.hook(), DeploylineCloudFormationHook)
    with pytest.raises(ValueError, match="operation must be one of"):
        StackSettledTrigger(stack_name="dl-x", operation="explode")


def test_trigger_waits_while_the_stack_is_created_then_succeeds(stack):
    trigger = StackSettledTrigger(stack_name=stack.name, operation="create", waiter_delay=1, waiter_max_attempts=30)
    event, _ = run_until(trigger, lambda: setattr(stack, "status", "CREATE_COMPLETE"))
    assert event == {"status": "success", "stack_name": stack.name, "operation": "create"}


def test_trigger_fails_at_once_with_cloudformations_reasons(stack):
    trigger = StackSettledTrigger(stack_name=stack.name, operation="create", waiter_delay=1, waiter_max_attempts=100)
    event, after = run_until(trigger, lambda: fail(stack, "ROLLBACK_IN_PROGRESS"))
    assert after < 2.5  # the next look, not the end of 100 attempts
    assert event["status"] == "error" and event["stack_status"] == "ROLLBACK_IN_PROGRESS"
    assert event["reasons"] == f"Subnet (AWS::EC2::Subnet) CREATE_FAILED: {FAILURE}"
    assert event["message"] == f"create of stack {stack.name} ended ROLLBACK_IN_PROGRESS: {event['reasons']}"


def test_a_failed_update_fails_at_once(stack):
    stack.status = "UPDATE_IN_PROGRESS"
    trigger = StackSettledTrigger(stack_name=stack.name, operation="update", waiter_delay=1, waiter_max_attempts=100)
    event, _ = run_until(trigger, lambda: fail(stack, "UPDATE_ROLLBACK_IN_PROGRESS", "UPDATE_FAILED"))
    assert event["status"] == "error" and "UPDATE_FAILED: " + FAILURE in event["message"]


def test_trigger_waits_for_a_delete(cfn, stack):
    stack.status = "DELETE_IN_PROGRESS"
    trigger = StackSettledTrigger(stack_name=stack.name, operation="delete", waiter_delay=1, waiter_max_attempts=30)
    event, _ = run_until(trigger, lambda: cfn.delete_stack(StackName=stack.name) or setattr(
        stack, "status", "DELETE_COMPLETE"))
    assert event["status"] == "success"
    # A stack that is not there at all is deleted, too.
    gone = StackSettledTrigger(stack_name="dl-never-there", operation="delete", waiter_delay=1, waiter_max_attempts=3)
    assert asyncio.run(first_event(gone))["status"] == "success"


def test_a_failed_delete_names_the_resource(stack):
    stack.status = "DELETE_IN_PROGRESS"
    trigger = StackSettledTrigger(stack_name=stack.name, operation="delete", waiter_delay=1, waiter_max_attempts=30)
    event, _ = run_until(trigger, lambda: fail(stack, "DELETE_FAILED", "DELETE_FAILED"))
    assert event["status"] == "error" and event["stack_status"] == "DELETE_FAILED"
    assert "Subnet (AWS::EC2::Subnet) DELETE_FAILED" in event["message"]


def test_settle_succeeds_on_any_end(stack):
    trigger = StackSettledTrigger(stack_name=stack.name, operation="settle", waiter_delay=1, waiter_max_attempts=30)
    event, _ = run_until(trigger, lambda: fail(stack, "ROLLBACK_COMPLETE"))
    assert event["status"] == "success"


def test_trigger_gives_up_after_its_attempts(stack):
    trigger = StackSettledTrigger(stack_name=stack.name, operation="create", waiter_delay=1, waiter_max_attempts=2)
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "error"
    assert event["message"] == f"create of stack {stack.name}: still CREATE_IN_PROGRESS after 2s"


def test_a_create_of_a_missing_stack_fails(cfn):
    trigger = StackSettledTrigger(stack_name="dl-never-there", operation="create", waiter_delay=1,
                                  waiter_max_attempts=30)
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "error" and event["stack_status"] == "absent"


# --------------------------------------------------------------------------- operator


def operator(starts, finish=lambda: "done", **kwargs):
    calls = iter(starts)
    return StackOperator(task_id="step", start=lambda: next(calls), finish=finish, poll_interval=5, timeout=60,
                         **kwargs)


def test_nothing_to_wait_for_means_no_deferral():
    # The local driver: start does the work and returns None.
    assert operator([None]).execute({}) == "done"


def test_the_operator_defers_to_the_trigger_then_goes_on(monkeypatch):
    monkeypatch.setattr(stack_readiness, "settled_now", lambda *args: False)  # still in progress at its look
    op = operator([StackOperation("dl-a", "delete"), StackOperation("dl-a", "create"), None])
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.method_name == "resume"
    assert deferred.value.kwargs == {"pending": {"stack": "dl-a", "operation": "delete"}, "rounds": 1, "planned": {}}
    _, kwargs = deferred.value.trigger.serialize()
    assert (kwargs["stack_name"], kwargs["operation"]) == ("dl-a", "delete")
    assert (kwargs["waiter_delay"], kwargs["waiter_max_attempts"]) == (5, 12)
    assert deferred.value.timeout.total_seconds() == 80

    ok = {"status": "success", "stack_name": "dl-a", "operation": "delete"}
    with pytest.raises(TaskDeferred) as again:
        op.resume({}, event=ok, **deferred.value.kwargs)
    assert again.value.kwargs == {"pending": {"stack": "dl-a", "operation": "create"}, "rounds": 2, "planned": {}}
    assert op.resume({}, event=ok | {"operation": "create"}, **again.value.kwargs) == "done"


@pytest.mark.parametrize("event, message", [
    (None, "no usable event"),
    ({"status": "weird"}, "no usable event"),
    ({"status": "success", "stack_name": "dl-other", "operation": "create"}, "not {'stack': 'dl-a'"),
    ({"status": "success", "stack_name": "dl-a", "operation": "delete"}, "the event is about delete"),
    ({"status": "error", "stack_name": "dl-a", "operation": "create",
      "message": "create of stack dl-a ended ROLLBACK_COMPLETE: Subnet failed"}, "ROLLBACK_COMPLETE: Subnet failed"),
])
def test_resume_validates_the_event(event, message):
    op = operator([None])
    with pytest.raises(StackFailed, match=message):
        op.resume({}, event=event, pending={"stack": "dl-a", "operation": "create"}, rounds=1)


def test_stack_event_problem_accepts_only_a_matching_success():
    pending = {"stack": "dl-a", "operation": "update"}
    assert stack_event_problem({"status": "success", "stack_name": "dl-a", "operation": "update"}, pending) is None


def test_an_operation_over_at_the_first_look_is_not_deferred(monkeypatch):
    # A deferral whose trigger fires at once races the scheduler (apache/airflow#71172).
    monkeypatch.setattr(stack_readiness, "settled_now", lambda *args: True)
    op = operator([StackOperation("dl-a", "delete"), StackOperation("dl-a", "create"), None])
    assert op.execute({}) == "done"


def test_settled_now_looks_once(cfn, stack):
    pending = StackOperation(stack.name, "create")
    assert not stack_readiness.settled_now(pending, "aws_default", REGION)  # held CREATE_IN_PROGRESS
    stack.status = "CREATE_COMPLETE"
    assert stack_readiness.settled_now(pending, "aws_default", REGION)
    fail(stack, "ROLLBACK_IN_PROGRESS")
    assert not stack_readiness.settled_now(pending, "aws_default", REGION)  # the trigger explains failures


def test_the_operator_gives_up_after_max_rounds():
    op = operator([StackOperation("dl-a", "update")] * 5, max_rounds=2)
    ok = {"status": "success", "stack_name": "dl-a", "operation": "update"}
    with pytest.raises(Exception, match="still not done after 2 operations"):
        op.resume({}, event=ok, pending={"stack": "dl-a", "operation": "update"}, rounds=2)


def test_not_deferrable_waits_in_the_task(cfn, stack):
    stack.status = "CREATE_COMPLETE"
    op = operator([StackOperation(stack.name, "create"), None], deferrable=False)
    assert op.execute({}) == "done"
    fail(stack, "ROLLBACK_COMPLETE")
    op = operator([StackOperation(stack.name, "create")], deferrable=False)
    with pytest.raises(StackFailed, match=FAILURE.replace("(", r"\(").replace(")", r"\)")):
        op.execute({})


def test_op_kwargs_reach_start_and_finish():
    seen = []
    op = StackOperator(task_id="step", start=lambda name: seen.append(name), finish=lambda name: name.upper(),
                       op_kwargs={"name": "dl-b"})
    assert op.execute({}) == "DL-B" and seen == ["dl-b"]
    assert op.template_fields == ("op_kwargs",)


def test_the_plan_is_made_once_and_travels_through_every_wait(monkeypatch):
    """What the task acts on is decided before the first delete (the stack is gone after it)."""
    monkeypatch.setattr(stack_readiness, "settled_now", lambda *args: False)
    planned, pending = [], [StackOperation("dl-c", "delete"), None]
    op = StackOperator(task_id="step", op_kwargs={"name": "dl-c"},
                       plan=lambda name: planned.append(name) or {"existed": [name]},
                       start=lambda name, plan: pending.pop(0),
                       finish=lambda name, plan: {"removed": plan["existed"]})
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.kwargs["planned"] == {"plan": {"existed": ["dl-c"]}}
    ok = {"status": "success", "stack_name": "dl-c", "operation": "delete"}
    assert op.resume({}, event=ok, **deferred.value.kwargs) == {"removed": ["dl-c"]} and planned == ["dl-c"]
