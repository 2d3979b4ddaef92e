"""Self-service environments: launched, reused, destroyed from the form, removed by the reaper.

Everything goes through the REST API (triggers, run and task states, logs, XCom), the S3 API
(the release registry) and plain HTTP to the environments.  This module runs after the other
e2e modules (which assert that no environment is left after each of their tests), and
destroys every environment it launched when it ends.
"""

import json
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

import psutil
import pytest
from deployline import embedded
from deployline.airflow_api import AirflowApi, AirflowApiError
from deployline.environments.base import environment_name
from deployline.environments.local import LocalDriver
from deployline.releases import ReleaseRegistry, revision_of
from deployline.sensors import pipeline_run_id
from harness import APP, BUCKET, leftovers

pytestmark = pytest.mark.e2e

DAG_ID = f"{APP}_self_service"
REAPER = "self_service_reaper"
LAUNCH = ("validate_request", "choose_action", "provision_environment", "wait_until_healthy", "smoke_test",
          "record_environment")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def name_of(owner: str, version: str) -> str:
    return environment_name(APP, "self_service", f"{owner}:{version}")


def get_json(url: str) -> dict:
    with OPENER.open(url, timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read())


def answers(url: str) -> bool:
    try:
        get_json(f"{url}/health")
        return True
    except (OSError, urllib.error.URLError):
        return False


def environment_folders(e2e) -> set[str]:
    root = e2e.home / "deployline" / "environments"
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.exists() else set()


def session_processes(e2e) -> list[tuple[int, str]]:
    """Environment processes (workers, proxies) of this session's Airflow: other sessions on the
    same machine may run environments of their own."""
    root = str(e2e.home / "deployline" / "environments")
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        if (proc.info["cwd"] or "").startswith(root) or any(arg.startswith(root) for arg in cmdline):
            found.append((proc.info["pid"], " ".join(cmdline)))
    return found


class Forms:
    """Fills in the self-service form through the REST API, remembering every owner it launched for."""

    def __init__(self, e2e):
        self.e2e = e2e
        self.owners: set[str] = set()

    def post(self, dag_id: str, conf: dict) -> str:
        """Trigger a run; returns its id. The session's Airflow runs on SQLite, whose lock can time out
        under load ("Database error", 500): that is tried again, with the same run id."""
        run_id = f"e2e__{uuid.uuid4().hex[:16]}"
        for attempt in range(4):
            try:
                return self.e2e.api.trigger(dag_id, conf=conf, run_id=run_id)["dag_run_id"]
            except AirflowApiError as exc:
                if " 409 " in str(exc) and attempt:
                    return run_id  # the earlier attempt did create it
                if " 500 " not in str(exc) or attempt == 3:
                    raise
                time.sleep(2)

    def trigger(self, dag_id: str = DAG_ID, **conf) -> dict:
        if conf.get("action", "launch") == "launch" and conf.get("owner"):
            self.owners.add(conf["owner"].lower())
        return self.e2e.api.wait_for_run(dag_id, self.post(dag_id, conf), timeout=300)

    def launch(self, **conf) -> dict:
        run = self.trigger(**conf)
        assert run["state"] == "success", self.e2e.task_states(run)
        return run

    def entry(self, owner: str, version: str) -> dict:
        return self.e2e.record(version)["self_service"][name_of(owner, version)]

    def xcom(self, run: dict, task_id: str):
        value = self.e2e.api.get(
            f"/dags/{run['dag_id']}/dagRuns/{run['dag_run_id']}/taskInstances/{task_id}/xcomEntries/return_value"
        )["value"]
        return json.loads(value) if isinstance(value, str) else value

    def log(self, run: dict, task_id: str, try_number: int = 1) -> str:
        content = self.e2e.api.get(
            f"/dags/{run['dag_id']}/dagRuns/{run['dag_run_id']}/taskInstances/{task_id}/logs/{try_number}",
            full_content="true")["content"]
        return json.dumps(content)


@pytest.fixture(scope="module")
def forms(e2e):
    forms = Forms(e2e)
    yield forms
    # Whatever happened: destroy everything this module launched, through the form first (the
    # destroy runs side by side)...
    runs = {}
    for owner in sorted(forms.owners):
        try:
            runs[owner] = forms.post(DAG_ID, {"action": "destroy", "owner": owner})
        except Exception as exc:  # the backstop below still runs
            print(f"destroying the environments of {owner} through the form failed: {exc}")
    for owner, run_id in runs.items():
        try:
            forms.e2e.api.wait_for_run(DAG_ID, run_id, timeout=300)
        except Exception as exc:
            print(f"destroying the environments of {owner} through the form failed: {exc}")
    # ...then directly, so that no process outlives the session whatever failed.
    driver = LocalDriver(e2e.s3, root=e2e.home / "deployline" / "environments")
    stray = [info.name for info in driver.list(APP) if info.stage == "self_service"]
    for name in stray:
        driver.teardown(name)
    assert stray == [], "the destroy runs left environments behind"
    left = leftovers(e2e, stages=("self_service",))
    assert left["environment_processes"] == [] and left["environment_folders"] == []


@pytest.fixture(scope="module")
def candidate(e2e):
    """The seed's release record, once it is a candidate (its run goes on to wait for approval)."""
    version, run_id = e2e.version(e2e.seed), pipeline_run_id(e2e.seed)

    def recorded():
        record = e2e.record(version) or {}
        if record.get("candidate"):
            return record, None
        runs = [r for r in e2e.api.runs(f"{APP}_pipeline") if r["dag_run_id"] == run_id]
        return (record, e2e.task_states(runs[0])) if runs and runs[0]["state"] == "failed" else None

    record, failed = embedded.wait_until(recorded, 900, f"release candidate {version}", interval=3)
    assert failed is None, f"the pipeline run of the seed failed: {failed}"
    return record


@pytest.fixture(scope="module")
def alice(forms, candidate):
    """alice's environment of the seed's candidate (8 hours), launched once for the module."""
    forms.launch(owner="alice", version=candidate["version"], ttl_hours=8)
    return forms.entry("alice", candidate["version"])


def test_bad_requests_are_refused_and_provision_nothing(e2e, forms, candidate):
    before = environment_folders(e2e)
    version = candidate["version"]
    for conf, field in [
        ({"version": version, "owner": "mallory; rm -rf /"}, "owner"),
        ({"version": version, "owner": "mallory", "size": 4}, "size"),  # over the maximum (3)
        ({"version": version, "owner": "mallory", "ttl_hours": 500}, "ttl_hours"),
        ({"version": "latest", "owner": "mallory"}, "version"),
        ({"action": "resize", "owner": "mallory"}, "action"),
    ]:
        with pytest.raises(AirflowApiError) as refused:
            forms.post(DAG_ID, conf)
        assert " 400 " in str(refused.value) and f"Invalid input for param {field}" in str(refused.value), conf

    # A well-formed version that is not a candidate passes the form, and validate_request stops it.
    run = forms.trigger(owner="mallory", version="r999-abcdef1")
    states = e2e.task_states(run)
    assert run["state"] == "failed"
    assert states["validate_request"] == "failed"
    assert {states[t] for t in LAUNCH[1:]} | {states["destroy_environment"]} == {"upstream_failed"}
    assert states["remove_failed_launch"] == "upstream_failed"  # nothing was provisioned
    log = forms.log(run, "validate_request")
    assert "version r999-abcdef1 of sample_service has no release record" in log
    newest, _ = offered_and_rolled_back(e2e)
    assert f"the newest release candidates are: {newest['version']}" in log
    assert environment_folders(e2e) == before
    assert e2e.record("r999-abcdef1") is None

    # A release that rolled back in production is no longer offered, even by name.
    rolled_back = offered_and_rolled_back(e2e)[1][-1]["version"]
    run = forms.trigger(owner="mallory", version=rolled_back)
    assert run["state"] == "failed" and e2e.task_states(run)["validate_request"] == "failed"
    assert f"version {rolled_back} of sample_service is no longer a release candidate (rolled back in production)" \
        in forms.log(run, "validate_request")
    assert environment_folders(e2e) == before

    # Someone who is not in self_service.admins launches for someone else: refused, nothing started.
    approver = AirflowApi(e2e.api.base, "approver", embedded.password(e2e.home, "approver"))
    run_id = approver.trigger(DAG_ID, conf={"owner": "alice", "version": version})["dag_run_id"]
    run = e2e.api.wait_for_run(DAG_ID, run_id, timeout=300)
    assert run["state"] == "failed" and e2e.task_states(run)["validate_request"] == "failed"
    assert "owner: alice is not you (approver): only self_service.admins may" in forms.log(run, "validate_request")
    assert environment_folders(e2e) == before


def test_launch_from_the_form_serves_the_candidate_and_a_relaunch_reuses_it(e2e, forms, candidate, alice):
    version = candidate["version"]
    expected = candidate["candidate"]["artifact_version"]
    assert alice["state"] == "running" and alice["owner"] == "alice" and alice["size"] == 1
    assert get_json(f"{alice['url']}/health")["status"] == "ok"
    assert get_json(f"{alice['url']}/version")["version"] == expected
    assert name_of("alice", version) in environment_folders(e2e)

    run = forms.launch(owner="Alice", version=version, ttl_hours=9)  # the same owner, however typed
    states = e2e.task_states(run)
    assert {states[t] for t in LAUNCH} == {"success"}
    assert states["destroy_environment"] == "skipped"
    assert states["remove_failed_launch"] == "success" and "stays up" in forms.log(run, "remove_failed_launch")
    again = forms.entry("alice", version)
    assert again["url"] == alice["url"] and again["created_at"] == alice["created_at"] and again["reused"]
    assert again["expires_at"] > alice["expires_at"]  # extended
    assert forms.xcom(run, "record_environment")["url"] == alice["url"]
    assert "REUSED" in forms.log(run, "record_environment") and alice["url"] in forms.log(run, "record_environment")

    forms.launch(owner="bob", version=version, size=2)
    bob = forms.entry("bob", version)
    assert bob["url"] != alice["url"] and bob["size"] == 2 and not bob["reused"]
    assert get_json(f"{bob['url']}/version")["version"] == expected
    assert answers(alice["url"])


def offered_and_rolled_back(e2e) -> tuple[dict, list[dict]]:
    """The newest candidate that was neither rejected, failed nor rolled back; the rolled-back ones."""
    records = [r for r in ReleaseRegistry(e2e.s3, BUCKET, APP).records() if r.get("candidate")]
    rolled_back = [r for r in records if (r.get("production") or {}).get("result") == "rolled_back"]

    def judged(record):
        decisions = (record.get("approvals") or {}).values()
        return (record in rolled_back
                or any(d.get("decision") == "rejected" or d.get("refused") for d in decisions)
                or any(e.get("result") == "failed" for s, e in (record.get("stages") or {}).items()
                       if s not in ("5-exploratory", "8-production")))

    return next(r for r in reversed(records) if not judged(r)), rolled_back


def test_an_empty_version_launches_the_newest_candidate_never_a_rolled_back_one(e2e, forms, candidate):
    """Issue 18: a rolled-back (or rejected, or failed) version was offered as the newest candidate."""
    newest, rolled_back = offered_and_rolled_back(e2e)
    assert rolled_back, "test_production leaves a release that rolled back in production"
    assert revision_of(rolled_back[-1]["version"]) > revision_of(newest["version"])
    run = forms.launch(owner="carol")
    assert forms.xcom(run, "validate_request")["version"] == newest["version"]
    entry = forms.entry("carol", newest["version"])
    assert get_json(f"{entry['url']}/version")["version"] == newest["candidate"]["artifact_version"]


def test_the_reaper_removes_expired_environments_only(e2e, forms, candidate, alice):
    version = candidate["version"]
    forms.launch(owner="erin", version=version, ttl_hours=0.005)  # 18 seconds
    erin = forms.entry("erin", version)
    assert answers(erin["url"])
    wait = (datetime.fromisoformat(erin["expires_at"]) - datetime.now(UTC)).total_seconds() + 1
    time.sleep(max(0.0, wait))

    run = forms.trigger(REAPER)
    assert run["state"] == "success", e2e.task_states(run)
    reaped = forms.xcom(run, f"reap_{APP}")
    assert name_of("erin", version) in reaped["removed"] and name_of("alice", version) in reaped["kept"]
    assert not answers(erin["url"])
    assert name_of("erin", version) not in environment_folders(e2e)
    erin = forms.entry("erin", version)
    assert erin["state"] == "expired" and erin["removed_at"]
    assert answers(alice["url"]) and forms.entry("alice", version)["state"] == "running"


def test_destroy_through_the_form(e2e, forms, candidate):
    version = candidate["version"]
    forms.launch(owner="dave", version=version)
    dave = forms.entry("dave", version)
    assert answers(dave["url"])

    run = forms.launch(action="destroy", owner="dave", version=version)
    states = e2e.task_states(run)
    assert states["destroy_environment"] == "success" and states["provision_environment"] == "skipped"
    assert forms.xcom(run, "destroy_environment")["destroyed"] == [{"name": name_of("dave", version),
                                                                      "version": version}]
    assert not answers(dave["url"]) and name_of("dave", version) not in environment_folders(e2e)
    dave = forms.entry("dave", version)
    assert dave["state"] == "destroyed" and dave["destroyed_at"]

    # Destroying what does not exist says so, and succeeds.
    run = forms.launch(action="destroy", owner="dave", version=version)
    assert forms.xcom(run, "destroy_environment") == {
        "destroyed": [], "not_found": [{"name": name_of("dave", version), "version": version}]}
    assert "nothing to destroy" in forms.log(run, "destroy_environment")


def test_a_failed_launch_leaves_nothing(e2e, forms, candidate, alice):
    # A candidate whose service will not answer its version: the smoke test fails after provisioning.
    registry = ReleaseRegistry(e2e.s3, BUCKET, APP)
    broken = "r900-0badc0ffee"
    registry.update(broken, candidate=candidate["candidate"] | {"version": broken, "artifact_version": broken})
    before = environment_folders(e2e)
    try:
        run = forms.trigger(owner="frank", version=broken)
        states = e2e.task_states(run)
        assert run["state"] == "failed"
        assert {states[t] for t in LAUNCH[:4]} == {"success"}
        assert states["smoke_test"] == "failed" and states["record_environment"] == "upstream_failed"
        assert states["remove_failed_launch"] == "success"
        assert "this launch failed" in forms.log(run, "remove_failed_launch")
        assert f"expected '{broken}'" in forms.log(run, "smoke_test")
        assert environment_folders(e2e) == before
        assert registry.get(broken)["self_service"][name_of("frank", broken)]["state"] == "failed"
        assert answers(alice["url"])  # nobody else's environment was touched
    finally:
        e2e.s3.delete_object(Bucket=BUCKET, Key=f"{APP}/releases/{broken}.json")
