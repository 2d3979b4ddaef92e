"""Deployline on a real Celery cluster: two workers that share nothing but the database, the broker,
git and S3 (issue 16, item 4).

(a) A pushed commit goes from poll to production, both approvals given through the REST API, its
tasks spread over both workers, the local environments' tasks on worker 1 (their queue).
(b) The same while the worker running a ``2-commit`` task is killed (SIGKILL, its whole process
tree, as when its machine dies): the scheduler sees the task's heartbeat stop, the retry runs on
the other worker from the build in S3, and the release still reaches production. Nothing is left
running.
"""

from __future__ import annotations

import json
import time
import urllib.request

import psutil
import pytest
from deployline import embedded, embedded_cluster
from deployline.airflow_api import AirflowApi
from deployline.sensors import pipeline_run_id
from harness import APP, leftovers

pytestmark = pytest.mark.distributed

PIPELINE = f"{APP}_pipeline"
KILLED_TASK = "2-commit.unit_test"
# A unit test that takes a while (a user's slow test): the worker is killed while it runs.
SLOW_TEST = """import time


def test_a_slow_integration():
    time.sleep(20)
"""


@pytest.fixture(scope="module")
def approver(cluster):
    return AirflowApi(cluster.api.base, "approver", embedded.password(cluster.home, "approver"))


def worker_of(cluster, pid: int | None) -> str | None:
    """The Celery worker whose process tree runs ``pid`` (the task instance's process)."""
    if not pid:
        return None
    roots = {cluster.stack.pid(w.name): w.name for w in cluster.cluster.workers}
    try:
        process = psutil.Process(pid)
        for ancestor in [process, *process.parents()]:
            if ancestor.pid in roots:
                return roots[ancestor.pid]
    except psutil.NoSuchProcess:
        return None
    return None


def follow(cluster, approver, sha: str, on_running=None, timeout: float = 900) -> tuple[dict, dict]:
    """Take ``sha``'s polled run to its end: approve each gate when it waits; record which worker
    runs each try of each task. ``on_running(task_id, ti, worker)`` is called for running tasks."""
    run_id = pipeline_run_id(sha)
    ran_on: dict[tuple[str, int], str] = {}
    approved: set[str] = set()
    deadline = time.monotonic() + timeout
    embedded.wait_until(lambda: any(r["dag_run_id"] == run_id for r in cluster.api.runs(PIPELINE)), 240,
                        f"poll to start {run_id}", interval=2)
    while time.monotonic() < deadline:
        embedded.raise_if_a_stack_failed()
        tis = cluster.api.task_instances(PIPELINE, run_id)
        for task_id, ti in tis.items():
            if ti["state"] == "running":
                worker = worker_of(cluster, ti.get("pid"))
                if worker:
                    ran_on[(task_id, ti["try_number"])] = worker
                if on_running:
                    on_running(task_id, ti, worker)
        for gate in ("exploratory", "production"):
            gate_dag = f"{APP}_approve_{gate}"
            if gate in approved or not any(r["dag_run_id"] == run_id for r in cluster.api.runs(gate_dag)):
                continue
            decision = cluster.api.task_instances(gate_dag, run_id).get("decision") or {}
            if decision.get("state") in ("deferred", "awaiting_input", "up_for_reschedule"):
                approver.set_task_state(gate_dag, run_id, "decision", "success", note=f"{gate}: approved on Celery")
                approved.add(gate)
        run = cluster.api.run(PIPELINE, run_id)
        if run["state"] in ("success", "failed"):
            return run, ran_on
        time.sleep(0.5)
    raise AssertionError(f"{run_id} did not end in {timeout}s; tasks: "
                         f"{ {t: ti['state'] for t, ti in cluster.api.task_instances(PIPELINE, run_id).items()} }")


def production_serves(cluster) -> str:
    live = json.loads(cluster.s3.get_object(Bucket=cluster.bucket, Key=f"{APP}/production.json")["Body"].read())
    with urllib.request.urlopen(f"{live['endpoint']}/version", timeout=10) as answer:
        serving = json.loads(answer.read())["version"]
    assert serving == live["version"]
    return serving


def test_a_pushed_commit_goes_from_poll_to_production_on_two_workers(cluster, approver):
    # The seeded commit was pushed before Airflow started: the scheduled poll finds it.
    run, ran_on = follow(cluster, approver, cluster.seed)
    states = cluster.task_states(run)
    assert run["state"] == "success", states
    assert production_serves(cluster) == cluster.version(cluster.seed)
    workers = {w for w in ran_on.values()}
    assert workers == {"worker-1", "worker-2"}, ran_on  # the default queue is served by both
    on_host = {task for (task, _), worker in ran_on.items() if worker == "worker-1"}
    environment_tasks = {task for (task, _) in ran_on if task.endswith(
        ("provision_environment", "wait_until_healthy", "acceptance_test", "load_test_expected", "load_test_peak",
         "update_environment", "smoke_test", "deploy", "ensure_production_address"))}
    assert environment_tasks and environment_tasks <= on_host, ran_on  # only the environments' host runs those
    # Task logs went to S3 (remote logging), not to a folder the workers share.
    logs = cluster.s3.list_objects_v2(Bucket="deployline-logs", Prefix="logs/").get("KeyCount", 0)
    assert logs > 20


def test_a_worker_killed_during_the_commit_stage_costs_a_retry_not_the_release(cluster, approver):
    sha = cluster.push({"tests/unit/test_slow_integration.py": SLOW_TEST}, "Add a slow integration test")[0]
    killed: dict = {}

    def kill_it(task_id, ti, worker):
        if task_id == KILLED_TASK and ti["try_number"] == 1 and worker and not killed:
            cluster.stack.hold(worker)  # its machine stays away until the retry has started elsewhere
            killed.update(worker=worker, pids=embedded_cluster.kill_worker(cluster.stack, worker),
                          at=time.monotonic())
        if killed and task_id == KILLED_TASK and ti["try_number"] == 2 and worker and "retry_on" not in killed:
            killed["retry_on"] = worker
            cluster.stack.release(killed["worker"])  # back, as Compose's `restart: always` would

    run, ran_on = follow(cluster, approver, sha, on_running=kill_it)
    states = cluster.task_states(run)
    assert killed, f"{KILLED_TASK} was never seen running: {ran_on}"
    assert run["state"] == "success", states
    ti = cluster.api.task_instances(PIPELINE, run["dag_run_id"])[KILLED_TASK]
    assert ti["state"] == "success" and ti["try_number"] == 2, ti
    other = {"worker-1": "worker-2", "worker-2": "worker-1"}[killed["worker"]]
    assert killed.get("retry_on") == other, (killed, ran_on)
    assert production_serves(cluster) == cluster.version(sha)
    # Nothing the killed worker ran is still running; the supervisor brought it back.
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in killed["pids"])
    assert embedded.wait_until(lambda: cluster.stack.component(killed["worker"]).proc.poll() is None, 60,
                               f"{killed['worker']} to be back")
    assert any(killed["worker"] in event for event in cluster.stack.events)


def test_nothing_is_left_behind(cluster):
    found = leftovers(cluster)
    assert found == {"builder_instances": [], "stacks": [], "environment_processes": [],
                     "environment_folders": []}, found
