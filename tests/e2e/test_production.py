"""Stages 6 to 8 through the real scheduler: load tests, the fan-in, blue/green releases, rollback,
superseded releases; approvals are given through the REST API as an approver would."""

import json
import time

import pytest
from deployline import embedded
from deployline.airflow_api import AirflowApi
from deployline.sensors import pipeline_run_id
from harness import APP, STRICT_APP, ClientLoop, environments, leftovers

pytestmark = pytest.mark.e2e

PIPELINE = f"{APP}_pipeline"
EXPLORATORY_WAIT, PRODUCTION_WAIT = "5-exploratory.await_approval", "8-production.await_approval"
DEPLOY = "8-production.deploy"
STAGES = ("6-capacity", "7-pre-production", "8-production")


@pytest.fixture(scope="module")
def approver(e2e):
    return AirflowApi(e2e.api.base, "approver", embedded.password(e2e.home, "approver"))


@pytest.fixture(scope="module")
def strict_run(e2e):
    """A run of the strict pipeline, triggered by hand at once: it runs while the other tests do."""
    run = e2e.api.trigger(f"{STRICT_APP}_pipeline", conf={"commit": e2e.seed}, run_id="manual__tight_capacity")
    return run["dag_run_id"]


def push_change(e2e, note: str, files: dict[str, str] | None = None) -> str:
    app = e2e.clone / "src/sample_service/app.py"
    (sha,) = e2e.push(files or {"src/sample_service/app.py": app.read_text() + f"# {note}\n"}, note)
    return sha


def to_production_approval(e2e, approver, sha: str) -> str:
    """Approve exploratory testing; return the run id once production approval is being waited for."""
    run_id = pipeline_run_id(sha)
    e2e.pipeline_run(sha, until=("3-acceptance.record_candidate",))
    e2e.approve(approver, "exploratory", run_id, "Explored: fine")
    run = e2e.wait_for_tasks(run_id, (PRODUCTION_WAIT,), states=("deferred", "success", "failed", "upstream_failed"))
    states = e2e.task_states(run)
    assert states[PRODUCTION_WAIT] == "deferred", states
    return run_id


def release(e2e, approver, sha: str, note: str = "Ship it") -> dict:
    run_id = to_production_approval(e2e, approver, sha)
    e2e.approve(approver, "production", run_id, note)
    return e2e.api.wait_for_run(PIPELINE, run_id, timeout=300)


def production(e2e) -> dict:
    body = e2e.s3.get_object(Bucket="deployline-e2e", Key=f"{APP}/production.json")["Body"].read()
    return json.loads(body)


def serving(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/version", timeout=5) as response:
        return json.loads(response.read())["version"]


@pytest.fixture(scope="module")
def first_release(e2e, approver, strict_run):
    sha = push_change(e2e, "First release to production")
    run = release(e2e, approver, sha, note="First one")
    return sha, run


def test_full_path_to_production(e2e, first_release):
    sha, run = first_release
    states = e2e.task_states(run)
    assert run["state"] == "success", states
    version = e2e.version(sha)
    live = production(e2e)
    assert live["version"] == version and serving(live["endpoint"]) == version
    record = e2e.record(version)
    assert record["stages"]["classify_change"]["result"] == "application"
    for stage in ("2-commit", "3-acceptance", *STAGES):
        assert record["stages"][stage]["result"] == "success", (stage, record["stages"])
    assert {g: record["approvals"][g]["decision"] for g in ("exploratory", "production")} == {
        "exploratory": "approved", "production": "approved"}
    assert record["approvals"]["production"]["note"] == "First one"
    for profile in ("expected", "peak"):
        summary = record["load_tests"][profile]
        assert summary["passed"] and summary["requests"] > 0 and summary["failures"] == 0
        assert summary["throughput_rps"] > 5 and summary["p95_ms"] is not None
        key = summary["reports"][f"{profile}.html"].split("/", 3)[3]
        assert e2e.s3.head_object(Bucket="deployline-e2e", Key=key)["ContentType"] == "text/html"
    assert record["preproduction"]["endpoint"] and record["production"]["result"] == "deployed"
    # Pre-production runs this version at production size.
    preproduction = [s for s in environments(e2e).values() if s["stage"] == "preproduction"]
    assert [(s["version"], len([p for p in s["processes"] if p["role"] == "worker"])) for s in preproduction] == [
        (version, 3)]


def test_a_missed_capacity_threshold_stops_the_release(e2e, approver, strict_run):
    pipeline = f"{STRICT_APP}_pipeline"
    e2e.wait_for_tasks(strict_run, ("6-capacity.load_test_expected",), dag_id=pipeline, timeout=600)
    # Exploratory approval is given anyway: pre-production and production still never start.
    gate = f"{STRICT_APP}_approve_exploratory"
    embedded.wait_until(lambda: e2e.api.task_instances(gate, strict_run).get("decision", {}).get("state")
                        == "awaiting_input", 300, "the strict gate to wait", interval=2)
    time.sleep(5)
    approver.set_task_state(gate, strict_run, "decision", "success", note="Explored anyway")
    run = e2e.api.wait_for_run(pipeline, strict_run, timeout=300)
    states = {t: ti["state"] for t, ti in e2e.api.task_instances(pipeline, strict_run).items()}
    assert run["state"] == "failed"
    assert states["6-capacity.load_test_expected"] == "failed" and states[EXPLORATORY_WAIT] == "success"
    assert states["6-capacity.teardown_environment"] == "success"
    assert {states[t] for t in states if t.startswith(("7-", "8-"))} == {"upstream_failed"}, states
    record = json.loads(e2e.s3.get_object(Bucket="deployline-e2e", Key=f"{STRICT_APP}/releases/"
                                          f"{e2e.version(e2e.seed)}.json")["Body"].read())
    summary = record["load_tests"]["expected"]
    assert not summary["passed"] and summary["requests"] > 0
    assert [c["metric"] for c in summary["checks"] if not c["passed"]] == ["throughput_rps"]
    assert record["stages"]["6-capacity"]["result"] == "failed"
    assert "throughput_rps" in record["stages"]["6-capacity"]["error"]


@pytest.fixture(scope="module")
def two_releases(e2e, approver, first_release):
    """Two newer commits waiting for production approval; the newer is released first, with a
    client on the production address throughout, then the older is approved too."""
    before = production(e2e)
    older = push_change(e2e, "Older release")
    e2e.pipeline_run(older, until=("resolve_commit",))  # its own run, before the next push
    newer = push_change(e2e, "Newer release")
    older_run, newer_run = (to_production_approval(e2e, approver, sha) for sha in (older, newer))
    with ClientLoop(before["endpoint"]) as loop:
        e2e.approve(approver, "production", newer_run, "Next one")
        newer_done = e2e.api.wait_for_run(PIPELINE, newer_run, timeout=300)
        time.sleep(1)
    e2e.approve(approver, "production", older_run, "Late approval")
    older_done = e2e.api.wait_for_run(PIPELINE, older_run, timeout=300)
    return {"before": before, "loop": loop, "older": older, "newer": newer, "older_run": older_done,
            "newer_run": newer_done}


def test_a_blue_green_switch_drops_no_request(e2e, two_releases):
    run, before, loop = two_releases["newer_run"], two_releases["before"], two_releases["loop"]
    assert run["state"] == "success", e2e.task_states(run)
    version = e2e.version(two_releases["newer"])
    assert loop.failed == 0, (loop.statuses, loop.errors[:5])
    assert loop.versions == [before["version"], version] and loop.requests > 100
    record = e2e.record(version)
    assert record["production"]["previous_version"] == before["version"]
    assert record["production"]["switch_seconds"] < 5
    live = [s for s in environments(e2e).values() if s["stage"] == "production"]
    assert [s["version"] for s in live] == [version]  # blue is gone after its drain


def test_an_older_release_is_skipped_as_superseded(e2e, two_releases):
    states = e2e.task_states(two_releases["older_run"])
    assert states[DEPLOY] == "skipped", states
    newer = e2e.version(two_releases["newer"])
    assert production(e2e)["version"] == newer == serving(production(e2e)["endpoint"])
    record = e2e.record(e2e.version(two_releases["older"]))
    assert record["production"]["result"] == "superseded"
    assert record["production"]["live_version"] == newer


def test_an_unhealthy_release_rolls_back(e2e, approver, first_release):
    before = production(e2e)
    settings = {"fail_health_after": 3, "fail_health_stages": ["production"]}
    sha = push_change(e2e, "Goes unhealthy in production", {"settings.json": json.dumps(settings)})
    with ClientLoop(before["endpoint"]) as loop:
        run = release(e2e, approver, sha)
    states = e2e.task_states(run)
    assert run["state"] == "failed" and states[DEPLOY] == "failed", states
    version = e2e.version(sha)
    assert production(e2e)["version"] == before["version"] == serving(before["endpoint"])
    assert loop.errors == [] and before["version"] in loop.versions
    record = e2e.record(version)
    assert record["rollback"]["restored_version"] == before["version"]
    assert record["rollback"]["phase"] in ("before_switch", "after_switch")
    assert "unhealthy" in record["rollback"]["reason"] or "health" in record["rollback"]["reason"]
    assert record["stages"]["8-production"]["result"] == "failed"
    assert not [s for s in environments(e2e).values() if s["stage"] == "production" and s["version"] == version]


def test_nothing_is_left_behind(e2e):
    def settled():
        active = [r for r in e2e.api.runs(PIPELINE) if r["state"] in ("queued", "running")]
        states = [e2e.task_states(r) for r in active]
        # Runs still waiting for a production approval nobody gives have finished 6-capacity.
        return all(s.get(PRODUCTION_WAIT) == "deferred" or s.get("6-capacity.teardown_environment")
                   in ("success", "failed") for s in states)

    embedded.wait_until(settled, 300, "capacity stages to finish", interval=3)
    assert leftovers(e2e, stages=("acceptance", "capacity")) == {
        "builder_instances": [], "stacks": [], "environment_processes": [], "environment_folders": []}
    long_lived = sorted(s["stage"] for s in environments(e2e).values())
    assert long_lived == ["preproduction", "production", "router"], long_lived
