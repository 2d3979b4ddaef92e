"""A pushed commit is polled, built, tested and stored as an artifact; a failing one is not."""

import hashlib
import time

import pytest
from deployline import embedded
from harness import APP, BUCKET, CANDIDATE

pytestmark = pytest.mark.e2e


def test_dags_are_loaded_without_import_errors(e2e):
    assert {f"{APP}_commit_poll", f"{APP}_pipeline"} <= set(e2e.api.dag_ids())
    assert e2e.api.import_errors() == []


def test_first_commit_builds_everything(e2e):
    run, states = e2e.candidate_run(e2e.seed)
    assert states[CANDIDATE] == "success", states
    record = e2e.record(e2e.version(e2e.seed))
    # No release before it: everything counts as changed, infrastructure included.
    assert record["classification"]["kind"] == "both"
    assert record["previous_version"] is None
    assert "infrastructure/provision.sh" in record["changed_paths"]
    assert record["artifact"]["sha256"]


def test_new_commits_are_polled_built_and_published(e2e):
    # Two commits in one push: the newest is built, and its run records both.
    parent = embedded.git("rev-parse", "HEAD", cwd=e2e.clone)  # built by the test before
    older, newest = e2e.push({"NOTES.md": "Release notes"}, "Add release notes", commits=2)
    run, states = e2e.candidate_run(newest)
    assert states[CANDIDATE] == "success", states
    assert run["conf"]["commit"] == newest
    assert {t: s for t, s in states.items() if not t.startswith(("1-", "3-", "5-", "6-", "7-", "8-"))} == {
        "resolve_commit": "success", "classify_change": "success", "2-commit.checkout": "success",
        "2-commit.build": "success", "2-commit.unit_test": "success", "2-commit.static_analysis": "success",
        "2-commit.publish_artifact": "success", "2-commit.clean_workspace": "success",
    }

    version = e2e.version(newest)
    listing = e2e.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{APP}/artifacts/{version}/")
    assert [o["Key"] for o in listing.get("Contents", [])] == [
        f"{APP}/artifacts/{version}/sample-service-{version}.tar.gz"]
    key = listing["Contents"][0]["Key"]
    obj = e2e.s3.get_object(Bucket=BUCKET, Key=key)
    digest = hashlib.sha256(obj["Body"].read()).hexdigest()
    assert obj["Metadata"]["sha256"] == digest

    record = e2e.record(version)
    assert record["commit"]["sha"] == newest
    assert record["commit"]["message"] == "Add release notes (2)"
    assert record["artifact"]["sha256"] == digest and record["artifact"]["key"] == key
    assert record["run_id"] == run["dag_run_id"]
    assert [c["sha"] for c in record["included_commits"]] == [newest, older]
    assert record["previous_version"] == e2e.version(parent)
    assert record["classification"]["kind"] == "application"
    assert record["changed_paths"] == ["NOTES.md"]

    # The older commit never gets a run of its own, and the newest never a second one.
    time.sleep(10)
    commits = [r["conf"].get("commit") for r in e2e.api.runs(f"{APP}_pipeline")]
    assert commits.count(newest) == 1 and older not in commits


def test_a_commit_that_changes_nothing_is_recorded_and_builds_nothing(e2e):
    embedded.git("commit", "--quiet", "--allow-empty", "-m", "Empty commit", cwd=e2e.clone)
    embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=e2e.clone)
    sha = embedded.git("rev-parse", "HEAD", cwd=e2e.clone)
    run = e2e.pipeline_run(sha)
    states = e2e.task_states(run)
    assert run["state"] == "success"
    assert states["classify_change"] == "success"
    assert {s for t, s in states.items() if t.startswith(("1-", "2-", "3-", "5-"))} == {"skipped"}
    record = e2e.record(e2e.version(sha))
    assert record["classification"]["kind"] == "none" and record["changed_paths"] == []
    assert "artifact" not in record
    assert e2e.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{APP}/artifacts/{e2e.version(sha)}/")["KeyCount"] == 0


def test_failing_unit_test_fails_the_commit_stage_and_publishes_nothing(e2e):
    (sha,) = e2e.push({"tests/unit/test_regression.py": "def test_regression():\n    assert 1 + 1 == 3\n"},
                      "Add a failing test")
    try:
        run = e2e.pipeline_run(sha)
        states = e2e.task_states(run)
        assert run["state"] == "failed"
        assert states["2-commit.unit_test"] == "failed"
        assert states["2-commit.publish_artifact"] == "upstream_failed"
        assert states["2-commit.clean_workspace"] == "success"  # the teardown ran anyway
        assert states["3-acceptance.select_inputs"] == "upstream_failed"
        version = e2e.version(sha)
        assert e2e.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{APP}/artifacts/{version}/")["KeyCount"] == 0
        record = e2e.record(version)
        assert "artifact" not in record
        assert record["stages"]["2-commit"] == record["stages"]["2-commit"] | {
            "result": "failed", "task": "2-commit.unit_test"}
        assert "exited with code 1" in record["stages"]["2-commit"]["error"]
    finally:
        (fix,) = e2e.push({"tests/unit/test_regression.py": "def test_regression():\n    assert 1 + 1 == 2\n"},
                          "Fix the test")
        assert e2e.candidate_run(fix)[1][CANDIDATE] == "success"
