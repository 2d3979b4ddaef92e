"""Approval gates: ``<app>_approve_<gate>`` DAGs and the pipeline tasks that ask and wait.

A gate run is created by the pipeline's ``request_approval`` with the pipeline run's own
run id and logical date; its task ``decision`` waits for a person.  Marking ``decision``
success approves, failed rejects (the note is the comment); with the human-in-the-loop
mode the Approve and Reject buttons on the Required Actions page do the same.  The
pipeline waits with a deferrable ``ExternalTaskSensor``, so a waiting release holds no
worker slot.  ``record_decision`` writes who decided, when and why to the release record.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from airflow.providers.amazon.aws.operators.sns import SnsPublishOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.providers.standard.sensors.external_task import ExternalTaskSensor
from airflow.sdk import DAG, BaseSensorOperator, Param, TriggerRule, chain, get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from deployline import notifications
from deployline.airflow_api import api_from_connection
from deployline.approval_requests import WITHDRAWN, WithdrawableApprovalOperator, withdrawal_reason
from deployline.config import PipelineConfig
from deployline.dag_defaults import START_DATE, default_args
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow

log = logging.getLogger(__name__)

GATES = ("exploratory", "production")
GATE_STAGES = {"exploratory": "5-exploratory", "production": "8-production"}  # the stage each gate belongs to
APPROVED, REJECTED, TIMED_OUT = "approved", "rejected", "timed_out"
AWAIT_TASK = "await_approval"  # in each gate's stage of the pipeline
# The other branch of the fan-in: when one of these fails, the exploratory request is withdrawn.
WITHDRAWS = {"exploratory": ("6-capacity.provision_environment", "6-capacity.wait_until_healthy",
                             "6-capacity.load_test_expected", "6-capacity.load_test_peak",
                             "6-capacity.record_capacity")}

GATE_DOC = """\
## {app}: {gate} approval

One run per pipeline run that asks for {gate} approval (same run id). Task `decision`
waits for a person with the `{role}` role:

* **Approve**: mark `decision` as *success* (Task Instance, "Mark as", with a note as
  your comment){hitl_hint}.
* **Reject**: mark it *failed* (or Reject). The release stops at this stage.

No decision within {hours:g} hours counts as a rejection. When the pipeline run can no
longer use a decision (a load test failed next to exploratory testing, or the run's own
wait ended), the request is **withdrawn**: `decision` ends *skipped*, answered Reject with
the comment "Withdrawn: <reason>", and nobody needs to decide. `record_decision` writes the
decision, the person, the time and the note to the release record, and a message goes
to the application's notification topic. The release under decision is described in
this run's conf (version, commit, images, links).
"""


def gate_dag_id(config: PipelineConfig, gate: str) -> str:
    return f"{config.application}_approve_{gate}"


class AwaitApprovalSensor(ExternalTaskSensor):
    """Waits (deferred) for the gate's ``decision``; a rejection or timeout fails at once.

    It retries only the Airflow deferral race (see ``approval_tasks``), never a decision.
    """

    def execute_complete(self, context, event=None):
        if event and event.get("status") == "failed":
            raise AirflowFailException(f"{self.external_dag_id}: the decision was rejected or timed out "
                                       f"(decision {event.get('status')}); the release stops here")
        if event and event.get("status") == "skipped":
            raise AirflowSkipException(f"{self.external_dag_id}: the approval request was withdrawn (the "
                                       "release cannot go on: see the gate run's decision)")
        return super().execute_complete(context, event)


class AwaitDecisionSensor(BaseSensorOperator):
    """Waits until a person marks it success (approve) or failed (reject); never succeeds by itself.

    Reschedule mode: between looks it holds no worker slot.  Its timeout is the approval
    timeout, after which it fails: no decision is a rejection.
    """

    ui_color = "#fff3cd"

    def __init__(self, *, pipeline_dag_id: str, wait_task_id: str, watched_task_ids: list[str] | None = None,
                 **kwargs):
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.pipeline_dag_id = pipeline_dag_id
        self.wait_task_id = wait_task_id
        self.watched_task_ids = list(watched_task_ids or [])

    def poke(self, context) -> bool:
        conf = context["dag_run"].conf or {}
        ti = context["ti"]
        states = ti.get_task_states(dag_id=self.pipeline_dag_id, run_ids=[ti.run_id],
                                    task_ids=[*self.watched_task_ids, self.wait_task_id])
        reason = withdrawal_reason(states.get(ti.run_id) or {}, self.watched_task_ids, self.wait_task_id)
        if reason:
            raise AirflowSkipException(f"{WITHDRAWN}: {reason}")
        self.log.info("waiting for a person to approve or reject %s (%s)", conf.get("version"), conf.get("links", {}))
        return False


def decision_outcome(state: str | None, hitl: dict | None, timed_out: bool) -> str:
    """approved / rejected / timed_out / withdrawn, from the Required Action's answer, else the decision's state.

    The answer comes first: it exists as soon as the person presses the button, while the
    task's own state turns success only once the task has resumed.
    """
    if state == "skipped":
        return WITHDRAWN  # the pipeline run could not use a decision any more (approval_requests)
    chosen = (hitl or {}).get("chosen_options")
    if chosen == ["Approve"]:
        return APPROVED
    if chosen == ["Reject"]:
        return REJECTED
    if state == "success":
        return APPROVED
    return TIMED_OUT if timed_out else REJECTED


def who_decided(hitl: dict | None, task_instance: dict | None, events: list[dict]) -> dict:
    """The person and comment, from the HITL response or else from the REST API (note, event log)."""
    if hitl and hitl.get("responded_by_user"):
        user = hitl["responded_by_user"]
        params = hitl.get("params_input") or {}
        return {"by": user.get("name") or user.get("id"), "via": "required action",
                "at": str(hitl.get("responded_at") or ""), "note": params.get("comment") or ""}
    marks = [e for e in events if e.get("event") == "patch_task_instance"]
    latest = max(marks, key=lambda e: e.get("when") or "", default=None)
    return {
        "by": (latest or {}).get("owner") or "unknown",
        "via": "marked in the UI or REST API" if latest else "no person (timeout or system)",
        "at": (latest or {}).get("when") or "",
        "note": (task_instance or {}).get("note") or "",
    }


RECORD_LOOKS = 15  # looks, 2 s apart, for the gate's record of a decision that succeeded


class ApprovalNotRecorded(RuntimeError):
    """The gate's decision succeeded but ``record_decision`` has not written it yet: a retry waits for it."""


def approval_problem(gate: str, state: str | None, decided: dict, commit: dict, separate_duties: bool) -> str | None:
    """Why the release may not pass ``gate`` (None: it may): from the gate's ``decision`` task state
    in Airflow and the approval the release record names. Raises ApprovalNotRecorded while the
    decision succeeded but is not recorded yet."""
    if state != "success":
        return (f"its {gate} decision is {state or 'not there'} in Airflow: only the gate's own decision approves "
                f"(marking the pipeline's await_approval success does not)")
    if not decided:
        raise ApprovalNotRecorded(f"the {gate} decision succeeded but the release record does not name it yet")
    if decided.get("decision") != APPROVED:
        return f"the release record says its {gate} approval is {decided.get('decision')}"
    by = str(decided.get("by") or "")
    if not by or by == "unknown":
        return f"the release record names nobody who approved {gate} ({decided.get('via')})"
    if separate_duties and by.lower() in _identities(commit):
        return (f"{by} approved {gate} for their own commit {commit.get('sha', '')[:10]} "
                f"({commit.get('author')} <{commit.get('email')}>): approvals.separate_duties asks for someone else")
    return None


def _identities(commit: dict) -> set[str]:
    email = str(commit.get("email") or "").lower()
    return {x for x in (str(commit.get("author") or "").lower(), email, email.split("@")[0]) if x}


def verify_approval(config: PipelineConfig, gate: str, commit: dict, ti, run_id: str) -> dict:
    """The recorded approval of ``gate`` for this run; fails the task (no retry) when there is none.

    Read from Airflow's own record of the gate run (the ``decision`` task's state, through the
    task's own API, no login) and from the release record that ``record_decision`` wrote.
    """
    registry = ReleaseRegistry.for_config(config)
    for look in range(RECORD_LOOKS):
        states = ti.get_task_states(dag_id=gate_dag_id(config, gate), run_ids=[run_id], task_ids=["decision"])
        state = (states.get(run_id) or {}).get("decision")
        decided = ((registry.get(commit["version"]) or {}).get("approvals") or {}).get(gate) or {}
        try:
            problem = approval_problem(gate, state, decided, commit, config.approvals.separate_duties)
            break
        except ApprovalNotRecorded:
            if look == RECORD_LOOKS - 1:
                raise  # the task's retries look again later
            time.sleep(2)  # record_decision runs right after the decision: seconds
    if problem:
        # The gate's stage ends here, failed, with the reason: no stage of a finished run stays "running".
        fields = {"stages": {GATE_STAGES[gate]: {"result": "failed", "finished_at": utcnow(), "run_id": run_id,
                                                 "error": f"approval refused: {problem}"}}}
        if "separate_duties" in problem:
            fields["approvals"] = {gate: decided | {"refused": problem, "refused_at": utcnow()}}
        registry.update(commit["version"], **fields)
        raise AirflowFailException(f"{config.application} {commit['version']} may not pass {gate} approval: {problem}")
    log.info("%s approval of %s: approved by %s (%s) at %s", gate, commit["version"], decided["by"], decided.get("via"),
             decided.get("at"))
    return decided


def build_gate_dag(config: PipelineConfig, gate: str) -> DAG:
    settings = getattr(config.approvals, gate)
    timeout = timedelta(hours=settings.timeout_hours)
    role = config.approvals.approver_role
    # The request is withdrawn when the pipeline run cannot use the decision (approval_requests).
    watching = {"pipeline_dag_id": config.pipeline_dag_id, "wait_task_id": f"{GATE_STAGES[gate]}.{AWAIT_TASK}",
                "watched_task_ids": list(WITHDRAWS.get(gate, ()))}
    with DAG(
        dag_id=gate_dag_id(config, gate),
        description=f"{gate.capitalize()} approval of {config.application} releases",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=64,
        default_args=default_args(),
        tags=["deployline", config.application, "approval"],
        # With the FAB auth manager only this role can edit (decide) runs of this gate.
        access_control={role: {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}}},
        doc_md=GATE_DOC.format(app=config.application, gate=gate, role=role, hours=settings.timeout_hours,
                               hitl_hint=", or press **Approve** on the Required Actions page"
                               if settings.mode == "hitl" else ""),
    ) as dag:
        if settings.mode == "hitl":
            decision = WithdrawableApprovalOperator(
                task_id="decision",
                **watching,
                subject=f"{gate.capitalize()} approval: {config.application} "
                        "{{ dag_run.conf.get('version', '?') }}",
                body="{{ dag_run.conf.get('summary', '') }}",
                params={"comment": Param("", type="string", title="Comment")},
                fail_on_reject=True,
                response_timeout=timeout,
            )
        else:
            # Retries: a failed poke (see docs/PERFORMANCE.md) must not count as a rejection;
            # a person marking it failed is final all the same.
            decision = AwaitDecisionSensor(task_id="decision", timeout=timeout.total_seconds(), poke_interval=30,
                                           retries=3, retry_delay=timedelta(seconds=10), **watching)

        @task(task_id="record_decision", trigger_rule=TriggerRule.ALL_DONE, retries=2)
        def record_decision() -> dict:
            ctx = get_current_context()
            ti, conf = ctx["ti"], ctx["dag_run"].conf or {}
            states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id], task_ids=["decision"])
            state = states.get(ti.run_id, {}).get("decision")
            hitl, task_instance, events = None, None, []
            api = api_from_connection()
            if api is not None:
                path = f"/dags/{ti.dag_id}/dagRuns/{ti.run_id}/taskInstances/decision"
                task_instance = api.get(path)
                events = api.get("/eventLogs", dag_id=ti.dag_id, run_id=ti.run_id, task_id="decision",
                                 event="patch_task_instance", limit=50)["event_logs"]
                if settings.mode == "hitl":
                    detail = api.get(f"{path}/-1/hitlDetails")
                    hitl = detail if detail.get("response_received") else None
            else:
                log.warning("no %r connection: who decided cannot be read from the REST API", "deployline_api")
            started = (task_instance or {}).get("start_date")
            timed_out = api is not None and not events and not hitl
            outcome = decision_outcome(state, hitl, timed_out)
            who = who_decided(hitl, task_instance, events)
            if outcome == WITHDRAWN:
                who = {"by": "pipeline", "via": "withdrawn", "at": utcnow(),
                       "note": ((hitl or {}).get("params_input") or {}).get("comment") or ""}
            decided = {"gate": gate, "decision": outcome, "mode": settings.mode, "requested_at": started,
                       "recorded_at": utcnow(), "run_id": ti.run_id, **who}
            if conf.get("version"):
                ReleaseRegistry.for_config(config).update(conf["version"], approvals={gate: decided})
            notifications.publish(config, f"{config.application} {conf.get('version')}: {gate} {outcome}",
                                  f"{gate} approval of {conf.get('version')} {outcome} by {decided['by']}"
                                  f" ({decided['via']}). Note: {decided['note'] or '-'}\n"
                                  f"Pipeline run: {conf.get('links', {}).get('pipeline_run', '')}")
            log.info("%s approval of %s: %s by %s (%s)", gate, conf.get("version"), outcome, decided["by"],
                     decided["note"])
            return decided

        chain(decision, record_decision())
    return dag


def _record_withdrawn(config: PipelineConfig, gate: str):
    def record_withdrawn(context) -> None:
        commit = context["ti"].xcom_pull(task_ids="resolve_commit")
        if commit:
            ReleaseRegistry.for_config(config).stage_skipped(
                commit["version"], GATE_STAGES[gate], context["run_id"],
                f"{gate} approval request withdrawn: the pipeline run could not use a decision any more")

    return record_withdrawn


def approval_tasks(config: PipelineConfig, gate: str, commit, after) -> tuple:
    """``describe_release -> request_approval (+ notify) -> await_approval`` inside a stage's group.

    ``after`` is the task whose success makes the release eligible (the candidate record):
    ``await_approval`` also follows it, so that a rerun, where ``request_approval`` is skipped
    because the gate run exists, still waits for that same gate run's decision.
    """
    settings = getattr(config.approvals, gate)
    gate_id = gate_dag_id(config, gate)

    @task(task_id="describe_release")
    def describe_release(commit: dict) -> dict:
        ctx = get_current_context()
        record = ReleaseRegistry.for_config(config).get(commit["version"]) or {}
        candidate = record.get("candidate", {})
        links = notifications.links(config, ctx["run_id"], commit["version"], gate)
        deadline = (ctx["dag_run"].start_date + timedelta(hours=settings.timeout_hours)).isoformat()
        summary = (f"**{config.application} {commit['version']}** ({commit['sha'][:10]}: {commit['message']}, "
                   f"by {commit['author']}). Application image `{candidate.get('application_image')}`. "
                   f"Pipeline run: {links['pipeline_run']}. Deadline: {deadline}.")
        return {"application": config.application, "version": commit["version"], "commit": commit["sha"],
                "message": commit["message"], "author": commit["author"],
                "application_image": candidate.get("application_image"), "artifact": candidate.get("artifact"),
                "links": links, "deadline": deadline, "summary": summary}

    release = describe_release(commit)
    request = TriggerDagRunOperator(
        task_id="request_approval",
        trigger_dag_id=gate_id,
        trigger_run_id="{{ run_id }}",
        logical_date="{{ (dag_run.logical_date or dag_run.run_after).isoformat() }}",
        conf=release,
        note=f"{gate} approval requested",
        # A rerun finds the gate run of the first request: never a second one.
        skip_when_already_exists=True,
    )
    notify = SnsPublishOperator(
        task_id="notify_approval_requested",
        target_arn=notifications.topic_task(config),
        subject=f"{config.application}: {gate} approval requested",
        message="{{ ti.xcom_pull(task_ids='" + release.operator.task_id + "')['summary'] }}",
        aws_conn_id=config.aws.conn_id,
        region_name=config.aws.region,
    )
    wait = AwaitApprovalSensor(
        task_id=AWAIT_TASK,
        external_dag_id=gate_id,
        external_task_id="decision",
        allowed_states=["success"],
        failed_states=["failed", "upstream_failed"],
        skipped_states=["skipped"],  # the request was withdrawn (approval_requests)
        deferrable=True,
        poke_interval=5,
        # The gate decides (and times out) first; this only guards against a lost gate run.
        timeout=timedelta(hours=settings.timeout_hours).total_seconds() + 3600,
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
        # Airflow 3.3's scheduler can fail a resumed sensor on the late executor event of its
        # deferral (apache/airflow#71172) when the decision comes seconds after the wait began;
        # the retry asks again. A rejection is not retried (AwaitApprovalSensor).
        retries=2,
        retry_delay=timedelta(seconds=5),
    )
    # A withdrawn request skips the wait: the stage ends skipped in the record, with the reason.
    wait.on_skipped_callback = [_record_withdrawn(config, gate)]
    chain(release, request, [notify, wait])
    after >> wait
    return release, request, wait
