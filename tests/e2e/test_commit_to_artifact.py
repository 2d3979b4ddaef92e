"""A pushed commit is polled, built, tested and stored as an artifact; a failing one is not."""

import hashlib
import json
import os
import signal
import time

import pytest
from deployline import embedded
from harness import APP, BUCKET, CANDIDATE

pytestmark = pytest.mark.e2e


# What an untrusted build could do with the worker's secrets, if it had them.
ENV_DUMP = ('    import os as _os\n'
            '    print("environment (hex):", repr(sorted(_os.environ.items())).encode().hex(), flush=True)\n')

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
    parent = embedded.git("rev-parse", "HEAD", cwd=e2e.clone)  # main's head before the push
    # The build also prints its whole environment, hex-encoded (log masking cannot recognise that):
    # test_security reads it at the end of the suite and finds no Airflow or AWS secret in it.
    build = (e2e.clone / "build.py").read_text().replace(
        'if __name__ == "__main__":\n', 'if __name__ == "__main__":\n' + ENV_DUMP, 1)
    older, newest = e2e.push({"NOTES.md": "Release notes", "build.py": build}, "Add release notes", commits=2)
    run, states = e2e.candidate_run(newest)
    assert states[CANDIDATE] == "success", states
    assert run["conf"]["commit"] == newest
    assert run["note"] == f"polled commit {newest[:10]} of main"  # rendered, not the template
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
    # Both commits of the push, newest first; then whatever came since the last published release
    # (the base-image fault test's commit and its revert, which published nothing).
    included = [c["sha"] for c in record["included_commits"]]
    previous = e2e.record(record["previous_version"])
    assert included[:2] == [newest, older] and previous["artifact"] and previous["commit"]["sha"] not in included
    assert parent == previous["commit"]["sha"] or parent in included[2:]
    assert record["classification"]["kind"] == "application"
    assert record["changed_paths"] == ["NOTES.md", "build.py"]

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


def commit_locally(e2e, files: dict[str, str | None], message: str) -> str:
    for name, content in files.items():
        path = e2e.clone / name
        if content is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    embedded.git("add", "-A", cwd=e2e.clone)
    embedded.git("commit", "--quiet", "-m", message, cwd=e2e.clone)
    return embedded.git("rev-parse", "HEAD", cwd=e2e.clone)


def test_commit_stage_faults_fail_cleanly_and_a_killed_worker_is_retried(e2e):
    """One commit per fault, each built by its own run (Trigger with the commit), side by side:
    a build that fails, a failing unit test, a static-analysis finding, and a slow build whose
    worker is killed mid-build (SIGKILL: no cleanup), which Airflow retries.  The head fixes all."""
    build = (e2e.clone / "build.py").read_text()
    app = (e2e.clone / "src/sample_service/app.py").read_text()
    test = "tests/unit/test_regression.py"
    marker_name = f"slow-build-started-{time.time_ns()}"  # in AIRFLOW_HOME; lines within ruff's 100
    script = 'if __name__ == "__main__":\n'  # only a real build runs it, not the unit tests

    def build_with(code: str) -> str:
        """build.py running ``code`` when run as the build, still clean for static analysis."""
        assert script in build and "import tarfile\n" in build and "import os\n" in build
        with_time = build.replace("import tarfile\n", "import tarfile\nimport time\n", 1)
        return with_time.replace(script, f"{script}    {code}\n", 1)

    faults = {
        # Slow on its first try only, and long enough that the killed try's build still runs when
        # the retry starts, however busy the machine (the marker is outside the workspace, which
        # each try restores afresh).
        "slow_build": commit_locally(e2e, {"build.py": build_with(
            f"marker = os.path.join(\n        {str(e2e.home)!r},\n        {marker_name!r})\n"
            "    first_try = not os.path.exists(marker)\n    open(marker, 'w').close()\n"
            "    time.sleep(180 if first_try else 0)")}, "Slow build"),
        "build": commit_locally(
            e2e, {"build.py": build_with('raise SystemExit(f"build broken on purpose at {time.time()}")')},
            "Break the build"),
        "unit_test": commit_locally(e2e, {"build.py": build, test: "def test_regression():\n    assert 1 + 1 == 3\n"},
                                    "Add a failing test"),
        "static_analysis": commit_locally(e2e, {test: None, "src/sample_service/app.py": app + "\nimport fractions\n"},
                                          "Leave an unused import"),
    }
    # The head fixes everything and changes something, so that it has something to build.
    fix = commit_locally(e2e, {"src/sample_service/app.py": app + "# faults fixed\n"}, "Remove the unused import")
    embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=e2e.clone)
    pipeline = f"{APP}_pipeline"
    runs = {name: e2e.api.trigger(pipeline, conf={"commit": sha}, run_id=f"manual__fault_{name}")["dag_run_id"]
            for name, sha in faults.items()}
    e2e.poll_now(fix)
    # Kill the slow build's task process while its command runs.
    slow = runs["slow_build"]
    build_ti = f"/dags/{pipeline}/dagRuns/{slow}/taskInstances/2-commit.build"

    def command_running() -> bool:
        if e2e.api.get(build_ti)["state"] != "running":
            return False
        return "$ python build.py" in json.dumps(e2e.api.get(f"{build_ti}/logs/1", full_content="true"))

    embedded.wait_until(command_running, 240, "the slow build's command to run", interval=0.5)
    time.sleep(2)  # well inside its 180 s
    os.kill(e2e.api.get(build_ti)["pid"], signal.SIGKILL)

    done = {name: e2e.api.wait_for_run(pipeline, run_id, timeout=400) for name, run_id in runs.items()
            if name != "slow_build"}
    for name, run in done.items():
        states = e2e.task_states(run)
        assert run["state"] == "failed", (name, states)
        assert states[f"2-commit.{name}"] == "failed", (name, states)
        assert states["2-commit.publish_artifact"] == "upstream_failed", (name, states)
        assert states["2-commit.clean_workspace"] == "success", (name, states)  # the teardown ran anyway
        assert states["3-acceptance.select_inputs"] == "upstream_failed", (name, states)
        version = e2e.version(faults[name])
        assert e2e.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{APP}/artifacts/{version}/")["KeyCount"] == 0
        record = e2e.record(version)
        assert "artifact" not in record
        assert record["stages"]["2-commit"] | {"result": "failed", "task": f"2-commit.{name}"} \
            == record["stages"]["2-commit"], (name, record["stages"])
        assert "exited with code 1" in record["stages"]["2-commit"]["error"]
        assert "build broken on purpose" in record["stages"]["2-commit"]["error"] or name != "build"
    # A failing command is final: no second try.
    tries = {name: e2e.api.get(f"/dags/{pipeline}/dagRuns/{runs[name]}/taskInstances/2-commit.{name}")
             ["try_number"] for name in done}
    assert tries == {name: 1 for name in done}, tries

    # The killed build was retried, its retry stopped what the lost try left, and it published.
    e2e.wait_for_tasks(slow, ("2-commit.publish_artifact",))
    retried = e2e.api.get(build_ti)
    assert (retried["state"], retried["try_number"]) == ("success", 2), retried
    log = e2e.api.get(f"{build_ti}/logs/2", full_content="true")
    assert "left running by an earlier try of this command" in json.dumps(log)
    assert e2e.record(e2e.version(faults["slow_build"]))["artifact"]["sha256"]
