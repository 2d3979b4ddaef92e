"""BlueGreenDeployOperator: the production deploy's steps with its waits deferred (local driver: real
processes and HTTP; the triggers' own waits are tested in test_stack_readiness)."""

import json
import time

import pytest
from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from deployline.blue_green_operator import MIN_DEFERRAL, BlueGreenDeployOperator
from deployline.config import Production
from deployline.deployments import BEFORE_SWITCH, BlueGreen, RolledBack, blue_green
from deployline.stack_readiness import StackFailed
from test_blue_green_local import BUCKET, FAST, V1, V2, ClientLoop, no_smoke, spec, version_at

__all__ = ["BUCKET"]
DRAINING = Production(drain_seconds=MIN_DEFERRAL + 1, verify_seconds=1, check_interval=0.2)


def operator(driver, artifact, settings, outcomes, smoke=no_smoke):
    def deploy(version):
        return BlueGreen(driver, spec(artifact), settings, health_path="/health", health_timeout=30, smoke=smoke)

    return BlueGreenDeployOperator(
        task_id="deploy", deploy=deploy, op_kwargs={"version": spec(artifact).version},
        on_deployed=lambda deployed, state, version: outcomes.setdefault("deployed", (deployed, state)),
        on_rolled_back=lambda error, state, version: outcomes.setdefault("rolled_back", (error, state)))


def test_the_drain_waits_in_the_triggerer_and_blue_goes_after_it(driver, published):
    first = blue_green(driver, spec(published[V1]), FAST, health_path="/health", health_timeout=30, smoke=no_smoke)
    outcomes = {}
    task = operator(driver, published[V2], DRAINING, outcomes)
    with ClientLoop(first.endpoint) as loop:
        with pytest.raises(TaskDeferred) as deferred:
            task.execute(context={})
        # Switched, blue still running for requests in flight; the task waits without a slot.
        assert isinstance(deferred.value.trigger, DateTimeTrigger) and deferred.value.method_name == "resume"
        state = deferred.value.kwargs["state"]
        assert state["phase"] == "drain" and json.loads(json.dumps(state)) == state  # travels as JSON
        assert version_at(first.endpoint) == V2 and {e.version for e in driver.list("shop")} == {V1, V2}
        time.sleep(max(0.0, state["waiting"]["until"] - time.time()))
        # The resumed try (a new process: a new operator, the state from the trigger).
        operator(driver, published[V2], DRAINING, outcomes).resume({}, event=deferred.value.trigger.moment,
                                                                     state=state)
    deployed, final = outcomes["deployed"]
    assert deployed.result == "deployed" and deployed.previous_version == V1
    assert deployed.drained_seconds == DRAINING.drain_seconds
    assert final["started_at"] and [e.version for e in driver.list("shop")] == [V2]
    assert loop.failed == 0 and loop.versions == {V1, V2}


def test_a_short_wait_is_made_in_the_task(driver, published):
    blue_green(driver, spec(published[V1]), FAST, health_path="/health", health_timeout=30, smoke=no_smoke)
    outcomes = {}
    operator(driver, published[V2], FAST, outcomes).execute(context={})  # a 0.5 s drain: no deferral
    assert outcomes["deployed"][0].previous_version == V1 and [e.version for e in driver.list("shop")] == [V2]


def test_a_failed_green_stack_rolls_back_and_is_recorded(driver, published):
    first = blue_green(driver, spec(published[V1]), FAST, health_path="/health", health_timeout=30, smoke=no_smoke)
    outcomes = {}
    green = spec(published[V2]).name
    state = {"phase": "provision", "started": time.time(), "started_at": "t0", "blue": first.environment,
             "blue_version": V1, "green_labels": {}, "waiting": {"stack": green, "operation": "create"}}
    event = {"status": "error", "stack_name": green, "operation": "create", "stack_status": "ROLLBACK_COMPLETE",
             "message": "create of stack failed: Instances: the subnet is in use"}
    with pytest.raises(RolledBack) as caught:
        operator(driver, published[V2], FAST, outcomes).resume({}, event=event, state=state)
    assert caught.value.phase == BEFORE_SWITCH and caught.value.restored == V1
    assert "the subnet is in use" in caught.value.reason and outcomes["rolled_back"][0] is caught.value
    assert version_at(first.endpoint) == V1 and [e.version for e in driver.list("shop")] == [V1]


@pytest.mark.parametrize("waiting, event, error", [
    ({"stack": "dl-x", "operation": "create"}, {"status": "success", "stack_name": "dl-y", "operation": "create"},
     StackFailed),
    ({"stack": "dl-x", "operation": "delete"}, None, StackFailed),
    ({"until": 0}, {"status": "success"}, AirflowFailException),
])
def test_resume_refuses_an_event_it_did_not_wait_for(driver, published, waiting, event, error):
    outcomes = {}
    state = {"phase": "clear", "started": time.time(), "started_at": "t0", "waiting": waiting}
    with pytest.raises(error):
        operator(driver, published[V1], FAST, outcomes).resume({}, event=event, state=state)
    assert outcomes == {} and driver.list("shop") == []


def test_resume_without_state_fails(driver, published):
    with pytest.raises(AirflowFailException, match="without the deploy's state"):
        operator(driver, published[V1], FAST, {}).resume({}, event=None, state=None)
