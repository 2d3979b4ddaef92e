"""AmiAvailableSensor / AmiAvailableTrigger against a moto server running in this process.

The server shares this process's moto backend, so a test can put an image into
``pending`` or ``failed`` (moto's create_image makes it ``available`` at once).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import boto3
import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException, TaskDeferred
from airflow.triggers.base import TriggerEvent
from deployline.image_readiness import (
    WAITERS_FILE,
    AmiAvailableSensor,
    AmiAvailableTrigger,
    DeploylineEC2Hook,
)
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

REGION = "us-east-1"
BASE_AMI = "ami-0d27e0fb3bac4d724"  # any AMI moto knows; the builder only needs to exist


@pytest.fixture
def ec2(moto_endpoint, monkeypatch):
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": moto_endpoint, "region_name": REGION},
    }
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_endpoint)


@pytest.fixture
def image(ec2):
    """A fresh AMI (moto object), put in ``pending``."""
    instance_id = ec2.run_instances(ImageId=BASE_AMI, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    image_id = ec2.create_image(InstanceId=instance_id, Name=f"test-{uuid.uuid4().hex[:12]}")["ImageId"]
    ami = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].amis[image_id]
    ami.state = "pending"
    return ami


class _Ti:
    """What BaseSensorOperator.execute asks of the task instance in reschedule mode."""

    def get_first_reschedule_date(self, context):
        return None


# --------------------------------------------------------------------------- hook and waiter


def test_hook_uses_the_deployline_waiters(ec2):
    hook = DeploylineEC2Hook()
    assert hook.waiter_path == WAITERS_FILE
    assert "image_available" in hook.list_waiters()
    acceptors = json.loads(WAITERS_FILE.read_text())["waiters"]["image_available"]["acceptors"]
    failures = {a["expected"] for a in acceptors if a["state"] == "failure"}
    expected = {"failed", "invalid", "deregistered", "error", "InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"}
    assert expected <= failures


# --------------------------------------------------------------------------- sensor, poke


def test_sensor_defaults():
    sensor = AmiAvailableSensor(task_id="wait", image_id="ami-0123456789abcdef0")
    assert (sensor.mode, sensor.poke_interval, sensor.timeout) == ("reschedule", 15, 3600)
    assert sensor.template_fields == ("image_id",)
    assert (sensor.aws_conn_id, sensor.region_name, sensor.deferrable) == ("aws_default", None, False)


def test_sensor_poke_pending_then_available(image):
    sensor = AmiAvailableSensor(task_id="wait", image_id=image.id)
    assert sensor.poke({}) is False
    image.state = "available"
    done = sensor.poke({})
    assert done.is_done and done.xcom_value == image.id


def test_sensor_poke_failed_image_fails_at_once(image):
    sensor = AmiAvailableSensor(task_id="wait", image_id=image.id)
    image.state = "failed"
    with pytest.raises(AirflowFailException, match=f"AMI {image.id} is failed"):
        sensor.poke({})


def test_sensor_poke_unknown_image_fails(ec2):
    sensor = AmiAvailableSensor(task_id="wait", image_id="ami-0123456789abcdef0")
    with pytest.raises(AirflowFailException, match="ami-0123456789abcdef0 is missing"):
        sensor.poke({})


def test_sensor_reschedule_mode(image):
    sensor = AmiAvailableSensor(task_id="wait", image_id=image.id)
    with pytest.raises(AirflowRescheduleException):
        sensor.execute({"ti": _Ti()})
    image.state = "available"
    assert sensor.execute({"ti": _Ti()}) == image.id


# --------------------------------------------------------------------------- trigger


def test_trigger_serialize_round_trips():
    trigger = AmiAvailableTrigger(image_id="ami-0123456789abcdef0", waiter_delay=7, waiter_max_attempts=9)
    classpath, kwargs = trigger.serialize()
    assert classpath == "deployline.image_readiness.AmiAvailableTrigger"
    assert kwargs == {
        "image_id": "ami-0123456789abcdef0",
        "waiter_delay": 7,
        "waiter_max_attempts": 9,
        "aws_conn_id": "aws_default",
    }
    assert AmiAvailableTrigger(**kwargs).serialize() == (classpath, kwargs)
    regional = AmiAvailableTrigger(image_id="ami-0123456789abcdef0", region_name="eu-west-1")
    assert AmiAvailableTrigger(**regional.serialize()[1]).serialize() == regional.serialize()
    assert isinstance(trigger.hook(), DeploylineEC2Hook)


def test_trigger_waits_while_pending_then_succeeds(image):
    trigger = AmiAvailableTrigger(image_id=image.id, waiter_delay=1, waiter_max_attempts=30)

    async def scenario():
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        done, _ = await asyncio.wait([first], timeout=2.5)
        assert not done, f"fired while the image was pending: {first.result() if done else None}"
        image.state = "available"
        event = await asyncio.wait_for(first, timeout=5)
        await events.aclose()
        return event

    event = asyncio.run(scenario())
    assert event == TriggerEvent({"status": "success", "image_id": image.id})


@pytest.mark.parametrize("broken", ["failed", "invalid", "deregistered", "error", "gone"])
def test_trigger_fails_fast_on_a_broken_image(image, ec2, broken):
    if broken == "gone":
        ec2.deregister_image(ImageId=image.id)
    else:
        image.state = broken
    trigger = AmiAvailableTrigger(image_id=image.id, waiter_delay=1, waiter_max_attempts=100)

    async def first_event():
        events = trigger.run()
        try:
            return await asyncio.wait_for(events.__anext__(), timeout=5)
        finally:
            await events.aclose()

    started = time.monotonic()
    event = asyncio.run(first_event())
    assert time.monotonic() - started < 2
    assert event.payload["status"] == "error"
    assert event.payload["image_id"] == image.id
    if broken != "gone":
        assert broken in event.payload["message"]


def test_trigger_fails_fast_on_an_unknown_image(ec2):
    trigger = AmiAvailableTrigger(image_id="ami-0123456789abcdef0", waiter_delay=1, waiter_max_attempts=100)

    async def first_event():
        events = trigger.run()
        try:
            return await asyncio.wait_for(events.__anext__(), timeout=5)
        finally:
            await events.aclose()

    event = asyncio.run(first_event())
    assert event.payload["status"] == "error"
    assert "InvalidAMIID.NotFound" in event.payload["message"]


# --------------------------------------------------------------------------- deferrable sensor


def test_deferrable_sensor_defers_on_a_pending_image(image):
    sensor = AmiAvailableSensor(task_id="wait", image_id=image.id, deferrable=True, poke_interval=10, timeout=95)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, AmiAvailableTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout.total_seconds() == 95
    _, kwargs = trigger.serialize()
    assert kwargs["image_id"] == image.id
    assert (kwargs["waiter_delay"], kwargs["waiter_max_attempts"]) == (10, 10)


def test_deferrable_sensor_returns_at_once_when_available(image):
    image.state = "available"
    sensor = AmiAvailableSensor(task_id="wait", image_id=image.id, deferrable=True)
    assert sensor.execute({}) == image.id


def test_deferrable_sensor_fails_at_once_on_a_failed_image(image):
    image.state = "failed"
    sensor = AmiAvailableSensor(task_id="wait", image_id=image.id, deferrable=True)
    with pytest.raises(AirflowFailException, match="is failed"):
        sensor.execute({})


def test_execute_complete():
    sensor = AmiAvailableSensor(task_id="wait", image_id="ami-0123456789abcdef0", deferrable=True)
    assert sensor.execute_complete({}, {"status": "success", "image_id": "ami-0123456789abcdef0"}) == (
        "ami-0123456789abcdef0"
    )
    with pytest.raises(AirflowFailException, match="will not become available: failed"):
        sensor.execute_complete({}, {"status": "error", "message": "AMI x will not become available: failed"})
    with pytest.raises(AirflowFailException):
        sensor.execute_complete({}, None)
