"""Stage 0's ``launch`` and ``destroy`` tasks: one component's stack operation after the other, each
waited for in the triggerer, so a launch holds no worker slot while CloudFormation works.

``deployline.infrastructure`` (pydantic models, AWS code) and the trigger (the amazon provider) are
imported when the task runs, not when the DAG is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

log = logging.getLogger(__name__)


class SupportInfrastructureOperator(BaseOperator):
    """Launches or destroys the support infrastructure's components in dependency order.

    Each step (``infrastructure.launch_step`` / ``destroy_step``) starts one stack operation; the
    task defers to ``stack_readiness.StackSettledTrigger`` until it has ended and resumes in :meth:`resume`
    with the step's state, so it defers once per stack operation. A failed operation fails the
    task with CloudFormation's reasons, after logging the components finished before it. Returns
    one dict per component (``action``, ``component``, ``stack``, ``outputs``, ``parameters``,
    ``notes``), as ``infrastructure.launch``/``destroy`` do.

    :param action: ``launch`` or ``destroy``
    :param plan: the ``plan`` task's output: ``{"components": [...], "force": bool}`` (templated)
    :param deferrable: wait in the triggerer (True) or in this task, blocking a worker slot (False)
    :param poll_interval: seconds between looks at a stack in progress
    :param timeout: seconds one stack operation may take
    """

    template_fields: Sequence[str] = ("plan",)
    ui_color = "#f3e5c0"

    def __init__(self, *, action: str, plan: Any, deferrable: bool = True, poll_interval: int = 15,
                 timeout: float = 3600, **kwargs):
        super().__init__(**kwargs)
        if action not in ("launch", "destroy"):
            raise ValueError(f"action must be launch or destroy, got {action!r}")
        self.action = action
        self.plan = plan
        self.deferrable = deferrable
        self.poll_interval = max(1, int(poll_interval))
        self.timeout = timeout

    def execute(self, context) -> list[dict]:
        from deployline import infrastructure

        return self._go_on(infrastructure.new_state())

    def resume(self, context, event: dict[str, Any] | None = None, state: dict | None = None,
               pending: dict | None = None) -> list[dict]:
        """Back from ``StackSettledTrigger``: fail with CloudFormation's reasons, or take the next step."""
        from deployline import infrastructure
        from deployline.stack_readiness import stack_event_problem

        if not isinstance(state, dict) or not isinstance(pending, dict):
            raise infrastructure.InfrastructureError(f"resumed without the launch's state: {state!r}, {pending!r}")
        problem = stack_event_problem(event, pending)
        if problem:
            self._log_done(state)
            component = (state.get("current") or {}).get("component")
            raise infrastructure.InfrastructureError(f"{component + ': ' if component else ''}{problem}",
                                                     done=infrastructure.results(state))
        return self._go_on(state)

    def _go_on(self, state: dict) -> list[dict]:
        from deployline import infrastructure
        from deployline.stack_readiness import StackSettledTrigger, settled_now

        config = infrastructure.load_infrastructure_config()
        clients = infrastructure.clients_from_airflow(config)
        options = {"force": bool(self.plan.get("force"))} if self.action == "destroy" else {}
        step = infrastructure.launch_step if self.action == "launch" else infrastructure.destroy_step
        try:
            while (pending := step(clients, config, self.plan["components"], state, **options)) is not None:
                if settled_now(pending, config.conn_id, config.region):
                    continue  # over already: the next component, no deferral (see settled_now)
                self.log.info("waiting for %s of stack %s", pending.operation, pending.stack)
                if self.deferrable:
                    self.defer(
                        trigger=StackSettledTrigger(
                            stack_name=pending.stack, operation=pending.operation, waiter_delay=self.poll_interval,
                            waiter_max_attempts=max(1, int(self.timeout // self.poll_interval)),
                            aws_conn_id=config.conn_id, region_name=config.region),
                        method_name="resume", kwargs={"state": state, "pending": pending.to_dict()},
                        timeout=timedelta(seconds=self.timeout + 4 * self.poll_interval))
                infrastructure._settle(clients, pending.stack)
        except infrastructure.InfrastructureError:
            self._log_done(state)
            raise
        self._log_done(state)
        return state["done"]

    def _log_done(self, state: dict) -> None:
        from deployline import infrastructure

        for result in infrastructure.results(state):
            self.log.info("%s", result.line())
