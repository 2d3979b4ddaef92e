"""Exploratory approval: a person approves or rejects by marking the gate's `decision`, or with
the Required Actions buttons; no decision in time is a rejection; who decided is recorded."""

import json
import time

import boto3
import pytest
from deployline import embedded
from deployline.airflow_api import AirflowApi, AirflowApiError
from deployline.sensors import pipeline_run_id
from harness import APP, CANDIDATE, leftovers

pytestmark = pytest.mark.e2e

PIPELINE, GATE = f"{APP}_pipeline", f"{APP}_approve_exploratory"
AWAIT = "5-exploratory.await_approval"
WAITING = ("deferred", "awaiting_input", "up_for_reschedule")  # a Required Action; or a sensor between looks


def aws(e2e, service):
    return boto3.client(service, endpoint_url=e2e.s3.meta.endpoint_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def approver(e2e):
    return AirflowApi(e2e.api.base, "approver", embedded.password(e2e.home, "approver"))


@pytest.fixture(scope="module")
def inbox(e2e):
    """An SQS queue subscribed to the application's notification topic."""
    sns, sqs = aws(e2e, "sns"), aws(e2e, "sqs")
    topic = sns.create_topic(Name=f"deployline-{APP}")["TopicArn"]
    queue = sqs.create_queue(QueueName="approvals-inbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)

    def read() -> list[dict]:
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(m["Body"]) for m in messages]

    return read


NOTES = {"unattended": "Nobody looks at this one", "approve": "Approve me", "reject": "Reject me",
         "button": "Approve me with the button", "skip": "Someone marks the pipeline's own sensor"}


@pytest.fixture(scope="module")
def candidates(e2e, inbox) -> dict[str, str]:
    """One application change per test, pushed one after the other: their runs overlap.

    After ``inbox``: its queue is subscribed before any of them asks for approval."""
    shas = {}
    for key, note in NOTES.items():
        app = e2e.clone / "src/sample_service/app.py"
        (sha,) = e2e.push({"src/sample_service/app.py": app.read_text() + f"# {note}\n"}, note)
        e2e.pipeline_run(sha, until=("resolve_commit",))  # its own run exists before the next push
        shas[key] = sha
    return shas


def waiting_candidate(e2e, sha: str) -> str:
    """The run id of ``sha`` once its release candidate's approval is being waited for."""
    run, states = e2e.candidate_run(sha)
    assert states[CANDIDATE] == "success", states
    run_id = pipeline_run_id(sha)

    def waiting():
        pipeline = e2e.api.task_instances(PIPELINE, run_id)
        gate = e2e.api.task_instances(GATE, run_id) if _gate_exists(e2e, run_id) else {}
        return pipeline[AWAIT]["state"] == "deferred" and (gate.get("decision") or {}).get("state") in WAITING

    embedded.wait_until(waiting, 120, f"{run_id} to wait for approval", interval=1)
    return run_id


def _gate_exists(e2e, run_id):
    return any(r["dag_run_id"] == run_id for r in e2e.api.runs(GATE))


def approvals(e2e, run_id) -> dict:
    version = e2e.api.run(PIPELINE, run_id)["conf"]["commit"]
    return e2e.record(e2e.version(version)).get("approvals", {})


@pytest.fixture(scope="module")
def unattended(e2e, candidates):
    """A candidate nobody decides on: its approval times out while the other tests run."""
    return waiting_candidate(e2e, candidates["unattended"])


def test_waiting_for_approval_uses_no_worker_slot(e2e, unattended):
    gate_run = e2e.api.run(GATE, unattended)
    pipeline_run = e2e.api.run(PIPELINE, unattended)
    # The gate run is the pipeline run's: same run id and logical date, the release in its conf.
    assert gate_run["logical_date"] == pipeline_run["logical_date"]
    assert gate_run["conf"]["version"].startswith("r") and gate_run["conf"]["links"]["pipeline_run"]
    assert e2e.api.task_instances(PIPELINE, unattended)[AWAIT]["state"] == "deferred"
    assert e2e.api.task_instances(GATE, unattended)["decision"]["state"] == "deferred"
    pool = e2e.api.get("/pools/default_pool")
    # Deferred tasks are counted apart from the running ones: the wait takes no worker slot.
    assert pool["deferred_slots"] >= 1 and not pool["include_deferred"]


def test_approve_by_marking_the_decision_successful(e2e, approver, inbox, candidates):
    run_id = waiting_candidate(e2e, candidates["approve"])
    # Someone who may only look is refused, and the gate goes on waiting.
    viewer = AirflowApi(e2e.api.base, "viewer", embedded.password(e2e.home, "viewer"))
    with pytest.raises(AirflowApiError, match=": 403 "):
        viewer.set_task_state(GATE, run_id, "decision", "success", note="Looks fine to me")
    assert e2e.api.task_instances(GATE, run_id)["decision"]["state"] in WAITING
    approver.set_task_state(GATE, run_id, "decision", "success", note="Tried it in my environment: fine")
    # The release goes on (capacity, pre-production, then production approval, which nobody gives).
    run = e2e.wait_for_tasks(run_id, (AWAIT, "6-capacity.record_capacity"))
    states = e2e.task_states(run)
    assert states[AWAIT] == "success" and states["6-capacity.record_capacity"] == "success", states
    decided = embedded.wait_until(lambda: approvals(e2e, run_id).get("exploratory"), 60, "the decision's record")
    assert decided["decision"] == "approved" and decided["by"] == "approver"
    assert decided["note"] == "Tried it in my environment: fine"
    assert decided["via"] == "marked in the UI or REST API" and decided["at"]
    subjects = [m.get("Subject") for m in inbox()]
    assert f"{APP}: exploratory approval requested" in subjects
    assert any(s and s.endswith("exploratory approved") for s in subjects), subjects


def test_reject_by_marking_the_decision_failed_stops_the_release(e2e, approver, candidates):
    run_id = waiting_candidate(e2e, candidates["reject"])
    approver.set_task_state(GATE, run_id, "decision", "failed", note="Search is broken")
    run = e2e.api.wait_for_run(PIPELINE, run_id, timeout=180)
    assert run["state"] == "failed"
    assert e2e.task_states(run)[AWAIT] == "failed"
    decided = approvals(e2e, run_id)["exploratory"]
    assert (decided["decision"], decided["by"], decided["note"]) == ("rejected", "approver", "Search is broken")
    version = e2e.version(run["conf"]["commit"])
    assert e2e.record(version)["stages"]["5-exploratory"]["result"] == "failed"


def test_marking_the_pipelines_own_sensor_success_approves_nothing(e2e, candidates):
    """An admin skips the gate: `await_approval` marked success, no decision on the gate DAG."""
    run_id = waiting_candidate(e2e, candidates["skip"])
    e2e.api.set_task_state(PIPELINE, run_id, AWAIT, "success", note="no time for the gate")
    run = e2e.api.wait_for_run(PIPELINE, run_id, timeout=600)
    states = e2e.task_states(run)
    assert run["state"] == "failed" and states["7-pre-production.check_release_ready"] == "failed", states
    assert states["7-pre-production.update_environment"] == "upstream_failed", states
    ti = f"/dags/{PIPELINE}/dagRuns/{run_id}/taskInstances/7-pre-production.check_release_ready"
    log = json.dumps(e2e.api.get(f"{ti}/logs/1", full_content="true"))
    assert "may not pass exploratory approval: its exploratory decision is" in log
    assert "marking the pipeline's await_approval success does not" in log
    assert e2e.api.task_instances(PIPELINE, run_id)["7-pre-production.check_release_ready"]["try_number"] == 1
    version = e2e.version(run["conf"]["commit"])
    assert "preproduction" not in e2e.record(version) and "production" not in e2e.record(version)


def test_approve_with_the_required_action_button(e2e, approver, candidates):
    run_id = waiting_candidate(e2e, candidates["button"])
    # A person takes longer than this. An answer that comes before the scheduler has processed
    # the executor's event for the pause meets an Airflow 3.3 race (the late event fails the resumed
    # task); on this loaded 2-core machine that event has come up to 6 s after the pause.
    time.sleep(15)
    approver.request("PATCH", f"/dags/{GATE}/dagRuns/{run_id}/taskInstances/decision/-1/hitlDetails",
                     json={"chosen_options": ["Approve"], "params_input": {"comment": "Ship it"}})
    run = e2e.wait_for_tasks(run_id, (AWAIT,))
    assert e2e.task_states(run)[AWAIT] == "success"
    decided = embedded.wait_until(lambda: approvals(e2e, run_id).get("exploratory"), 60, "the decision's record")
    assert (decided["decision"], decided["by"], decided["note"]) == ("approved", "approver", "Ship it")
    assert decided["via"] == "required action"


def test_rerunning_the_stage_creates_no_second_gate_run(e2e, candidates):
    run_id = pipeline_run_id(candidates["approve"])  # approved on its gate (not the run whose sensor was marked)
    assert e2e.task_states(e2e.api.run(PIPELINE, run_id))[AWAIT] == "success"
    e2e.api.request("POST", f"/dags/{PIPELINE}/clearTaskInstances", json={
        "dry_run": False, "dag_run_id": run_id, "only_failed": False, "reset_dag_runs": True,
        "task_ids": ["5-exploratory.describe_release", "5-exploratory.request_approval", AWAIT]})
    run = e2e.wait_for_tasks(run_id, (AWAIT,))
    states = e2e.task_states(run)
    assert states["5-exploratory.request_approval"] == "skipped"  # the gate run exists already
    assert states[AWAIT] == "success"  # and its decision still stands
    assert [r["dag_run_id"] for r in e2e.api.runs(GATE)].count(run_id) == 1


def test_no_decision_in_time_is_a_rejection(e2e, unattended):
    run = e2e.api.wait_for_run(PIPELINE, unattended, timeout=240)
    assert run["state"] == "failed"
    assert e2e.api.task_instances(GATE, unattended)["decision"]["state"] == "failed"
    decided = approvals(e2e, unattended)["exploratory"]
    assert decided["decision"] == "timed_out"
    assert leftovers(e2e, stages=("acceptance",))["environment_processes"] == []
