"""Self-service environments: the request, expiry, launch/destroy/reap logic and the DAGs' shape.

The registry is moto S3 in process; the environment driver is an in-memory fake, except in one
test that runs the real local driver with the sample service.
"""

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from deployline.config import load_pipeline_config
from deployline.environments.base import EnvironmentDriver, EnvironmentInfo, environment_name
from deployline.environments.local import LocalDriver
from deployline.releases import ReleaseRegistry
from deployline.self_service import (
    MIN_TTL_HOURS,
    REAPER_DAG_ID,
    RequestError,
    build_reaper_dag,
    build_self_service_dag,
    candidates,
    destroy_environments,
    expiry_of,
    is_expired,
    provision,
    reap_expired,
    record_launch,
    resolve_request,
    smoke_test,
)

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "bkt"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
V1, V2, V3, V4 = "r1-aaaaaaa111", "r2-bbbbbbb222", "r3-ccccccc333", "r4-ddddddd444"


ADMIN = "admin"  # may launch for alice, bob...: the tests' requests name their owners


@pytest.fixture(scope="module")
def config():
    demo = load_pipeline_config(ROOT / "include" / "pipelines" / "sample_service.yaml")
    return demo.model_copy(update={"self_service": demo.self_service.model_copy(update={"admins": [ADMIN]})})


@pytest.fixture
def registry(s3, config):
    return ReleaseRegistry(s3, BUCKET, config.application)


def artifact(version):
    return {"bucket": BUCKET, "key": f"sample_service/artifacts/{version}/x.tar.gz", "sha256": "0" * 64,
            "uri": f"s3://{BUCKET}/sample_service/artifacts/{version}/x.tar.gz"}


def add_candidate(registry, version, artifact_version=None):
    candidate = {"version": version, "artifact": artifact(artifact_version or version),
                 "application_image": f"ami-{version[-6:]}", "artifact_version": artifact_version or version}
    registry.update(version, candidate=candidate, artifact=candidate["artifact"])


@pytest.fixture
def release(registry):
    """r1 and r3 are candidates; r2 failed acceptance; r4 has not got that far yet."""
    add_candidate(registry, V1)
    registry.update(V2, artifact=artifact(V2))
    add_candidate(registry, V3, artifact_version=V2)  # infrastructure only: reuses r2's artifact
    registry.update(V4, artifact=artifact(V4))
    return registry


def params(**overrides):
    return {"action": "launch", "version": "", "owner": "alice", "size": 1, "ttl_hours": 8} | overrides


# ---------------------------------------------------------------------- the request


def test_an_empty_version_is_the_newest_candidate(release, config):
    request = resolve_request(release, params(), config, NOW, user=ADMIN)
    assert request["version"] == V3 and request["requested_version"] == ""
    assert request["artifact"] == artifact(V2) and request["image_id"] == "ami-ccc333"
    assert request["expected_version"] == V2  # what /version answers: the artifact's version
    assert request["name"] == environment_name("sample_service", "self_service", f"alice:{V3}")
    assert request["expires_at"] == "2025-03-01T20:00:00+00:00"
    assert [r["version"] for r in candidates(release)] == [V3, V1]


def test_a_named_candidate_and_the_same_environment_for_the_same_owner_and_version(release, config):
    first = resolve_request(release, params(version=V1, ttl_hours=MIN_TTL_HOURS), config, NOW, user=ADMIN)
    assert first["version"] == V1 and first["expected_version"] == V1
    assert first["expires_at"] == "2025-03-01T12:00:18+00:00"
    again = resolve_request(release, params(version=V1, owner="Alice", size=2), config, NOW + timedelta(hours=1),
                            user=ADMIN)
    assert again["name"] == first["name"] and again["owner"] == "alice"
    assert resolve_request(release, params(version=V1, owner="bob"), config, NOW, user=ADMIN)["name"] != first["name"]
    assert resolve_request(release, params(version=V3), config, NOW, user=ADMIN)["name"] != first["name"]


@pytest.mark.parametrize("version, says", [
    ("r99-abcdef0", "version r99-abcdef0 of sample_service has no release record"),
    (V2, f"version {V2} of sample_service is not a release candidate"),
    (V4, f"version {V4} of sample_service is not a release candidate"),
])
def test_only_candidates_can_be_launched_and_the_error_lists_the_newest(release, config, version, says):
    with pytest.raises(RequestError) as error:
        resolve_request(release, params(version=version), config, NOW, user=ADMIN)
    assert says in str(error.value)
    assert f"the newest release candidates are: {V3}, {V1}" in str(error.value)


@pytest.mark.parametrize("fields, reason", [
    ({"production": {"result": "rolled_back"}}, "rolled back in production"),
    ({"stages": {"6-capacity": {"result": "failed"}}}, "6-capacity failed"),
    ({"approvals": {"exploratory": {"decision": "rejected"}}}, "exploratory approval rejected"),
])
def test_a_rejected_failed_or_rolled_back_candidate_is_not_offered(release, config, fields, reason):
    release.update(V3, **fields)
    assert [r["version"] for r in candidates(release)] == [V1]
    assert resolve_request(release, params(), config, NOW, user=ADMIN)["version"] == V1
    with pytest.raises(RequestError) as error:
        resolve_request(release, params(version=V3), config, NOW, user=ADMIN)
    assert f"version {V3} of sample_service is no longer a release candidate ({reason})" in str(error.value)
    assert f"the newest release candidates are: {V1}" in str(error.value)


def test_no_candidate_at_all(registry, config):
    registry.update(V1, artifact=artifact(V1))
    with pytest.raises(RequestError, match="sample_service has no release candidate yet"):
        resolve_request(registry, params(), config, NOW, user=ADMIN)
    with pytest.raises(RequestError, match="the newest release candidates are: none yet"):
        resolve_request(registry, params(version=V1), config, NOW, user=ADMIN)


@pytest.mark.parametrize("bad, says", [
    ({"owner": "alice smith"}, "owner: up to 64 letters"),
    ({"owner": "a" * 65}, "owner: up to 64 letters"),
    ({"owner": "x;rm -rf"}, "owner: up to 64 letters"),
    ({"version": "latest"}, "version: a release version like"),
    ({"version": 12}, "version: a release version like"),
    ({"size": 0}, "size: a whole number from 1 to 3 (got 0)"),
    ({"size": 4}, "size: a whole number from 1 to 3 (got 4)"),
    ({"size": 1.5}, "size: a whole number"),
    ({"size": True}, "size: a whole number"),
    ({"size": "many"}, "size: a whole number"),
    ({"ttl_hours": 0}, "ttl_hours: hours from 0.005 to 72"),
    ({"ttl_hours": -1}, "ttl_hours: hours from 0.005 to 72"),
    ({"ttl_hours": 72.5}, "ttl_hours: hours from 0.005 to 72 (got 72.5)"),
    ({"ttl_hours": float("nan")}, "ttl_hours"),
    ({"action": "resize"}, "action: must be one of launch, destroy"),
])
def test_bad_input_is_refused_with_what_to_change(release, config, bad, says):
    with pytest.raises(RequestError) as error:
        resolve_request(release, params(**bad), config, NOW, user=ADMIN)
    assert str(error.value).startswith("invalid self-service request: ")
    assert says in str(error.value)


def test_the_owner_is_who_triggered_the_run(release, config):
    for owner in (None, "", "  "):
        request = resolve_request(release, params(owner=owner), config, NOW, user="Dana")
        assert request["owner"] == "dana"
    assert resolve_request(release, params(owner="dana"), config, NOW, user="dana")["owner"] == "dana"


@pytest.mark.parametrize("owner, user, says", [
    ("alice", "mallory", "owner: alice is not you (mallory): only self_service.admins may launch or destroy"),
    ("", None, "owner: the run has no triggering user to own the environment"),
    ("alice", None, "owner: alice is not you (nobody)"),
])
def test_only_admins_act_for_someone_else(release, config, owner, user, says):
    with pytest.raises(RequestError, match=re.escape(says)):
        resolve_request(release, params(owner=owner), config, NOW, user=user)
    with pytest.raises(RequestError, match=re.escape(says)):  # destroying theirs too
        resolve_request(release, params(action="destroy", owner=owner), config, NOW, user=user)


def test_a_quota_per_owner(release, config):
    from deployline.self_service import quota_problem

    request = resolve_request(release, params(version=V1), config, NOW, user="alice")
    others = ["dl-a", "dl-b", "dl-c"]
    assert quota_problem(others[:2], request, 3) is None
    assert quota_problem(others + [request["name"]], request, 3) is None  # relaunching one of them
    assert quota_problem(others, request, 3) == (
        "alice has 3 self-service environment(s) running (at most 3): dl-a, dl-b, dl-c; destroy one first "
        "(action destroy)")
    assert quota_problem(others, request | {"action": "destroy"}, 3) is None


def test_every_problem_is_listed_at_once(release, config):
    with pytest.raises(RequestError) as error:
        resolve_request(release, {"owner": "x;y", "size": 9, "ttl_hours": 1000}, config, NOW, user=ADMIN)
    assert [p.split(":")[0] for p in str(error.value).split(": ", 1)[1].split("; ")] == ["owner", "size", "ttl_hours"]


def test_numbers_as_strings_and_defaults(release, config):
    request = resolve_request(release, {"owner": "ci-bot@example.com", "size": "2", "ttl_hours": "0.5"}, config, NOW,
                              user=ADMIN)
    assert (request["size"], request["ttl_hours"], request["action"]) == (2, 0.5, "launch")
    defaults = resolve_request(release, {"owner": "bob"}, config, NOW, user=ADMIN)
    assert (defaults["size"], defaults["ttl_hours"], defaults["version"]) == (1, 8, V3)


def test_destroy_needs_no_candidate(release, config):
    one = resolve_request(release, params(action="destroy", version="r77-0123456"), config, NOW, user=ADMIN)
    assert one["name"] == environment_name("sample_service", "self_service", "alice:r77-0123456")
    every = resolve_request(release, params(action="destroy"), config, NOW, user=ADMIN)
    assert every["name"] is None and every["version"] is None


# ---------------------------------------------------------------------- expiry


def test_expiry_comes_from_the_labels():
    assert is_expired({"expires_at": "2025-03-01T11:59:59+00:00"}, NOW)
    assert is_expired({"expires_at": "2025-03-01T12:00:00Z"}, NOW)
    assert not is_expired({"expires_at": "2025-03-01T12:00:01+00:00"}, NOW)
    assert is_expired({"expires_at": "2025-03-01T11:00:00"}, NOW)  # naive: UTC
    assert is_expired({"expires_at": "2025-03-01T13:00:00+02:00"}, NOW)  # 11:00 UTC
    assert not is_expired({"expires_at": "2025-03-01T15:00:00+02:00"}, NOW)  # 13:00 UTC


def test_without_labels_the_registry_decides_and_without_either_nothing_expires():
    running = {"state": "running", "expires_at": "2025-03-01T10:00:00+00:00"}
    assert is_expired({}, NOW, running) and is_expired(None, NOW, running)
    assert not is_expired({}, NOW, running | {"expires_at": "2025-03-02T00:00:00+00:00"})
    assert not is_expired({}, NOW) and expiry_of({"expires_at": "soon"}) is None
    assert not is_expired({"expires_at": "not a time"}, NOW, {"state": "running"})
    assert not is_expired({}, NOW, {"state": "destroyed", "expires_at": "2025-03-01T10:00:00+00:00"})


def test_a_later_registry_expiry_extends_the_label():
    labels = {"expires_at": "2025-03-01T11:00:00+00:00"}
    extended = {"state": "running", "expires_at": "2025-03-01T15:00:00+00:00"}
    assert not is_expired(labels, NOW, extended)
    assert expiry_of(labels, extended) == datetime(2025, 3, 1, 15, tzinfo=UTC)
    # an entry that is not running (an earlier incarnation) never extends anything
    assert is_expired(labels, NOW, extended | {"state": "expired"})
    # and an earlier registry expiry never shortens the label's
    assert not is_expired({"expires_at": "2025-03-01T13:00:00+00:00"}, NOW, {"state": "running",
                                                                             "expires_at": "2025-03-01T10:00:00Z"})


# ---------------------------------------------------------------------- launch, destroy, reap


class FakeDriver(EnvironmentDriver):
    name = "fake"

    def __init__(self):
        self.envs: dict[str, EnvironmentInfo] = {}
        self.torn_down: list[str] = []

    def provision(self, spec):
        if spec.name not in self.envs:  # like the real drivers: labels of the first provision stay
            self.envs[spec.name] = EnvironmentInfo(
                spec.name, spec.application, spec.stage, spec.version, spec.size,
                f"http://127.0.0.1:{20000 + len(self.envs)}", "fake", NOW.isoformat(), dict(spec.labels))
        return self.envs[spec.name]

    def wait_until_healthy(self, name, health_path, timeout):
        return self.envs[name]

    def get(self, name):
        return self.envs.get(name)

    def resize(self, name, size):
        self.envs[name].size = size
        return self.envs[name]

    def teardown(self, name):
        self.torn_down.append(name)
        return self.envs.pop(name, None) is not None

    def list(self, application=None):
        return [e for e in self.envs.values() if application in (None, e.application)]

    def _unused(self, *args):
        raise NotImplementedError("self-service uses no update, health look or router")

    update = health_problem = ensure_router = router = green_spec = test_endpoint = switch = remove_router = _unused


def launch(driver, registry, config, now, run_id, **fields):
    request = resolve_request(registry, params(**fields), config, now, user=ADMIN)
    environment = provision(driver, config, request, run_id)
    return request, environment, record_launch(registry, request, environment, run_id, "admin", now)


def entry_of(registry, version, name):
    return registry.get(version)["self_service"][name]


def test_launch_records_the_environment_and_a_relaunch_reuses_and_extends_it(release, config):
    driver = FakeDriver()
    request, environment, entry = launch(driver, release, config, NOW, "run-1", version=V1, ttl_hours=1)
    assert environment["created"] and environment["labels"] == {
        "owner": "alice", "expires_at": "2025-03-01T13:00:00+00:00", "run_id": "run-1"}
    assert entry_of(release, V1, request["name"]) == entry
    assert entry | {"launched_at": None} == {
        "owner": "alice", "url": environment["endpoint"], "size": 1, "expires_at": "2025-03-01T13:00:00+00:00",
        "launched_at": None, "created_at": NOW.isoformat(), "run_id": "run-1", "state": "running", "reused": False,
        "triggered_by": "admin", "destroyed_at": None, "removed_at": None}

    later = NOW + timedelta(minutes=30)
    _, again, entry = launch(driver, release, config, later, "run-2", version=V1, ttl_hours=2, size=2)
    assert not again["created"] and again["endpoint"] == environment["endpoint"] and again["size"] == 2
    assert entry["reused"] and entry["expires_at"] == "2025-03-01T14:30:00+00:00"  # extended
    _, _, entry = launch(driver, release, config, later, "run-3", version=V1, ttl_hours=0.1)
    assert entry["expires_at"] == "2025-03-01T14:30:00+00:00"  # never shortened
    assert len(driver.envs) == 1

    _, other, _ = launch(driver, release, config, NOW, "run-4", version=V1, owner="bob")
    assert other["created"] and other["endpoint"] != environment["endpoint"] and len(driver.envs) == 2


def test_a_retried_provision_knows_it_created_the_environment(release, config):
    driver = FakeDriver()
    request = resolve_request(release, params(), config, NOW, user=ADMIN)
    assert provision(driver, config, request, "run-1")["created"]
    assert provision(driver, config, request, "run-1")["created"]  # the retry of the same run
    assert not provision(driver, config, request, "run-2")["created"]


def test_destroy_one_or_all_of_an_owner_and_nothing_is_fine(release, config):
    driver = FakeDriver()
    one, *_ = launch(driver, release, config, NOW, "r1", version=V1)
    three, *_ = launch(driver, release, config, NOW, "r2", version=V3)
    bobs, *_ = launch(driver, release, config, NOW, "r3", version=V3, owner="bob")

    request = resolve_request(release, params(action="destroy", version=V1), config, NOW, user=ADMIN)
    result = destroy_environments(driver, release, "sample_service", request, "d1", NOW)
    assert result == {"destroyed": [{"name": one["name"], "version": V1}], "not_found": []}
    assert entry_of(release, V1, one["name"])["state"] == "destroyed"
    assert entry_of(release, V1, one["name"])["destroyed_at"] == NOW.isoformat()

    again = destroy_environments(driver, release, "sample_service", request, "d2", NOW)
    assert again == {"destroyed": [], "not_found": [{"name": one["name"], "version": V1}]}

    unknown = resolve_request(release, params(action="destroy", version="r50-1234567"), config, NOW, user=ADMIN)
    assert destroy_environments(driver, release, "sample_service", unknown, "d3", NOW)["destroyed"] == []
    assert release.get("r50-1234567") is None  # a typo makes no record

    every = resolve_request(release, params(action="destroy"), config, NOW, user=ADMIN)
    result = destroy_environments(driver, release, "sample_service", every, "d4", NOW)
    assert result["destroyed"] == [{"name": three["name"], "version": V3}]
    assert set(driver.envs) == {bobs["name"]}


def test_the_reaper_removes_only_expired_self_service_environments(release, config):
    driver = FakeDriver()
    short, *_ = launch(driver, release, config, NOW, "a", version=V1, ttl_hours=MIN_TTL_HOURS)
    long, *_ = launch(driver, release, config, NOW, "b", version=V1, owner="bob", ttl_hours=1)
    extended, *_ = launch(driver, release, config, NOW, "c", version=V3, ttl_hours=MIN_TTL_HOURS)
    launch(driver, release, config, NOW, "c2", version=V3, ttl_hours=2)  # relaunched: registry says later
    # an acceptance environment and a self-service one without any expiry are never touched
    driver.envs["acc"] = EnvironmentInfo("acc", "sample_service", "acceptance", V3, 1, "u", "fake", "", {})
    driver.envs["bare"] = EnvironmentInfo("bare", "sample_service", "self_service", "r9-9999999", 1, "u", "fake", "",
                                          {})

    assert reap_expired(driver, release, "sample_service", NOW) == {
        "removed": [], "kept": [short["name"], long["name"], extended["name"]], "no_expiry": ["bare"]}
    later = NOW + timedelta(minutes=1)
    result = reap_expired(driver, release, "sample_service", later)
    assert result["removed"] == [short["name"]] and driver.torn_down == [short["name"]]
    entry = entry_of(release, V1, short["name"])
    assert entry["state"] == "expired" and entry["removed_at"] == later.isoformat()
    assert entry_of(release, V1, long["name"])["state"] == "running"
    assert set(driver.envs) == {long["name"], extended["name"], "acc", "bare"}

    result = reap_expired(driver, release, "sample_service", NOW + timedelta(hours=3))
    assert sorted(result["removed"]) == sorted([long["name"], extended["name"]])
    assert set(driver.envs) == {"acc", "bare"}
    assert release.get("r9-9999999") is None


# ---------------------------------------------------------------------- the smoke test


@pytest.fixture
def service():
    answers = {"/health": (200, {"status": "ok"}), "/version": (200, {"version": V2})}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, body = answers.get(self.path, (404, {}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", answers
    server.shutdown()
    server.server_close()


def test_smoke_test_checks_health_and_version(service):
    url, answers = service
    assert smoke_test(url, "/health", V2)["version"] == {"version": V2}
    with pytest.raises(RuntimeError, match=f"/version answers '{V2}', expected '{V3}'"):
        smoke_test(url, "/health", V3)
    answers["/health"] = (503, {"status": "failing"})
    with pytest.raises(RuntimeError, match="GET .*/health failed after 1s: HTTP Error 503"):
        smoke_test(url, "/health", V2, timeout=1)


# ---------------------------------------------------------------------- the real local driver


def test_launch_reuse_and_reap_with_the_local_driver(release, config, s3, tmp_path):
    env = {**os.environ, "DEPLOYLINE_VERSION": V1, "DEPLOYLINE_COMMIT": "abc"}
    subprocess.run([sys.executable, "build.py", "--out", str(tmp_path / "dist")], env=env, check=True,
                   cwd=ROOT / "include" / "sample-service", capture_output=True)
    published = release.publish(V1, tmp_path / "dist" / f"sample-service-{V1}.tar.gz", tmp_path / "publish")
    release.update(V1, candidate=release.get(V1)["candidate"] | {"artifact": published[0].to_dict()})
    driver = LocalDriver(s3, config.environments.local, root=tmp_path / "environments")
    try:
        now = datetime.now(UTC)
        request, environment, entry = launch(driver, release, config, now, "run-1", version=V1,
                                             ttl_hours=MIN_TTL_HOURS)
        driver.wait_until_healthy(request["name"], "/health", 30)
        assert smoke_test(entry["url"], "/health", V1)["version"]["version"] == V1
        _, again, _ = launch(driver, release, config, now, "run-2", version=V1, ttl_hours=MIN_TTL_HOURS)
        assert not again["created"] and again["endpoint"] == environment["endpoint"]
        assert driver.get(request["name"]).labels["run_id"] == "run-1"

        assert reap_expired(driver, release, "sample_service", now)["removed"] == []
        assert reap_expired(driver, release, "sample_service", now + timedelta(seconds=19))["removed"] == [
            request["name"]]
        assert driver.list() == [] and not (tmp_path / "environments" / request["name"]).exists()
    finally:
        for info in driver.list():
            driver.teardown(info.name)


# ---------------------------------------------------------------------- the DAGs


def test_the_self_service_dag_is_a_form(config):
    dag = build_self_service_dag(config)
    assert dag.dag_id == "sample_service_self_service" and dag.schedule is None
    assert sorted(dag.tags) == ["deployline", "sample_service"]
    assert "Trigger" in dag.doc_md and "self_service_reaper" in dag.doc_md
    schema = {name: dag.params.get_param(name).schema for name in dag.params}
    assert schema["action"]["enum"] == ["launch", "destroy"] and dag.params["action"] == "launch"
    assert schema["version"]["pattern"] == r"^(r\d+-[0-9a-f]{7,40})?$" and dag.params["version"] == ""
    assert (schema["size"]["type"], schema["size"]["minimum"], schema["size"]["maximum"]) == ("integer", 1, 3)
    assert dag.params["size"] == config.environments.sizes.self_service
    assert (schema["ttl_hours"]["type"], schema["ttl_hours"]["minimum"], schema["ttl_hours"]["maximum"]) == (
        "number", MIN_TTL_HOURS, config.self_service.max_ttl_hours)
    assert dag.params["ttl_hours"] == config.self_service.default_ttl_hours
    assert schema["owner"]["pattern"] == r"^$|^[A-Za-z0-9._@+-]{1,64}$"
    # Empty by default: the owner is the user who triggers the run (Airflow records it).
    assert dag.params["owner"] == ""
    assert all(s.get("title") for s in schema.values())
    assert all(dag.params.get_param(name).description for name in dag.params)


def test_the_self_service_dag_launches_or_destroys_and_cleans_up_failed_launches(config):
    tasks = build_self_service_dag(config).task_dict
    upstream = {tid: sorted(t.upstream_task_ids) for tid, t in tasks.items()}
    assert upstream == {
        "validate_request": [],
        "choose_action": ["validate_request"],
        "provision_environment": ["choose_action", "validate_request"],
        "wait_until_healthy": ["provision_environment"],
        "smoke_test": ["validate_request", "wait_until_healthy"],
        "record_environment": ["provision_environment", "smoke_test", "validate_request"],
        "remove_failed_launch": ["provision_environment", "record_environment", "validate_request"],
        "destroy_environment": ["choose_action", "validate_request"],
    }
    assert type(tasks["choose_action"]).__name__ == "BranchPythonOperator"
    # a setup and its teardown, which removes only what a failed launch made (it is no leaf: a failed
    # launch fails the run)
    assert tasks["provision_environment"].is_setup and tasks["remove_failed_launch"].is_teardown
    assert tasks["remove_failed_launch"].trigger_rule == "all_done_setup_success"
    assert [t.task_id for t in tasks.values() if t.is_setup or t.is_teardown] == [
        "provision_environment", "remove_failed_launch"]


def test_the_reaper_dag(config):
    other = config.model_copy(update={"application": "billing"})
    dag = build_reaper_dag([config, other])
    assert dag.dag_id == REAPER_DAG_ID and dag.max_active_runs == 1 and not dag.catchup and dag.doc_md
    assert str(dag.schedule) == "@hourly"
    assert sorted(dag.task_dict) == ["reap_billing", "reap_sample_service"]
    assert build_reaper_dag([]).task_dict == {}
