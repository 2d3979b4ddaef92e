"""Stage 0's launch and destroy tasks defer once per stack operation and keep their results across deferrals.

moto (in process) plays CloudFormation; the trigger itself is tested in test_stack_readiness.py, so
here each deferral is answered with the event the trigger would send.
"""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import TaskDeferred
from deployline import infrastructure as infra
from deployline import stack_readiness
from deployline.infrastructure_operator import SupportInfrastructureOperator
from deployline.stack_readiness import StackSettledTrigger
from test_support_infrastructure import ami, aws, clients, config, moto_stack  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Tried to parse AWS"),
    pytest.mark.filterwarnings("ignore:Exception.DependencyViolationError"),
]


@pytest.fixture
def airflow_side(monkeypatch, clients, config):  # noqa: F811
    """What the task reads when it runs: the infrastructure config and the Airflow connection's clients.

    Every stack operation still looks in progress at the task's one look before deferring (moto
    finishes them at once; on AWS they take minutes), so the task defers."""
    monkeypatch.setattr(infra, "load_infrastructure_config", lambda: config)
    monkeypatch.setattr(infra, "clients_from_airflow", lambda _config: clients)
    monkeypatch.setattr(stack_readiness, "settled_now", lambda *args: False)


def success(pending: dict) -> dict:
    return {"status": "success", "stack_name": pending["stack"], "operation": pending["operation"]}


def drive(op, answer=success):
    """Run the task as Airflow would: execute, then resume after every deferral with ``answer``'s event."""
    waits = []
    try:
        return op.execute({}), waits
    except TaskDeferred as deferred:
        current = deferred
    while True:
        assert isinstance(current.trigger, StackSettledTrigger) and current.method_name == "resume"
        waits.append(current.kwargs["pending"])
        try:
            return op.resume({}, event=answer(current.kwargs["pending"]), **current.kwargs), waits
        except TaskDeferred as deferred:
            current = deferred


def test_launch_defers_once_per_stack_and_reports_every_component(airflow_side, config):  # noqa: F811
    op = SupportInfrastructureOperator(task_id="launch", action="launch", plan={"components": list(infra.COMPONENTS)})
    results, waits = drive(op)
    assert waits == [{"stack": config.stack_name(c), "operation": "create"} for c in infra.COMPONENTS]
    assert [(r["component"], r["action"], r["stack"]) for r in results] == [
        (c, "created", config.stack_name(c)) for c in infra.COMPONENTS]
    assert results[0]["parameters"] and results[0]["outputs"]["VpcId"]

    # Again: nothing to do, nothing to wait for.
    again, waits = drive(op)
    assert waits == [] and {r["action"] for r in again} == {"unchanged"}


def test_a_failed_stack_fails_the_launch_with_its_reasons(airflow_side, config):  # noqa: F811
    op = SupportInfrastructureOperator(task_id="launch", action="launch",
                                       plan={"components": ["network", "notifications"]})

    def fail_notifications(pending):
        if pending["stack"] == config.stack_name("network"):
            return success(pending)
        return {"status": "error", "stack_name": pending["stack"], "operation": "create",
                "message": f"create of stack {pending['stack']} ended ROLLBACK_IN_PROGRESS: Topic "
                           "(AWS::SNS::Topic) CREATE_FAILED: KMS key not accessible"}

    with pytest.raises(infra.InfrastructureError) as failed:
        drive(op, fail_notifications)
    assert str(failed.value).startswith("notifications: create of stack deployline-notifications ended "
                                        "ROLLBACK_IN_PROGRESS: Topic (AWS::SNS::Topic) CREATE_FAILED")
    assert [r.component for r in failed.value.done] == ["network"]


def test_resume_refuses_a_bad_event(airflow_side):
    op = SupportInfrastructureOperator(task_id="launch", action="launch", plan={"components": ["network"]})
    state = infra.new_state() | {"started": True, "current": {"component": "network", "then": "created", "notes": []}}
    pending = {"stack": "deployline-network", "operation": "create"}
    for event in (None, {"status": "success", "stack_name": "deployline-other", "operation": "create"}):
        with pytest.raises(infra.InfrastructureError, match="network: (no usable event|the event is about)"):
            op.resume({}, event=event, state=state, pending=pending)
    with pytest.raises(infra.InfrastructureError, match="without the launch's state"):
        op.resume({}, event=success(pending), state=None, pending=pending)


def test_destroy_defers_per_delete_and_removes_everything(airflow_side, aws, config):  # noqa: F811
    infra.launch(infra.clients_from_airflow(config), config, ["artifact_store", "notifications"])
    op = SupportInfrastructureOperator(task_id="destroy", action="destroy",
                                       plan={"components": ["notifications", "artifact_store"], "force": False})
    results, waits = drive(op)
    assert [w["operation"] for w in waits] == ["delete", "delete"]
    assert [(r["component"], r["action"]) for r in results] == [("notifications", "deleted"),
                                                                ("artifact_store", "deleted")]
    assert not {s["StackName"] for s in aws["cloudformation"].describe_stacks()["Stacks"]
                if s["StackStatus"] != "DELETE_COMPLETE"}


def test_a_stack_in_progress_is_waited_for_before_the_destroy_checks(airflow_side, config):  # noqa: F811
    infra.launch(infra.clients_from_airflow(config), config, ["notifications"])
    moto_stack("deployline-notifications").status = "UPDATE_IN_PROGRESS"
    op = SupportInfrastructureOperator(task_id="destroy", action="destroy",
                                       plan={"components": ["notifications"], "force": False})
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.kwargs["pending"] == {"stack": "deployline-notifications", "operation": "settle"}
    moto_stack("deployline-notifications").status = "UPDATE_COMPLETE"
    results, waits = drive(op)
    assert results[0]["action"] == "deleted"


def test_operations_already_over_at_the_first_look_need_no_deferral(airflow_side, monkeypatch, config):  # noqa: F811
    # A deferral whose trigger fires at once races the scheduler (apache/airflow#71172): the task
    # looks once first, and goes on when the stack is done already.
    looked = []
    monkeypatch.setattr(stack_readiness, "settled_now", lambda pending, *a: looked.append(pending.stack) or True)
    op = SupportInfrastructureOperator(task_id="launch", action="launch", plan={"components": list(infra.COMPONENTS)})
    results, waits = drive(op)
    assert waits == [] and looked == [config.stack_name(c) for c in infra.COMPONENTS]
    assert [r["action"] for r in results] == ["created"] * len(infra.COMPONENTS)


def test_only_launch_or_destroy():
    with pytest.raises(ValueError, match="launch or destroy"):
        SupportInfrastructureOperator(task_id="x", action="status", plan={})
