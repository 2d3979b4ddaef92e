import pytest
from deployline.approvals import APPROVED, REJECTED, TIMED_OUT, AwaitDecisionSensor, decision_outcome, who_decided

HITL_APPROVE = {"responded_by_user": {"id": "7", "name": "dana"}, "chosen_options": ["Approve"],
                "params_input": {"comment": "ship it"}, "responded_at": "2026-11-27T10:00:00Z"}
HITL_REJECT = HITL_APPROVE | {"chosen_options": ["Reject"], "params_input": {"comment": "broken"}}
MARKED = [{"event": "patch_task_instance", "owner": "erin", "when": "2026-11-27T10:01:00Z"},
          {"event": "patch_task_instance", "owner": "frank", "when": "2026-11-27T10:05:00Z"},
          {"event": "get_task_instance", "owner": "gina", "when": "2026-11-27T10:09:00Z"}]


def test_outcome():
    assert decision_outcome("success", None, timed_out=False) == APPROVED
    assert decision_outcome("success", HITL_APPROVE, timed_out=False) == APPROVED
    assert decision_outcome("failed", HITL_REJECT, timed_out=False) == REJECTED
    # the button was pressed, the task has not resumed yet
    assert decision_outcome("scheduled", HITL_APPROVE, timed_out=False) == APPROVED
    assert decision_outcome("failed", None, timed_out=False) == REJECTED
    assert decision_outcome("failed", None, timed_out=True) == TIMED_OUT
    assert decision_outcome("upstream_failed", None, timed_out=True) == TIMED_OUT
    # Withdrawn by the pipeline: the task skipped itself after answering Reject with the reason.
    assert decision_outcome("skipped", HITL_REJECT | {"responded_by_user": None}, timed_out=False) == "withdrawn"


def test_who_answered_the_required_action():
    assert who_decided(HITL_REJECT, {"note": "ignored"}, MARKED) == {
        "by": "dana", "via": "required action", "at": "2026-11-27T10:00:00Z", "note": "broken"}


def test_who_marked_the_task_last_and_the_note():
    assert who_decided(None, {"note": "tried it"}, MARKED) == {
        "by": "frank", "via": "marked in the UI or REST API", "at": "2026-11-27T10:05:00Z", "note": "tried it"}


def test_nobody_decided():
    assert who_decided(None, {"note": None}, []) == {
        "by": "unknown", "via": "no person (timeout or system)", "at": "", "note": ""}


class Run:
    conf = {"version": "r1-abc", "links": {}}


class PipelineStates:
    """A task instance's ``get_task_states``: the pipeline run's states, as Airflow records them."""

    run_id = "commit__abc"

    def __init__(self, **states):
        self.states, self.asked = states, []

    def get_task_states(self, dag_id, run_ids, task_ids):
        self.asked.append((dag_id, run_ids, task_ids))
        return {self.run_id: {t: self.states.get(t) for t in task_ids}}


WATCHED = ["6-capacity.load_test_expected", "6-capacity.load_test_peak"]
WAIT = "5-exploratory.await_approval"


def test_the_sensor_never_decides_by_itself():
    sensor = AwaitDecisionSensor(task_id="decision", timeout=60, poke_interval=5, pipeline_dag_id="shop_pipeline",
                                 wait_task_id=WAIT, watched_task_ids=WATCHED)
    assert sensor.mode == "reschedule"
    ti = PipelineStates(**{WAIT: "deferred", WATCHED[0]: "running"})
    assert sensor.poke({"dag_run": Run(), "ti": ti}) is False
    assert ti.asked == [("shop_pipeline", ["commit__abc"], [*WATCHED, WAIT])]


@pytest.mark.parametrize(("states", "reason"), [
    ({WATCHED[0]: "failed", WAIT: "deferred"},
     "6-capacity.load_test_expected failed in the pipeline run: the release cannot go on"),
    ({WATCHED[1]: "upstream_failed", WAIT: "deferred"}, "6-capacity.load_test_peak upstream_failed"),
    ({WAIT: "failed"}, "the pipeline run's 5-exploratory.await_approval ended failed: nobody waits"),
])
def test_a_request_the_pipeline_run_cannot_use_is_withdrawn(states, reason):
    from airflow.sdk.exceptions import AirflowSkipException
    from deployline.approval_requests import withdrawal_reason

    assert reason in withdrawal_reason(states, WATCHED, WAIT)
    sensor = AwaitDecisionSensor(task_id="decision", timeout=60, poke_interval=5, pipeline_dag_id="shop_pipeline",
                                 wait_task_id=WAIT, watched_task_ids=WATCHED)
    with pytest.raises(AirflowSkipException, match=f"withdrawn: {reason}"):
        sensor.poke({"dag_run": Run(), "ti": PipelineStates(**states)})


def test_the_reason_names_the_task_that_failed_not_those_that_could_not_run():
    from deployline.approval_requests import withdrawal_reason

    states = {WATCHED[0]: "failed", WATCHED[1]: "upstream_failed", WAIT: "deferred"}
    assert withdrawal_reason(states, WATCHED, WAIT) == (
        "6-capacity.load_test_expected failed in the pipeline run: the release cannot go on")


def test_a_request_still_wanted_stands():
    from deployline.approval_requests import withdrawal_reason

    assert withdrawal_reason({WATCHED[0]: "success", WATCHED[1]: "running", WAIT: "deferred"}, WATCHED, WAIT) is None
    assert withdrawal_reason({WAIT: "up_for_retry"}, [], WAIT) is None  # the deferral race's retry


class HitlTask(PipelineStates):
    id = "0199-ti"


@pytest.fixture
def written(monkeypatch):
    """Answers the task writes to its own HITL detail (the execution API's ti:self)."""
    import airflow.sdk.execution_time.hitl as sdk_hitl

    answers = []
    def update(ti_id, chosen_options, params_input):
        answers.append((ti_id, chosen_options, params_input))

    monkeypatch.setattr(sdk_hitl, "update_hitl_detail_response", update)
    return answers


def operator():
    from datetime import timedelta

    from deployline.approval_requests import WithdrawableApprovalOperator

    return WithdrawableApprovalOperator(
        task_id="decision", subject="s", pipeline_dag_id="shop_pipeline", wait_task_id=WAIT, watched_task_ids=WATCHED,
        response_timeout=timedelta(hours=1), fail_on_reject=True)


def test_a_withdrawn_request_ends_skipped_with_the_reason():
    from airflow.sdk.exceptions import AirflowSkipException

    reason = "6-capacity.load_test_expected failed in the pipeline run: the release cannot go on"
    with pytest.raises(AirflowSkipException, match=f"withdrawn: {reason}"):
        operator().execute_complete({"ti": HitlTask()}, {"withdrawn": reason})


def trigger(**overrides):
    from datetime import UTC, datetime, timedelta

    from deployline.approval_requests import WithdrawableHITLTrigger

    kwargs = dict(ti_id="0199-ti", options=["Approve", "Reject"], params={}, multiple=False,
                  timeout_datetime=datetime.now(UTC) + timedelta(hours=1), poke_interval=0.01,
                  pipeline_dag_id="shop_pipeline", run_id="commit__abc", wait_task_id=WAIT, watched_task_ids=WATCHED)
    return WithdrawableHITLTrigger(**(kwargs | overrides))


def first_event(trigger_):
    import asyncio

    async def first():
        async for event in trigger_.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first(), 10))


def test_the_trigger_survives_serialization_with_what_it_watches():
    classpath, kwargs = trigger().serialize()
    assert classpath == "deployline.approval_requests.WithdrawableHITLTrigger"
    again = trigger(**{k: v for k, v in kwargs.items() if k != "params"})
    assert (again.pipeline_dag_id, again.run_id, again.wait_task_id, again.watched_task_ids) == (
        "shop_pipeline", "commit__abc", WAIT, WATCHED)


def test_the_trigger_withdraws_when_the_other_branch_fails_and_answers_the_request(monkeypatch, written):
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    looks = iter([{WATCHED[0]: "running", WAIT: "deferred"}, {WATCHED[0]: "failed", WAIT: "deferred"}])
    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states",
                        staticmethod(lambda dag_id, run_ids, task_ids: {run_ids[0]: next(looks)}))
    waiting = trigger()

    async def no_answer():
        return None

    monkeypatch.setattr(waiting, "_handle_response", no_answer)
    reason = "6-capacity.load_test_expected failed in the pipeline run: the release cannot go on"
    assert first_event(waiting) == {"withdrawn": reason}
    # The trigger answers (a task's own process may not): an answer names an option, Reject, said
    # to be a withdrawal, for the Required Actions page.
    assert written == [("0199-ti", ["Reject"], {"comment": f"Withdrawn: {reason}"})]


def test_an_answer_comes_before_a_withdrawal(monkeypatch):
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
    from airflow.triggers.base import TriggerEvent

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(
        lambda dag_id, run_ids, task_ids: {run_ids[0]: {WATCHED[0]: "failed"}}))
    answered = trigger()

    async def approve():
        return TriggerEvent({"chosen_options": ["Approve"]})

    monkeypatch.setattr(answered, "_handle_response", approve)
    assert first_event(answered) == {"chosen_options": ["Approve"]}


COMMIT = {"sha": "0123456789abcdef", "version": "r5-0123456", "author": "Dana Dev", "email": "dana@example.com"}
APPROVED_BY_ERIN = {"decision": APPROVED, "by": "erin", "via": "required action", "at": "t"}


@pytest.mark.parametrize(("state", "decided", "separate", "expected"), [
    # The pipeline's own sensor marked success by hand: no decision on the gate.
    (None, {}, False, "its production decision is not there in Airflow"),
    ("running", {}, False, "its production decision is running in Airflow: only the gate's own decision approves"),
    ("failed", {"decision": REJECTED, "by": "erin"}, False, "decision is failed"),
    ("success", {"decision": TIMED_OUT, "by": "erin"}, False, "the release record says its production approval is "
                                                              "timed_out"),
    ("success", {"decision": APPROVED, "by": "unknown", "via": "no person"}, False, "names nobody who approved"),
    ("success", APPROVED_BY_ERIN | {"by": "dana"}, True, "dana approved production for their own commit 0123456789"),
    ("success", APPROVED_BY_ERIN | {"by": "Dana Dev"}, True, "approvals.separate_duties asks for someone else"),
])
def test_only_a_recorded_decision_on_the_gate_approves(state, decided, separate, expected):
    from deployline.approvals import approval_problem

    assert expected in approval_problem("production", state, decided, COMMIT, separate)


def test_an_approval_by_someone_else_passes():
    from deployline.approvals import approval_problem

    assert approval_problem("production", "success", APPROVED_BY_ERIN, COMMIT, separate_duties=True) is None
    assert approval_problem("production", "success", APPROVED_BY_ERIN | {"by": "dana"}, COMMIT, False) is None


def test_a_decision_not_recorded_yet_is_retried():
    from deployline.approvals import ApprovalNotRecorded, approval_problem

    with pytest.raises(ApprovalNotRecorded):
        approval_problem("exploratory", "success", {}, COMMIT, separate_duties=False)


def test_the_load_tests_stop_once_exploratory_ended_without_approval():
    from deployline.capacity_stage import exploratory_ended

    run = "commit__abc"

    def decided(**fields):
        return {"approvals": {"exploratory": {"run_id": run} | fields}}

    assert exploratory_ended({}, run) is None
    assert exploratory_ended(decided(decision="approved", by="erin"), run) is None
    assert exploratory_ended(decided(decision="withdrawn"), run) is None
    assert exploratory_ended(decided(decision="rejected", by="erin"), run) == (
        "exploratory approval rejected by erin: the release cannot go on")
    assert exploratory_ended(decided(decision="timed_out", by="unknown"), run) == (
        "exploratory approval timed out: the release cannot go on")
    # A rejection in an earlier run of the same version does not stop this run's load tests.
    assert exploratory_ended(decided(decision="rejected", by="erin"), "manual__again") is None
