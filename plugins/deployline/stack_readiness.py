"""Waiting for CloudFormation stacks in the triggerer, not in a worker slot.

The amazon provider has no CloudFormation trigger, so this builds one from its parts, as
``image_readiness`` does for AMIs: a ``CloudFormationHook`` that knows the waiters in
``waiters/cloudformation.json`` (a rollback or a failed delete is a failure at once, not a wait
until the timeout), and :class:`StackSettledTrigger`, an ``AwsBaseWaiterTrigger`` that on failure
reads the stack's failed events and sends their reasons with the event.

:class:`StackOperator` is the task side: it calls ``start`` (an environment driver's
``start_provision``, ``start_teardown``...), which starts a stack operation and says what to
wait for; the task defers until the stack settles, then calls ``start`` again (drivers are
idempotent: it goes on from where the stack is) until nothing is left to wait for, and returns
``finish()``. With the ``local`` driver ``start`` does the work at once and returns None: the
task never defers.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.exceptions import AirflowException
from airflow.providers.amazon.aws.exceptions import WaiterMaxAttemptsError
from airflow.providers.amazon.aws.hooks.cloud_formation import CloudFormationHook
from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.providers.amazon.aws.utils.waiter_with_logging import async_wait
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import TriggerEvent
from botocore.exceptions import ClientError

from deployline.environments.base import StackOperation
from deployline.environments.cloudformation import WAITERS, WAITERS_FILE, failure_reasons, stack_waiter


class StackFailed(RuntimeError):
    """A stack operation ended in a failed state or did not end in time; the message says why."""


class DeploylineCloudFormationHook(CloudFormationHook):
    """``CloudFormationHook`` that also knows the waiters in ``deployline/waiters/cloudformation.json``."""

    @cached_property
    def waiter_path(self):
        return WAITERS_FILE


class StackSettledTrigger(AwsBaseWaiterTrigger):
    """Fires once the ``operation`` (create, update, delete, settle) on stack ``stack_name`` has ended.

    Success: ``{"status": "success", "stack_name", "operation"}``. As soon as the stack reaches a
    failed state, or after ``waiter_max_attempts`` looks ``waiter_delay`` seconds apart:
    ``{"status": "error", "stack_name", "operation", "stack_status", "reasons", "message"}``, where
    ``reasons`` are CloudFormation's, from the stack's failed events (newest first).

    :param stack_name: the stack's name (or id)
    :param operation: what to wait for: ``create``, ``update``, ``delete`` (the stack gone), or
        ``settle`` (any operation in progress ended, however it ended)
    :param waiter_delay: seconds between looks
    :param waiter_max_attempts: looks before giving up
    :param aws_conn_id: the Airflow AWS connection
    :param region_name: AWS region (default: the connection's)
    :param verify: SSL certificate verification, as for the hook
    :param botocore_config: botocore client configuration, as for the hook
    """

    aws_hook_class = DeploylineCloudFormationHook

    def __init__(
        self,
        *,
        stack_name: str,
        operation: str,
        waiter_delay: int = 15,
        waiter_max_attempts: int = 240,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        verify: bool | str | None = None,
        botocore_config: dict | None = None,
    ):
        if operation not in WAITERS:
            raise ValueError(f"operation must be one of {', '.join(WAITERS)}, got {operation!r}")
        super().__init__(
            serialized_fields={"stack_name": stack_name, "operation": operation},
            waiter_name=WAITERS[operation],
            waiter_args={"StackName": stack_name},
            failure_message=f"{operation} of stack {stack_name} failed",
            status_message=f"stack {stack_name} is",
            status_queries=["Stacks[0].StackStatus", "Stacks[0].StackStatusReason", "Error.Message"],
            return_key="stack_name",
            return_value=stack_name,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )
        self.stack_name = stack_name
        self.operation = operation

    def hook(self) -> DeploylineCloudFormationHook:
        return DeploylineCloudFormationHook(**self._hook_parameters)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook()
        async with await hook.get_async_conn() as cfn:
            waiter = hook.get_waiter(self.waiter_name, deferrable=True, client=cfn)
            try:
                await async_wait(waiter, self.waiter_delay, self.attempts, self.waiter_args, self.failure_message,
                                 self.status_message, self.status_queries)
            except AirflowException as error:
                status, reasons = await self._explain(cfn)
                if isinstance(error, WaiterMaxAttemptsError):
                    message = (f"{self.operation} of stack {self.stack_name}: still {status} after "
                               f"{self.attempts * self.waiter_delay}s")
                else:
                    message = f"{self.operation} of stack {self.stack_name} ended {status}: {reasons or error}"
                yield TriggerEvent({"status": "error", "stack_name": self.stack_name, "operation": self.operation,
                                    "stack_status": status, "reasons": reasons, "message": message})
                return
        yield TriggerEvent({"status": "success", "stack_name": self.stack_name, "operation": self.operation})

    async def _explain(self, cfn) -> tuple[str, str]:
        """The stack's status (``absent`` when gone) and CloudFormation's reasons for the failure."""
        try:
            stacks = (await cfn.describe_stacks(StackName=self.stack_name))["Stacks"]
            status = stacks[0]["StackStatus"] if stacks else "absent"
            events = (await cfn.describe_stack_events(StackName=self.stack_name))["StackEvents"]
        except ClientError as exc:
            return ("absent" if "does not exist" in str(exc) else "unknown"), ""
        return status, failure_reasons(events)


def stack_event_problem(event: dict[str, Any] | None, pending: dict) -> str | None:
    """What is wrong with a :class:`StackSettledTrigger` event for the ``pending`` operation (None: success)."""
    if not isinstance(event, dict) or event.get("status") not in ("success", "error"):
        return f"no usable event from the trigger: {event!r}"
    if event.get("stack_name") != pending["stack"] or event.get("operation") != pending["operation"]:
        return f"the event is about {event.get('operation')} of {event.get('stack_name')}, not {pending}: {event!r}"
    if event["status"] == "error":
        return event.get("message") or f"{pending['operation']} of stack {pending['stack']} failed: {event!r}"
    return None


class StackOperator(BaseOperator):
    """Starts stack operations with ``start`` and waits for each in the triggerer; returns ``finish()``.

    ``start(**op_kwargs)`` starts what is needed and returns the :class:`StackOperation` to wait for,
    or None when nothing is (left) to wait for; it is called again after every wait, so it must go
    on from where the stack is (the environment drivers' ``start_*`` methods do). Then
    ``finish(**op_kwargs)`` is the task's result. A failed operation fails the task with
    CloudFormation's reasons (retries apply: the next try's ``start`` replaces or resumes).

    :param start: starts the next operation; returns what to wait for, or None
    :param finish: the task's return value, once ``start`` has nothing left to wait for
    :param op_kwargs: keyword arguments for both (templated: XComArgs are resolved)
    :param plan: decides once, before the first ``start``, what the task acts on (``plan(**op_kwargs)``,
        JSON); ``start`` and ``finish`` then also get it as ``plan=``, through every wait: what was
        there before the first delete, for example
    :param aws_conn_id: the Airflow AWS connection the trigger uses (the driver's)
    :param region_name: AWS region (default: the connection's)
    :param deferrable: wait in the triggerer (True) or in this task, blocking a worker slot (False)
    :param poll_interval: seconds between looks at a stack
    :param timeout: seconds one operation may take
    :param max_rounds: operations one task may wait for (a failed stack replaced: delete, then create)
    """

    template_fields: Sequence[str] = ("op_kwargs",)
    ui_color = "#f3e5c0"

    def __init__(
        self,
        *,
        start: Callable[..., StackOperation | None],
        finish: Callable[..., Any],
        op_kwargs: dict[str, Any] | None = None,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        deferrable: bool = True,
        poll_interval: int = 15,
        timeout: float = 3600,
        max_rounds: int = 10,
        plan: Callable[..., Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.plan = plan
        self.start = start
        self.finish = finish
        self.op_kwargs = op_kwargs or {}
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.deferrable = deferrable
        self.poll_interval = max(1, int(poll_interval))
        self.timeout = timeout
        self.max_rounds = max_rounds

    def execute(self, context) -> Any:
        if self.plan is None:
            return self._go_on(0, {})
        return self._go_on(0, {"plan": self.plan(**self.op_kwargs)})

    def resume(self, context, event: dict[str, Any] | None = None, pending: dict | None = None,
               rounds: int = 1, planned: dict | None = None) -> Any:
        """Back from :class:`StackSettledTrigger`: fail with its reasons, or start the next operation."""
        problem = stack_event_problem(event, pending or {})
        if problem:
            raise StackFailed(problem)
        self.log.info("%s of stack %s done", pending["operation"], pending["stack"])
        return self._go_on(rounds, planned or {})

    def _go_on(self, rounds: int, planned: dict) -> Any:
        kwargs = self.op_kwargs | planned
        while True:
            pending = self.start(**kwargs)
            if pending is None:
                return self.finish(**kwargs)
            if rounds >= self.max_rounds:
                raise AirflowFailException(f"stack {pending.stack}: still not done after {rounds} operations")
            rounds += 1
            if settled_now(pending, self.aws_conn_id, self.region_name):
                continue  # over already (moto, a quick change): the next step, no deferral
            self.log.info("waiting for %s of stack %s", pending.operation, pending.stack)
            if self.deferrable:
                self.defer(trigger=self._trigger(pending), method_name="resume",
                           kwargs={"pending": pending.to_dict(), "rounds": rounds, "planned": planned},
                           timeout=timedelta(seconds=self.timeout + 4 * self.poll_interval))
            self._wait_here(pending)

    @property
    def _attempts(self) -> int:
        return max(1, math.ceil(self.timeout / self.poll_interval))

    def _trigger(self, pending: StackOperation) -> StackSettledTrigger:
        return StackSettledTrigger(stack_name=pending.stack, operation=pending.operation,
                                   waiter_delay=self.poll_interval, waiter_max_attempts=self._attempts,
                                   aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    def _wait_here(self, pending: StackOperation) -> None:
        """Not deferrable: the trigger's wait, run in this task."""
        import asyncio

        event = asyncio.run(_first_event(self._trigger(pending)))
        problem = stack_event_problem(event, pending.to_dict())
        if problem:
            raise StackFailed(problem)


def settled_now(pending: StackOperation, aws_conn_id: str | None, region_name: str | None) -> bool:
    """One look before deferring, as the AMI sensor does: whether ``pending`` has already ended well.

    A deferral whose trigger fires at once races the scheduler's own record of it: the resumed task
    was killed ("the task shouldn't be running anymore", apache/airflow#71172). Anything but a
    success (in progress, failed) is left to the trigger, which explains a failure.
    """
    from botocore.exceptions import WaiterError

    cloudformation_client = DeploylineCloudFormationHook(aws_conn_id=aws_conn_id, region_name=region_name).conn
    try:
        stack_waiter(cloudformation_client, WAITERS[pending.operation]).wait(
            StackName=pending.stack, WaiterConfig={"Delay": 1, "MaxAttempts": 1})
    except WaiterError:
        return False
    return True


async def _first_event(trigger: StackSettledTrigger) -> dict:
    events = trigger.run()
    try:
        return (await events.__anext__()).payload
    finally:
        await events.aclose()
