"""A production deploy that holds no worker slot while it waits.

:class:`BlueGreenDeployOperator` runs the steps of :class:`deployline.deployments.BlueGreen`.
Between them it defers: to :class:`StackSettledTrigger` while a stack is created or deleted
(green, an idle environment, blue after the drain), and to a ``DateTimeTrigger`` while green
comes up behind its load balancer or blue drains. The work itself (smoke tests, the switch,
health watched after it) runs in the task. The deploy's state travels with the deferral, in
Airflow's own record of the task; a try that is killed starts again from the beginning, which
the steps make safe (after the switch it finds its version live).

The one-slot production pool must count deferred tasks (``include_deferred``), or a second
deploy could start while the first one waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from deployline.deployments import BlueGreen, Deployed, RolledBack, Wait
from deployline.stack_readiness import StackFailed, StackSettledTrigger, settled_now, stack_event_problem

# A wait shorter than this is made in the task: a deferral costs a trigger and a resumed task.
MIN_DEFERRAL = 5.0


def _failure_of(event: Any, waiting: dict) -> bool:
    """Whether ``event`` is the trigger's report that the awaited stack operation failed."""
    return (isinstance(event, dict) and event.get("status") == "error"
            and event.get("stack_name") == waiting["stack"] and event.get("operation") == waiting["operation"])


class BlueGreenDeployOperator(BaseOperator):
    """Deploys with :class:`BlueGreen`, waiting in the triggerer between its steps.

    :param deploy: ``deploy(**op_kwargs)`` builds the deploy for this try (called again after every
        wait); it may raise ``AirflowSkipException`` on the first try's call (nothing to deploy)
    :param on_deployed: ``on_deployed(deployed, state, **op_kwargs)``: records the result; its
        return value is the task's
    :param on_rolled_back: ``on_rolled_back(error, state, **op_kwargs)``: records a rollback; the
        task then fails with the ``RolledBack`` error
    :param op_kwargs: keyword arguments of the three (templated: XComArgs are resolved)
    :param aws_conn_id: the Airflow AWS connection the stack trigger uses (the driver's)
    :param region_name: AWS region (default: the connection's)
    :param poll_interval: seconds between looks at a stack
    :param timeout: seconds one stack operation may take
    :param max_waits: waits one try may make before giving up (a loop would otherwise never end)
    """

    template_fields: Sequence[str] = ("op_kwargs",)
    ui_color = "#c9e7c4"
    deferrable = True  # always: a wait shorter than MIN_DEFERRAL is the only one made in the task

    def __init__(
        self,
        *,
        deploy: Callable[..., BlueGreen],
        on_deployed: Callable[..., Any],
        on_rolled_back: Callable[..., None],
        op_kwargs: dict[str, Any] | None = None,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        poll_interval: int = 15,
        timeout: float = 1800,
        max_waits: int = 500,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.deploy = deploy
        self.on_deployed = on_deployed
        self.on_rolled_back = on_rolled_back
        self.op_kwargs = op_kwargs or {}
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.poll_interval = max(1, int(poll_interval))
        self.timeout = timeout
        self.max_waits = max_waits

    def execute(self, context) -> Any:
        machine = self.deploy(**self.op_kwargs)
        state = machine.start() | {"started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                                   "waits": 0}
        return self._advance(machine, state)

    def resume(self, context, event: Any = None, state: dict | None = None) -> Any:
        """Back from a trigger: check its event is the one awaited, then the next step."""
        if not isinstance(state, dict) or "waiting" not in state:
            raise AirflowFailException(f"resumed without the deploy's state: {state!r}")
        machine = self.deploy(**self.op_kwargs)
        waiting = state.pop("waiting")
        if "stack" in waiting:
            problem = stack_event_problem(event, waiting)
            if problem and not _failure_of(event, waiting):
                raise StackFailed(problem)  # not the event waited for: nothing to go on from
            if problem:
                return self._advance(machine, state, failed=problem)
            self.log.info("%s of stack %s done", waiting["operation"], waiting["stack"])
        elif not isinstance(event, datetime):
            raise AirflowFailException(f"expected the moment {waiting['until']} from a DateTimeTrigger, got {event!r}")
        return self._advance(machine, state)

    def _advance(self, machine: BlueGreen, state: dict, failed: str | None = None) -> Any:
        try:
            if failed:
                state = machine.stack_failed(state, failed)
            while True:
                state, following = machine.step(state)
                if isinstance(following, Deployed):
                    return self.on_deployed(following, state, **self.op_kwargs)
                if following.stack and settled_now(following.stack, self.aws_conn_id, self.region_name):
                    continue  # over already (moto, a quick change): no deferral, see settled_now
                if following.until is not None and following.until - time.time() < MIN_DEFERRAL:
                    # A trigger that fires at once races the scheduler (see settled_now): wait here.
                    time.sleep(max(0.0, following.until - time.time()))
                    continue
                self._defer(following, state)
        except RolledBack as error:
            self.on_rolled_back(error, state, **self.op_kwargs)
            raise

    def _defer(self, following: Wait, state: dict) -> None:
        state["waits"] = state.get("waits", 0) + 1
        if state["waits"] > self.max_waits:
            raise AirflowFailException(f"production deploy still waiting after {self.max_waits} waits "
                                       f"(phase {state['phase']})")
        if following.stack:
            pending = following.stack
            self.log.info("waiting for %s of stack %s (phase %s)", pending.operation, pending.stack, state["phase"])
            trigger = StackSettledTrigger(
                stack_name=pending.stack, operation=pending.operation, waiter_delay=self.poll_interval,
                waiter_max_attempts=max(1, int(self.timeout // self.poll_interval)), aws_conn_id=self.aws_conn_id,
                region_name=self.region_name)
            self.defer(trigger=trigger, method_name="resume",
                       kwargs={"state": state | {"waiting": pending.to_dict()}},
                       timeout=timedelta(seconds=self.timeout + 4 * self.poll_interval))
        moment = datetime.fromtimestamp(following.until, UTC)
        self.log.info("waiting until %s (phase %s)", moment.isoformat(timespec="seconds"), state["phase"])
        self.defer(trigger=DateTimeTrigger(moment=moment), method_name="resume",
                   kwargs={"state": state | {"waiting": {"until": following.until}}},
                   timeout=timedelta(seconds=max(60.0, following.until - datetime.now(UTC).timestamp()) * 2))
