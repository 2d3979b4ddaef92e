"""Waiting for an AMI to become ``available``: a sensor that can poke, reschedule or defer.

The amazon provider has no AMI sensor, so this builds one from its parts: an ``EC2Hook``
whose custom waiters (``waiters/ec2.json`` next to this module) add failure states to
botocore's ``ImageAvailable``, and an ``AwsBaseWaiterTrigger`` running that waiter in the
triggerer.  A broken image (failed, invalid, deregistered, error, unknown) fails the task
at once instead of waiting out the timeout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException

from deployline.images import BROKEN_IMAGE_STATES, image_state

WAITERS_FILE = Path(__file__).resolve().parent / "waiters" / "ec2.json"
IMAGE_AVAILABLE_WAITER = "image_available"


class DeploylineEC2Hook(EC2Hook):
    """``EC2Hook`` (client API) that also knows the waiters in ``deployline/waiters/ec2.json``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("api_type", "client_type")
        super().__init__(*args, **kwargs)

    @cached_property
    def waiter_path(self) -> Path:
        return WAITERS_FILE


class AmiAvailableTrigger(AwsBaseWaiterTrigger):
    """Fires ``{"status": "success", "image_id": ...}`` once the AMI is available.

    Fires ``{"status": "error", "message": ...}`` as soon as the image is broken or unknown,
    or when ``waiter_max_attempts`` polls ``waiter_delay`` seconds apart have not seen it available.
    """

    aws_hook_class = DeploylineEC2Hook

    def __init__(
        self,
        *,
        image_id: str,
        waiter_delay: int = 15,
        waiter_max_attempts: int = 240,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ):
        super().__init__(
            serialized_fields={"image_id": image_id},
            waiter_name=IMAGE_AVAILABLE_WAITER,
            waiter_args={"ImageIds": [image_id]},
            failure_message=f"AMI {image_id} will not become available",
            status_message=f"AMI {image_id} is not available yet",
            status_queries=["Images[0].State", "Images[0].StateReason.Message", "Error.Code", "Error.Message"],
            return_key="image_id",
            return_value=image_id,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )
        self.image_id = image_id

    def hook(self) -> DeploylineEC2Hook:
        return DeploylineEC2Hook(**self._hook_parameters)


class AmiAvailableSensor(BaseSensorOperator):
    """Waits until an AMI is ``available``; pushes the image id to XCom.

    A failed, invalid, deregistered, errored or unknown image fails the task at once
    (no retries).  Not deferrable: pokes every ``poke_interval`` seconds, by default
    in ``reschedule`` mode.  Deferrable: one poke, then an :class:`AmiAvailableTrigger`
    in the triggerer for the rest of ``timeout``.
    """

    template_fields: Sequence[str] = ("image_id",)
    ui_color = "#f3e5c0"

    def __init__(
        self,
        *,
        image_id: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        deferrable: bool = False,
        poke_interval: float = 15,
        timeout: float = 3600,
        mode: str = "reschedule",
        **kwargs,
    ):
        super().__init__(poke_interval=poke_interval, timeout=timeout, mode=mode, **kwargs)
        self.image_id = image_id
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.deferrable = deferrable

    @cached_property
    def hook(self) -> DeploylineEC2Hook:
        return DeploylineEC2Hook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    def poke(self, context) -> bool | PokeReturnValue:
        state, reason = image_state(self.hook.conn, self.image_id)
        if state == "available":
            self.log.info("AMI %s is available", self.image_id)
            return PokeReturnValue(is_done=True, xcom_value=self.image_id)
        if state in BROKEN_IMAGE_STATES:
            raise AirflowFailException(f"AMI {self.image_id} is {state}: {reason or 'no reason given'}")
        self.log.info("AMI %s is %s%s", self.image_id, state, f" ({reason})" if reason else "")
        return False

    def execute(self, context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        done = self.poke(context)
        if done:
            return done.xcom_value if isinstance(done, PokeReturnValue) else self.image_id
        delay = max(1, int(self.poke_interval))
        self.defer(
            trigger=AmiAvailableTrigger(
                image_id=self.image_id,
                waiter_delay=delay,
                waiter_max_attempts=max(1, math.ceil(self.timeout / delay)),
                aws_conn_id=self.aws_conn_id,
                region_name=self.region_name,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> str:
        event = event or {}
        if event.get("status") == "success":
            image_id = event.get("image_id") or self.image_id
            self.log.info("AMI %s is available", image_id)
            return image_id
        message = event.get("message") or f"no event details: {event!r}"
        raise AirflowFailException(f"AMI {self.image_id} did not become available: {message}")
