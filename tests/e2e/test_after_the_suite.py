"""After every other end-to-end test, faults included: nothing is left running, production still
serves the last good version, and the registry holds every run's outcome.

``conftest.py`` runs this module last."""

import json

import pytest
from deployline import embedded
from harness import APP, BUCKET, STRICT_APP, environments, leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.after_the_suite]

PIPELINE = f"{APP}_pipeline"
BUSY = ("queued", "scheduled", "running", "up_for_retry", "up_for_reschedule", "restarting")


def records(e2e) -> list[dict]:
    pages = e2e.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{APP}/releases/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return [json.loads(e2e.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) for key in keys]


def test_nothing_is_left_behind(e2e):
    """Runs still going wait only for an approval nobody gives (deferred, no worker, no environment)."""
    def settled():
        active = [r for dag in (PIPELINE, f"{STRICT_APP}_pipeline")
                  for r in e2e.api.runs(dag) if r["state"] in ("queued", "running")]
        return not [t for r in active for t, state in e2e.task_states(r).items() if state in BUSY]

    embedded.wait_until(settled, 300, "every run to finish or wait for an approval", interval=3)
    assert leftovers(e2e) == {"builder_instances": [], "stacks": [], "environment_processes": [],
                              "environment_folders": []}
    long_lived = sorted(s["stage"] for s in environments(e2e).values())
    assert long_lived == ["preproduction", "production", "router"], long_lived  # no green one left


def test_production_serves_the_last_good_version(e2e):
    """The suite's faults (a rollback among them) leave the last successful deploy live."""
    import urllib.request

    deployed = sorted((d["at"], r["version"]) for r in records(e2e) for d in r.get("deployments") or []
                      if d.get("result") == "deployed")
    assert deployed, "no deploy recorded"
    last_good = deployed[-1][1]
    pointer = json.loads(e2e.s3.get_object(Bucket=BUCKET, Key=f"{APP}/production.json")["Body"].read())
    with urllib.request.urlopen(f"{pointer['endpoint']}/version", timeout=5) as response:
        serving = json.loads(response.read())["version"]
    assert pointer["version"] == last_good == serving, (pointer, deployed[-3:], serving)


def test_the_registry_records_every_finished_run(e2e):
    """Every finished pipeline run of the session is in the release registry: its commit's record
    exists, a failed run names the stage that failed, and no stage of it is left marked running."""
    problems = []
    finished = [r for r in e2e.api.runs(PIPELINE) if r["state"] in ("success", "failed")]
    for run in finished:
        sha = (run.get("conf") or {}).get("commit")
        record = e2e.record(e2e.version(sha)) if sha else None
        if record is None:
            problems.append((run["dag_run_id"], "no release record"))
            continue
        mine = {stage: entry for stage, entry in (record.get("stages") or {}).items()
                if entry.get("run_id") == run["dag_run_id"]}
        problems += [(run["dag_run_id"], f"{stage} still running") for stage, entry in mine.items()
                     if entry.get("result") == "running"]
        if run["state"] == "failed" and not any(e.get("result") == "failed" for e in mine.values()):
            problems.append((run["dag_run_id"], f"failed, but no stage of it is recorded failed: {mine}"))
    assert len(finished) > 5 and problems == [], problems
