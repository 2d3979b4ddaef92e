"""Stages 6 to 8 through the real scheduler: load tests, the fan-in, blue/green releases, rollback,
superseded releases; approvals are given through the REST API as an approver would."""

import json
import time
from pathlib import Path

import pytest
from deployline import embedded
from deployline.airflow_api import AirflowApi
from deployline.sensors import pipeline_run_id
from harness import APP, ARTIFACTS, STRICT_APP, ClientLoop, environments

pytestmark = pytest.mark.e2e

PIPELINE = f"{APP}_pipeline"
EXPLORATORY_WAIT, PRODUCTION_WAIT = "5-exploratory.await_approval", "8-production.await_approval"
DEPLOY = "8-production.deploy"
STAGES = ("6-capacity", "7-pre-production", "8-production")
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright drives it, it downloads no browser
# As root with no display, and with no call home (this machine's network is closed).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


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
    # The tests were told which build to expect (EXPECTED_VERSION and EXPECTED_COMMIT): none skipped.
    for output in (record["preproduction"]["smoke_output"], record["candidate"]["acceptance_output"]):
        assert " passed" in output[-1] and "skipped" not in output[-1], output
    # Pre-production runs this version at production size.
    preproduction = [s for s in environments(e2e).values() if s["stage"] == "preproduction"]
    assert [(s["version"], len([p for p in s["processes"] if p["role"] == "worker"])) for s in preproduction] == [
        (version, 3)]


def test_a_missed_capacity_threshold_stops_the_release_and_withdraws_the_approval_request(e2e, strict_run):
    """Nobody decides: the failed load test ends the run by itself (issue 18: it waited for an
    exploratory decision that could no longer release anything)."""
    pipeline, gate = f"{STRICT_APP}_pipeline", f"{STRICT_APP}_approve_exploratory"
    run = e2e.api.wait_for_run(pipeline, strict_run, timeout=900)
    states = {t: ti["state"] for t, ti in e2e.api.task_instances(pipeline, strict_run).items()}
    assert run["state"] == "failed"
    assert states["6-capacity.load_test_expected"] == "failed" and states[EXPLORATORY_WAIT] == "skipped", states
    assert states["6-capacity.teardown_environment"] == "success"
    assert {states[t] for t in states if t.startswith(("7-", "8-"))} == {"upstream_failed"}, states
    # The gate says so: its request was answered "withdrawn", with the reason, and nobody decided.
    gate_run = e2e.api.wait_for_run(gate, strict_run, timeout=300)
    assert e2e.api.task_instances(gate, strict_run)["decision"]["state"] == "skipped", gate_run
    hitl = e2e.api.get(f"/dags/{gate}/dagRuns/{strict_run}/taskInstances/decision/-1/hitlDetails")
    assert hitl["response_received"] and hitl["responded_by_user"] is None and hitl["chosen_options"] == ["Reject"]
    assert hitl["params_input"]["comment"].startswith(
        "Withdrawn: 6-capacity.load_test_expected failed in the pipeline run"), hitl
    record = json.loads(e2e.s3.get_object(Bucket="deployline-e2e", Key=f"{STRICT_APP}/releases/"
                                          f"{e2e.version(e2e.seed)}.json")["Body"].read())
    summary = record["load_tests"]["expected"]
    assert not summary["passed"] and summary["requests"] > 0
    assert [c["metric"] for c in summary["checks"] if not c["passed"]] == ["throughput_rps"]
    assert record["stages"]["6-capacity"]["result"] == "failed"
    assert "throughput_rps" in record["stages"]["6-capacity"]["error"]
    assert record["stages"]["5-exploratory"]["result"] == "skipped"  # not left "running"
    assert "request withdrawn" in record["stages"]["5-exploratory"]["reason"]
    decided = record["approvals"]["exploratory"]
    assert (decided["decision"], decided["by"], decided["via"]) == ("withdrawn", "pipeline", "withdrawn")
    assert "6-capacity.load_test_expected failed" in decided["note"]


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
    # Time to restore ends when the previous version serves again, not at the next deploy (DORA).
    attempt = record["deployments"][-1]
    restored = insight(e2e, f"/api/applications/{APP}/metrics", days=1)["time_to_restore"]["restored"]
    incident = next(i for i in restored if i["version"] == version)
    assert incident["restored_by"] == before["version"]
    if attempt["phase"] == "after_switch":
        assert attempt["switched_at"] <= incident["restored_at"] == attempt["restored_at"] <= attempt["at"]
    else:  # production never served it
        assert incident["hours"] == 0


def insight(e2e, path: str, **params):
    """GET a Deployline plugin endpoint on the real API server, as the signed-in user."""
    response = e2e.api.session.get(f"{e2e.api.base}/deployline{path}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def test_delivery_insight_traces_a_release_from_commit_to_production(e2e, two_releases):
    newer = e2e.version(two_releases["newer"])
    plugins = {p["name"]: p for p in e2e.api.get("/plugins")["plugins"]}
    assert [v["name"] for v in plugins["deployline_insight"]["external_views"]] == ["Deployline", "Releases"]
    listing = {a["application"]: a for a in insight(e2e, "/api/applications")["applications"]}
    assert listing[APP]["live_version"] == newer and listing[APP]["releases"] >= 3
    assert listing[STRICT_APP]["live_version"] is None
    rows = {r["version"]: r for r in insight(e2e, f"/api/applications/{APP}/releases")["releases"]}
    assert rows[newer]["production"] == "live"
    assert rows[e2e.version(two_releases["older"])]["production"] == "superseded"

    trace = insight(e2e, f"/api/applications/{APP}/releases/{newer}")
    record = e2e.record(newer)
    assert trace["commit"]["sha"] == two_releases["newer"] and trace["commit"]["message"] == "Newer release"
    assert trace["artifact"]["sha256"] == record["artifact"]["sha256"]
    assert trace["base_image"]["id"].startswith("ami-") and trace["application_image"]["id"].startswith("ami-")
    stages = {s["stage"]: s for s in trace["stages"]}
    for name in ("2-commit", "3-acceptance", "5-exploratory", "6-capacity", "7-pre-production", "8-production"):
        assert stages[name]["result"] == "success", stages[name]
        assert stages[name]["seconds"] > 0, stages[name]  # started_at written by the stage's first task
        assert stages[name]["link"].endswith(f"/runs/{two_releases['newer_run']['dag_run_id']}/tasks/group/{name}")
    assert set(trace["load_tests"]) == {"expected", "peak"}
    assert [(a["gate"], a["decision"], a["by"]) for a in trace["approvals"]] == [
        ("exploratory", "approved", "approver"), ("production", "approved", "approver")]
    assert [d["result"] for d in trace["deployments"]] == ["deployed"]


def test_delivery_metrics_from_real_runs(e2e, first_release, two_releases):
    figures = insight(e2e, f"/api/applications/{APP}/metrics", days=1)
    # Deploys so far: the first release and the newer one; the rollback test adds a failed one.
    frequency, failure = figures["deployment_frequency"], figures["change_failure_rate"]
    assert frequency["deploys"] >= 2 and frequency["per_day"] == frequency["deploys"]
    assert failure["deploys"] - failure["failed"] == frequency["deploys"]
    assert 0 < figures["lead_time"]["median"] < 1  # hours: minutes from commit to live in this suite
    assert figures["stages"]["8-production"]["passed"] >= 2
    assert figures["stages"]["6-capacity"]["seconds"]["count"] >= 2


def test_delivery_metrics_dag_publishes_to_cloudwatch(e2e, two_releases):
    import boto3

    run = e2e.api.trigger("delivery_metrics", conf={"window_days": 1}, run_id="manual__metrics_e2e")
    done = e2e.api.wait_for_run("delivery_metrics", run["dag_run_id"], timeout=180)
    assert done["state"] == "success", e2e.task_states(done)
    cloudwatch = boto3.client("cloudwatch", endpoint_url=e2e.s3.meta.endpoint_url, region_name=embedded.REGION,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
    names = {m["MetricName"] for m in cloudwatch.list_metrics(Namespace=f"Deployline/{APP}")["Metrics"]
             if {"Name": "Window", "Value": "1d"} in m["Dimensions"]}
    assert {"DeploymentsPerDay", "LeadTimeMedian", "ChangeFailureRate", "StagePassRate"} <= names, names


def test_delivery_insight_pages_in_a_browser(e2e, two_releases):
    """The plugin's pages in headless Chromium, signed in with the UI's cookie; screenshots are kept."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (make test installs Debian's chromium when run as root)")
    newer = e2e.version(two_releases["newer"])
    token = e2e.api.session.headers["Authorization"].split()[1]
    shots = ARTIFACTS / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.add_cookies([{"name": "_token", "value": token, "url": e2e.api.base}])
            page = context.new_page()
            # The Airflow UI: "Deployline" in the navigation opens the plugin in the UI's frame.
            page.goto(f"{e2e.api.base}/plugin/deployline")
            page.get_by_text("Deployline", exact=True).first.wait_for(timeout=30_000)
            frame = page.frame_locator("iframe")
            frame.get_by_text("Delivery insight").wait_for(timeout=30_000)
            page.screenshot(path=shots / "airflow-nav-deployline.png")
            for name, path, texts in [
                ("releases", f"/applications/{APP}", [newer, "Newer release", "superseded", "live"]),
                ("release", f"/applications/{APP}/releases/{newer}",
                 [two_releases["newer"], "sha256", "ami-", "approver", "Next one", "deployed", "expected"]),
                ("metrics", f"/applications/{APP}/metrics?days=1",
                 ["Deployment frequency", "Lead time for changes", "Change failure rate", "Time to restore"]),
            ]:
                page.goto(f"{e2e.api.base}/deployline{path}")
                page.screenshot(path=shots / f"{name}.png", full_page=True)
                text = page.inner_text("body")
                for expected in texts:
                    assert expected in text, (name, expected)
            # The pipeline's Releases tab in a 1600 px window shows every column (issue 18: the
            # Production column was cut off).
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(f"{e2e.api.base}/dags/{PIPELINE}/plugin/deployline-releases")
            page.frame_locator("iframe").get_by_text("Production", exact=True).wait_for(timeout=30_000)
            tab = next(f for f in page.frames if "/deployline/pipelines/" in f.url
                       or "/deployline/applications/" in f.url)
            layout = tab.evaluate("""() => {
                const heads = [...document.querySelectorAll('table.releases th')];
                return {width: window.innerWidth, right: heads[heads.length - 1].getBoundingClientRect().right,
                        last: heads[heads.length - 1].textContent};
            }""")
            page.screenshot(path=shots / "dag-releases-tab.png")
            assert layout["last"] == "Production" and layout["right"] <= layout["width"], layout
        finally:
            browser.close()
