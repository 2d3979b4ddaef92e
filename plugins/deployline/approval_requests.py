"""An approval request that is withdrawn once the pipeline run that asked for it cannot go on.

``5-exploratory`` and ``6-capacity`` run side by side. When the load tests fail, the release
is over, yet the gate's Required Action would stay open until someone answered it or it timed
out. ``WithdrawableApprovalOperator`` is Airflow's ``ApprovalOperator`` (the Required Actions
buttons, marking ``decision``) whose wait also watches the pipeline run: when one of
``watched_task_ids`` there failed, or the run's own wait for this decision has ended, its
trigger answers the request (Reject, with the comment "Withdrawn: <reason>", for the Required
Actions page) and the task ends *skipped*. The pipeline's ``await_approval`` then ends skipped
too, so the run finishes at once.

It waits deferred, in ``WithdrawableHITLTrigger`` (Airflow's ``HITLTrigger`` plus that look),
rather than parked in ``awaiting_input``: a parked task cannot look at anything, and waking it
now and then to look would open Airflow's resume race (apache/airflow#71172) at every wake.
A button press resumes a deferred task just as it resumes a parked one.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.triggers.hitl import HITLTrigger
from airflow.sdk.exceptions import AirflowSkipException, TaskAwaitingInput
from airflow.triggers.base import TriggerEvent

WITHDRAWN = "withdrawn"
# What the pipeline's tasks end in when they make the decision pointless.
ENDED_BADLY = frozenset({"failed", "upstream_failed"})
ENDED = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})


def withdrawal_reason(states: dict[str, str | None], watched: list[str], wait_task_id: str) -> str | None:
    """Why the request is withdrawn, from the pipeline run's task states (None: it still stands)."""
    # The tasks that failed themselves, not those that then could not run (upstream_failed).
    failed = [t for t in watched if states.get(t) == "failed"] or [
        t for t in watched if states.get(t) in ENDED_BADLY]
    if failed:
        return f"{', '.join(failed)} {states[failed[0]]} in the pipeline run: the release cannot go on"
    if states.get(wait_task_id) in ENDED:
        return f"the pipeline run's {wait_task_id} ended {states[wait_task_id]}: nobody waits for this decision"
    return None


class WithdrawableHITLTrigger(HITLTrigger):
    """``HITLTrigger`` that also looks at the requesting pipeline run every ``poke_interval``.

    :param pipeline_dag_id: the pipeline whose run (``run_id``) asked for the decision.
    :param run_id: that run's id (the gate run has the same).
    :param wait_task_id: the pipeline's task that waits for the decision.
    :param watched_task_ids: pipeline tasks whose failure ends the release.
    The other parameters are ``HITLTrigger``'s.
    """

    def __init__(self, *, pipeline_dag_id: str, run_id: str, wait_task_id: str,
                 watched_task_ids: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pipeline_dag_id, self.run_id, self.wait_task_id = pipeline_dag_id, run_id, wait_task_id
        self.watched_task_ids = list(watched_task_ids or [])

    def serialize(self) -> tuple[str, dict]:
        _, kwargs = super().serialize()
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                kwargs | {"pipeline_dag_id": self.pipeline_dag_id, "run_id": self.run_id,
                          "wait_task_id": self.wait_task_id, "watched_task_ids": self.watched_task_ids})

    async def withdrawal(self) -> str | None:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=self.pipeline_dag_id, run_ids=[self.run_id], task_ids=[*self.watched_task_ids, self.wait_task_id])
        return withdrawal_reason(states.get(self.run_id) or {}, self.watched_task_ids, self.wait_task_id)

    async def run(self):
        while True:
            if self.timeout_datetime and self.timeout_datetime < datetime.now(UTC):
                yield await self._handle_timeout()
                return
            event = await self._handle_response()
            if event:  # a person's answer comes first
                yield event
                return
            try:
                reason = await self.withdrawal()
            except Exception:  # a failed look is no reason to withdraw: look again
                self.log.warning("could not read the states of %s %s", self.pipeline_dag_id, self.run_id,
                                 exc_info=True)
                reason = None
            if reason:
                await self.answer_withdrawn(reason)
                yield TriggerEvent({WITHDRAWN: reason})
                return
            await asyncio.sleep(self.poke_interval)

    async def answer_withdrawn(self, reason: str) -> None:
        """The request's own answer, so that the Required Actions page says what happened. Written
        here: a trigger may answer its request (HITLTrigger does for a timeout's defaults), a task's
        own process may not. An answer names an option: Reject, said to be a withdrawal."""
        from airflow.sdk.execution_time.hitl import update_hitl_detail_response
        from asgiref.sync import sync_to_async

        await sync_to_async(update_hitl_detail_response)(
            ti_id=self.ti_id, chosen_options=["Reject"], params_input={"comment": f"Withdrawn: {reason}"})


class WithdrawableApprovalOperator(ApprovalOperator):
    """``ApprovalOperator`` whose request is withdrawn when the requesting pipeline run cannot use it.

    :param pipeline_dag_id: the pipeline whose run (same run id as this gate run) asked.
    :param wait_task_id: the pipeline's task that waits for this decision (``5-exploratory.await_approval``).
    :param watched_task_ids: pipeline tasks whose failure ends the release (the other branch).
    :param look_seconds: how often the trigger looks for an answer and at the pipeline run.
    """

    def __init__(self, *, pipeline_dag_id: str, wait_task_id: str, watched_task_ids: list[str] | None = None,
                 look_seconds: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.pipeline_dag_id = pipeline_dag_id
        self.wait_task_id = wait_task_id
        self.watched_task_ids = list(watched_task_ids or [])
        self.look_seconds = look_seconds

    def execute(self, context):
        try:
            super().execute(context)  # writes the request (the Required Action), then parks
        except TaskAwaitingInput:
            pass  # waits deferred instead, to look at the pipeline run too
        timeout = datetime.now(UTC) + self.response_timeout if self.response_timeout else None
        self.defer(
            trigger=WithdrawableHITLTrigger(
                ti_id=context["task_instance"].id, options=self.options, defaults=self.defaults,
                params=self.serialized_params, multiple=self.multiple, timeout_datetime=timeout,
                poke_interval=self.look_seconds, pipeline_dag_id=self.pipeline_dag_id, run_id=context["run_id"],
                wait_task_id=self.wait_task_id, watched_task_ids=self.watched_task_ids),
            method_name="execute_complete",
        )

    def execute_complete(self, context, event: dict):
        if WITHDRAWN in event:  # answered by the trigger (WithdrawableHITLTrigger.answer_withdrawn)
            self.log.info("approval request withdrawn: %s", event[WITHDRAWN])
            raise AirflowSkipException(f"{WITHDRAWN}: {event[WITHDRAWN]}")
        return super().execute_complete(context, event)
