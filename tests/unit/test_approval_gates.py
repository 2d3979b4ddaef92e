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


def test_who_answered_the_required_action():
    assert who_decided(HITL_REJECT, {"note": "ignored"}, MARKED) == {
        "by": "dana", "via": "required action", "at": "2026-11-27T10:00:00Z", "note": "broken"}


def test_who_marked_the_task_last_and_the_note():
    assert who_decided(None, {"note": "tried it"}, MARKED) == {
        "by": "frank", "via": "marked in the UI or REST API", "at": "2026-11-27T10:05:00Z", "note": "tried it"}


def test_nobody_decided():
    assert who_decided(None, {"note": None}, []) == {
        "by": "unknown", "via": "no person (timeout or system)", "at": "", "note": ""}


def test_the_sensor_never_decides_by_itself():
    sensor = AwaitDecisionSensor(task_id="decision", timeout=60, poke_interval=5)
    assert sensor.mode == "reschedule"

    class Run:
        conf = {"version": "r1-abc", "links": {}}

    assert sensor.poke({"dag_run": Run()}) is False


def test_a_rejected_decision_fails_the_wait_without_retries():
    from airflow.sdk.exceptions import AirflowFailException
    from deployline.approvals import AwaitApprovalSensor

    sensor = AwaitApprovalSensor(task_id="await_approval", external_dag_id="shop_approve_production",
                                 external_task_id="decision", deferrable=True, retries=2)
    with pytest.raises(AirflowFailException, match="shop_approve_production: the decision was rejected or timed out"):
        sensor.execute_complete({}, {"status": "failed"})


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
