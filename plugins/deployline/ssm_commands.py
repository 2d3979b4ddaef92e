"""Provisioning an instance with SSM Run Command, waiting for the script in the triggerer.

The provider's ``SsmRunCommandOperator`` sends a command and can defer, but its trigger looks up
the command's invocations once, at the start (right after ``send_command`` there may be none yet:
it then reports success without waiting), and its failure carries no output. So this follows
``image_readiness``: an ``SsmHook`` that knows ``waiters/ssm.json`` (``command_done``: every
terminal status other than ``Success`` is a failure at once), :class:`SsmCommandDoneTrigger` on
it for one instance, and :class:`ProvisionInstanceOperator`, which sends the script (while the
instance's SSM agent is not registered, it defers and sends again), defers, and in ``execute_complete`` fails
with the command's status, exit code and the tail of its stderr, or logs its output.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.exceptions import AirflowException
from airflow.providers.amazon.aws.exceptions import WaiterMaxAttemptsError
from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.providers.amazon.aws.utils.waiter_with_logging import async_wait
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import BaseOperator
from airflow.triggers.base import TriggerEvent
from botocore.exceptions import ClientError

from deployline import images

WAITERS_FILE = Path(__file__).resolve().parent / "waiters" / "ssm.json"
COMMAND_DONE_WAITER = "command_done"


class DeploylineSsmHook(SsmHook):
    """``SsmHook`` that also knows the waiters in ``deployline/waiters/ssm.json``."""

    @cached_property
    def waiter_path(self) -> Path:
        return WAITERS_FILE


class SsmCommandDoneTrigger(AwsBaseWaiterTrigger):
    """Fires once command ``command_id`` has finished on instance ``instance_id``.

    Success: ``{"status": "success", "command_id", "instance_id"}``. At once on any other terminal
    status (Failed, Cancelled, TimedOut...), or after ``waiter_max_attempts`` looks ``waiter_delay``
    seconds apart: ``{"status": "error", "command_id", "instance_id", "command_status", "exit_code",
    "message"}``, the message naming status, details, exit code and the tail of stderr (or stdout).

    :param command_id: the SSM command (SendCommand's CommandId)
    :param instance_id: the instance it runs on
    :param waiter_delay: seconds between looks
    :param waiter_max_attempts: looks before giving up
    :param aws_conn_id: the Airflow AWS connection
    :param region_name: AWS region (default: the connection's)
    :param verify: SSL certificate verification, as for the hook
    :param botocore_config: botocore client configuration, as for the hook
    """

    aws_hook_class = DeploylineSsmHook

    def __init__(
        self,
        *,
        command_id: str,
        instance_id: str,
        waiter_delay: int = 15,
        waiter_max_attempts: int = 240,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ):
        super().__init__(
            serialized_fields={"command_id": command_id, "instance_id": instance_id},
            waiter_name=COMMAND_DONE_WAITER,
            waiter_args={"CommandId": command_id, "InstanceId": instance_id},
            failure_message=f"SSM command {command_id} on {instance_id} failed",
            status_message=f"SSM command {command_id} on {instance_id} is",
            status_queries=["Status", "StatusDetails", "Error.Message"],
            return_key="command_id",
            return_value=command_id,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )
        self.command_id = command_id
        self.instance_id = instance_id

    def hook(self) -> DeploylineSsmHook:
        return DeploylineSsmHook(**self._hook_parameters)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook()
        done = {"command_id": self.command_id, "instance_id": self.instance_id}
        async with await hook.get_async_conn() as ssm_client:
            waiter = hook.get_waiter(self.waiter_name, deferrable=True, client=ssm_client)
            try:
                await async_wait(waiter, self.waiter_delay, self.attempts, self.waiter_args, self.failure_message,
                                 self.status_message, self.status_queries)
            except AirflowException as error:
                try:
                    invocation = await ssm_client.get_command_invocation(CommandId=self.command_id,
                                                                     InstanceId=self.instance_id)
                except ClientError as exc:
                    invocation = {"Status": "unknown", "StandardErrorContent": f"{error}; {exc}"}
                status = invocation.get("Status", "unknown")
                if isinstance(error, WaiterMaxAttemptsError):
                    message = (f"provisioning {self.instance_id}: command {self.command_id} still {status} "
                               f"after {self.attempts * self.waiter_delay}s")
                else:
                    message = images.invocation_failure(self.instance_id, self.command_id, invocation)
                yield TriggerEvent({"status": "error", **done, "command_status": status,
                                    "exit_code": invocation.get("ResponseCode"), "message": message})
                return
        yield TriggerEvent({"status": "success", **done})


# A trigger that fires at once races the scheduler (see send): never wait less in the triggerer.
MIN_DEFERRAL = 5


class ProvisionInstanceOperator(BaseOperator):
    """Runs a shell script on an instance with SSM ``AWS-RunShellScript``; waits in the triggerer.

    ``script(**op_kwargs)`` returns ``(script, comment)``; the script is written to a file on the
    instance and run, so its ``#!`` line counts. A failed script fails the task with the command's
    status, exit code and the tail of its stderr (retries apply: a retry sends the script again).
    Returns the command id; the script's output is in the task log.

    :param instance_id: the instance (templated: an XComArg of the task that launched it)
    :param script: ``(script, comment)`` for ``op_kwargs``
    :param op_kwargs: keyword arguments for ``script`` (templated: XComArgs are resolved)
    :param timeout: seconds the script may run (SSM's ``executionTimeout``)
    :param delivery_timeout: seconds to wait for the instance's SSM agent to take the command
    :param aws_conn_id: the Airflow AWS connection
    :param region_name: AWS region (default: the connection's)
    :param deferrable: wait in the triggerer (True) or in this task, blocking a worker slot (False)
    :param poll_interval: seconds between looks at the command
    """

    template_fields: Sequence[str] = ("instance_id", "op_kwargs")
    ui_color = "#f3e5c0"

    def __init__(
        self,
        *,
        instance_id: str,
        script: Callable[..., tuple[str, str]],
        op_kwargs: dict[str, Any] | None = None,
        timeout: int = 1800,
        delivery_timeout: int = 600,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        deferrable: bool = True,
        poll_interval: int = 15,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.instance_id = instance_id
        self.script = script
        self.op_kwargs = op_kwargs or {}
        self.timeout = timeout
        self.delivery_timeout = delivery_timeout
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.deferrable = deferrable
        self.poll_interval = max(1, int(poll_interval))

    @cached_property
    def hook(self) -> DeploylineSsmHook:
        return DeploylineSsmHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    def execute(self, context) -> str:
        if not self.deferrable:
            script, comment = self.script(**self.op_kwargs)
            result = images.run_provisioning(self.hook.conn, self.instance_id, script, self.timeout, comment,
                                             poll_interval=self.poll_interval, delivery_timeout=self.delivery_timeout)
            return self._done(result)
        return self.send(context, deadline=time.time() + self.delivery_timeout)

    def send(self, context, event: Any = None, deadline: float = 0.0) -> str:
        """Send the script; while the instance's SSM agent is not registered, look again later (deferred)."""
        script, comment = self.script(**self.op_kwargs)
        command_id = images.try_send_provisioning(self.hook.conn, self.instance_id, script, self.timeout, comment,
                                                  delivery_timeout=self.delivery_timeout)
        if command_id is None:
            if time.time() >= deadline:
                raise images.ImageError(f"provisioning {self.instance_id}: its SSM agent did not register in "
                                        f"{self.delivery_timeout}s")
            delay = max(self.poll_interval, MIN_DEFERRAL)
            self.log.info("SSM agent on %s not registered yet; sending again in %ds", self.instance_id, delay)
            self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=delay)), method_name="send",
                       kwargs={"deadline": deadline}, timeout=timedelta(seconds=delay * 4 + 60))
        # One look first, as the AMI sensor does: a command already over (a quick script, moto) needs
        # no deferral, and a deferral whose trigger fires at once races the scheduler's record of
        # it: the resumed task was killed ("the task shouldn't be running anymore", apache/airflow#71172).
        invocation = images.command_invocation(self.hook.conn, command_id, self.instance_id)
        if invocation.get("Status", "Pending") not in images.SSM_IN_PROGRESS:
            return self._done(images.provisioning_result(self.hook.conn, command_id, self.instance_id,
                                                         invocation=invocation))
        wait = self.timeout + self.delivery_timeout  # the script may queue for the agent, then run
        self.defer(
            trigger=SsmCommandDoneTrigger(
                command_id=command_id, instance_id=self.instance_id, waiter_delay=self.poll_interval,
                waiter_max_attempts=max(1, math.ceil(wait / self.poll_interval)),
                aws_conn_id=self.aws_conn_id, region_name=self.region_name,
            ),
            method_name="execute_complete",
            kwargs={"command_id": command_id},
            timeout=timedelta(seconds=wait + 4 * self.poll_interval),
        )

    def execute_complete(self, context, event: dict[str, Any] | None = None, command_id: str | None = None) -> str:
        """Back from :class:`SsmCommandDoneTrigger`: fail with the command's status and stderr, or log its output."""
        if not isinstance(event, dict) or event.get("status") not in ("success", "error"):
            raise images.ImageError(f"provisioning {self.instance_id}: no usable event from the trigger: {event!r}")
        if event.get("command_id") != command_id or event.get("instance_id") != self.instance_id:
            raise images.ImageError(f"provisioning {self.instance_id}: the event is about command "
                                    f"{event.get('command_id')} on {event.get('instance_id')}, not {command_id}")
        # A fresh look either way: the output to log, or (a timeout) a command to cancel.
        result = images.provisioning_result(self.hook.conn, command_id, self.instance_id, waited=self.timeout)
        if event["status"] == "error":
            raise images.ImageError(event.get("message") or f"provisioning {self.instance_id} failed: {event!r}")
        return self._done(result)

    def _done(self, result: dict) -> str:
        self.log.info("provisioning %s: command %s %s\n%s", self.instance_id, result["command_id"], result["status"],
                      result["output"])
        return result["command_id"]
