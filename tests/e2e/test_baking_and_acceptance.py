"""Infrastructure commits bake a base AMI, application commits build; both end as release candidates."""

import pytest
from deployline import embedded
from deployline.airflow_api import AirflowApi
from harness import APP, CANDIDATE, images_of, leftovers

pytestmark = pytest.mark.e2e

BAKING = ("1-baking.resolve_base_image", "1-baking.launch_builder", "1-baking.provision_builder",
          "1-baking.create_base_image", "1-baking.wait_for_base_image", "1-baking.record_base_image",
          "1-baking.terminate_builder")
ACCEPTANCE = ("3-acceptance.select_inputs", "3-acceptance.provision_environment", "3-acceptance.wait_until_healthy",
              "3-acceptance.acceptance_test", "3-acceptance.teardown_environment",
              "3-acceptance.launch_image_builder", "3-acceptance.install_artifact",
              "3-acceptance.create_application_image", "3-acceptance.wait_for_application_image",
              "3-acceptance.terminate_image_builder", "3-acceptance.record_candidate")


GATE = f"{APP}_approve_exploratory"
WAITING = ("deferred", "awaiting_input", "up_for_reschedule")  # a Required Action; or a sensor between looks


def states_of(states, names):
    return {states[n] for n in names}


@pytest.fixture(autouse=True)
def nothing_left_behind(e2e):
    yield
    # Capacity environments of runs that go on belong to 6-capacity (checked in test_production).
    assert leftovers(e2e, stages=("acceptance",)) == {"builder_instances": [], "stacks": [],
                                                      "environment_processes": [], "environment_folders": []}


@pytest.fixture(scope="module")
def seeded(e2e):
    run, states = e2e.candidate_run(e2e.seed)
    assert states[CANDIDATE] == "success", states
    return e2e.record(e2e.version(e2e.seed))


def test_first_release_bakes_builds_and_becomes_a_candidate(e2e, seeded):
    version = e2e.version(e2e.seed)
    images = images_of(e2e, version)
    assert set(images) == {"base", "application"}
    assert all(i["State"] == "available" for i in images.values())
    assert seeded["base_image"]["id"] == images["base"]["ImageId"] and seeded["base_image"]["baked"]
    candidate = seeded["candidate"]
    assert candidate["application_image"] == images["application"]["ImageId"]
    assert candidate["base_image"] == images["base"]["ImageId"]
    assert candidate["artifact"]["sha256"] == seeded["artifact"]["sha256"]
    assert seeded["stages"]["3-acceptance"]["result"] == "success"


def test_application_only_commit_bakes_nothing(e2e, seeded):
    app = e2e.clone / "src/sample_service/app.py"
    (sha,) = e2e.push({"src/sample_service/app.py": app.read_text() + "# An application change.\n"}, "Tweak the app")
    run, states = e2e.candidate_run(sha)
    assert states[CANDIDATE] == "success", states
    assert states_of(states, BAKING) == {"skipped"}
    assert states_of(states, ACCEPTANCE) == {"success"}
    record = e2e.record(e2e.version(sha))
    assert record["classification"]["kind"] == "application"
    assert "baked" not in record["base_image"] or record["base_image"]["version"] != record["version"]
    assert record["artifact_version"] == record["version"]
    assert set(images_of(e2e, record["version"])) == {"application"}


def test_infrastructure_only_commit_bakes_and_reuses_the_artifact(e2e, seeded):
    parent = embedded.git("rev-parse", "HEAD", cwd=e2e.clone)  # the last release, built by an earlier test
    before = e2e.record(e2e.version(parent))
    (sha,) = e2e.push({"infrastructure/provision.sh": (e2e.clone / "infrastructure/provision.sh").read_text()
                       + "# tuned\n"}, "Tune provisioning")
    run, states = e2e.candidate_run(sha)
    assert states[CANDIDATE] == "success", states
    assert states_of(states, BAKING) == {"success"}
    assert {s for t, s in states.items() if t.startswith("2-commit.")} == {"skipped"}
    assert states_of(states, ACCEPTANCE) == {"success"}
    record = e2e.record(e2e.version(sha))
    assert record["classification"]["kind"] == "infrastructure"
    assert record["base_image"]["baked"] and record["base_image"]["id"] != before["base_image"]["id"]
    assert record["artifact"] == before["artifact"]  # the last artifact, reused
    assert record["artifact_version"] == before["version"]
    assert record["candidate"]["base_image"] == record["base_image"]["id"]
    assert set(images_of(e2e, record["version"])) == {"base", "application"}


def test_an_image_rejected_at_exploratory_is_not_reused_by_the_next_commit(e2e, seeded):
    """Issue 18: the next application-only commit reused a rejected base image and released it."""
    approver = AirflowApi(e2e.api.base, "approver", embedded.password(e2e.home, "approver"))
    script = e2e.clone / "infrastructure/provision.sh"
    (risky,) = e2e.push({"infrastructure/provision.sh": script.read_text() + "# risky\n"}, "Risky provisioning")
    run, states = e2e.candidate_run(risky)
    assert states[CANDIDATE] == "success", states
    run_id = run["dag_run_id"]

    def asked():
        gate = {r["dag_run_id"] for r in e2e.api.runs(GATE)}
        return run_id in gate and e2e.api.task_instances(GATE, run_id)["decision"]["state"] in WAITING

    embedded.wait_until(asked, 120, f"{run_id} to ask for exploratory approval", interval=1)
    approver.set_task_state(GATE, run_id, "decision", "failed", note="The new image is slow")
    assert e2e.api.wait_for_run(f"{APP}_pipeline", run_id, timeout=180)["state"] == "failed"
    rejected = e2e.record(e2e.version(risky))
    assert rejected["approvals"]["exploratory"]["decision"] == "rejected"

    app = e2e.clone / "src/sample_service/app.py"
    (sha,) = e2e.push({"src/sample_service/app.py": app.read_text() + "# After a rejected image.\n"}, "Tweak again")
    run, states = e2e.candidate_run(sha)
    assert states[CANDIDATE] == "success", states
    record = e2e.record(e2e.version(sha))
    # It bakes again: the provisioning change was never accepted, so it is part of this release.
    assert states_of(states, BAKING) == {"success"}
    assert record["classification"]["infrastructure_paths"] == ["infrastructure/provision.sh"]
    assert record["base_image"]["version"] == record["version"] and record["base_image"]["commit"] == sha
    assert record["base_image"]["id"] != rejected["base_image"]["id"]
    assert [c["sha"] for c in record["included_commits"]][:2] == [sha, risky]
    assert record["candidate"]["base_image"] == record["base_image"]["id"]


def test_commit_touching_both_bakes_and_builds(e2e, seeded):
    (sha,) = e2e.push({"infrastructure/README.md": "Infrastructure notes\n", "NOTES.md": "both\n"}, "Both")
    run, states = e2e.candidate_run(sha)
    assert states[CANDIDATE] == "success", states
    assert states_of(states, BAKING) == {"success"}
    assert {s for t, s in states.items() if t.startswith("2-commit.")} == {"success"}
    record = e2e.record(e2e.version(sha))
    assert record["classification"]["kind"] == "both"
    assert record["base_image"]["version"] == record["artifact_version"] == record["version"]
    assert record["candidate"]


def test_failing_acceptance_test_leaves_no_environment_and_no_candidate(e2e, seeded):
    failing = "def test_regression(base_url):\n    raise AssertionError('acceptance regression')\n"
    (sha,) = e2e.push({"tests/acceptance/test_regression.py": failing}, "Break acceptance")
    try:
        run = e2e.pipeline_run(sha)
        states = e2e.task_states(run)
        assert run["state"] == "failed"
        assert states["3-acceptance.acceptance_test"] == "failed"
        assert states["3-acceptance.teardown_environment"] == "success"
        assert states["3-acceptance.record_candidate"] == "upstream_failed"
        record = e2e.record(e2e.version(sha))
        assert "candidate" not in record
        assert record["stages"]["3-acceptance"]["result"] == "failed"
        assert record["stages"]["3-acceptance"]["task"] == "3-acceptance.acceptance_test"
        assert images_of(e2e, record["version"]) == {}
    finally:
        (fix,) = e2e.push({"tests/acceptance/test_regression.py": "def test_fixed():\n    pass\n"}, "Fix acceptance")
        assert e2e.candidate_run(fix)[1][CANDIDATE] == "success"


@pytest.fixture
def images_turn_failed(monkeypatch):
    """moto makes an image ``available`` at once; AWS may take minutes and end in ``failed``.

    Images whose name is in the returned set start ``pending`` (moto serves from this process,
    so its backend is patched here); the test turns them ``failed`` once the pipeline waits."""
    from moto.ec2.models.amis import AmiBackend

    names, made = set(), {}
    create = AmiBackend.create_image

    def create_image(self, instance_id, name, description, tag_specifications):
        ami = create(self, instance_id, name, description, tag_specifications)
        if name in names:
            ami.state = "pending"
            made[name] = ami
        return ami

    monkeypatch.setattr(AmiBackend, "create_image", create_image)
    return names, made


def test_a_base_image_that_turns_failed_stops_the_release_and_leaves_no_builder(e2e, seeded, images_turn_failed):
    """Fault: the base AMI turns ``failed`` while the deferred sensor waits.  The commit is pushed
    to main with its revert in the same push (so that main's next commits are not affected: the
    poll sees the revert, which changes nothing) and triggered by hand: only commits main reaches
    are released."""
    names, made = images_turn_failed
    provision = e2e.clone / "infrastructure/provision.sh"
    provision.write_text(provision.read_text() + "# a base image AWS fails to make\n")
    embedded.git("commit", "--quiet", "-am", "Provisioning whose image fails", cwd=e2e.clone)
    sha = embedded.git("rev-parse", "HEAD", cwd=e2e.clone)
    embedded.git("revert", "--quiet", "--no-edit", "HEAD", cwd=e2e.clone)
    embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=e2e.clone)
    version = e2e.version(sha)
    names.add(f"sample_service-base-{version}")  # the name 1-baking gives the image

    run_id = e2e.api.trigger("sample_service_pipeline", conf={"commit": sha}, run_id="manual__fault_base_image")[
        "dag_run_id"]
    e2e.wait_for_tasks(run_id, ("1-baking.wait_for_base_image",), states=("deferred",), timeout=240)
    name = f"sample_service-base-{version}"
    assert list(made) == [name], (made, e2e.task_states(e2e.api.run("sample_service_pipeline", run_id)))
    image = made[name]
    image.state = "failed"  # as EC2 reports an image it could not make
    run = e2e.api.wait_for_run("sample_service_pipeline", run_id, timeout=300)
    states = e2e.task_states(run)
    assert run["state"] == "failed", states
    assert states["1-baking.wait_for_base_image"] == "failed", states
    assert states["1-baking.record_base_image"] == "upstream_failed", states
    assert states["1-baking.terminate_builder"] == "success", states  # the teardown ran anyway
    assert {states[t] for t in ACCEPTANCE[:2]} == {"upstream_failed"}, states
    record = e2e.record(version)
    assert record["stages"]["1-baking"] | {"result": "failed", "task": "1-baking.wait_for_base_image"} \
        == record["stages"]["1-baking"], record["stages"]
    assert "failed" in record["stages"]["1-baking"]["error"]
    assert "candidate" not in record and "base_image" not in record
    # The autouse check then finds no builder instance, stack or environment left.
