"""The orchestration benchmark's analysis works on the session's real REST API answers.

Cheap (a few REST calls) and about the code only: no timing is asserted (the timings are
``make bench``'s, benchmarks/orchestration.py). It reads the pipeline run that went furthest so
far: a production release when test_production.py has run, else the session's first candidate
(the ``e2e`` fixture builds it before any test), so it works wherever it runs in the suite.
"""

import importlib.util
import sys

import pytest
from harness import APP, CANDIDATE, ROOT

pytestmark = pytest.mark.e2e

PIPELINE = f"{APP}_pipeline"
DEPLOY = "8-production.deploy"


def load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def furthest_run(api) -> tuple[dict, dict, str]:
    """(run, its task instances as the REST API gives them, the task to analyse up to)."""
    found = None
    for run in api.runs(PIPELINE):
        tis = api.get(f"/dags/{PIPELINE}/dagRuns/{run['dag_run_id']}/taskInstances", limit=1000)
        states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
        if states.get(DEPLOY) == "success":
            return run, tis, DEPLOY
        if found is None and states.get(CANDIDATE) == "success":
            found = (run, tis, CANDIDATE)
    assert found, "the session has no pipeline run with a release candidate"
    return found


def test_orchestration_analysis_of_a_real_run(e2e):
    analysis = load("orchestration_analysis")
    tasks = e2e.api.get(f"/dags/{PIPELINE}/tasks")
    run, tis, target = furthest_run(e2e.api)

    result = analysis.analyse_run(run, tasks, tis, target=target)

    path = [t["task_id"] for t in result["critical_path"]]
    assert path[-1] == target and path[0] == "resolve_commit", path
    upstream, times = analysis.upstream_map(tasks), analysis.task_times(tis)
    for before, after in zip(path, path[1:], strict=False):  # each step: the upstream that ended last
        assert analysis.latest_upstream(after, upstream, times) == before, (before, after)
    assert result["critical_path_sum_s"] > 0 and result["run_start_to_target_end_s"] > 0
    assert result["gaps_all"]["n"] >= len(path) - 1 and result["gaps_all"]["median"] is not None
    assert {"resolve_commit", "2-commit", "3-acceptance"} <= set(result["stages"]), result["stages"].keys()
    assert "5-exploratory.await_approval" in analysis.sensor_ids(tasks)
    assert "3-acceptance.wait_for_application_image" in analysis.sensor_ids(tasks)
    for name, stage in result["stages"].items():
        assert stage["wall_s"] >= 0 and stage["path"], name
        assert stage["dominated_by"] in ("gaps", "waiting", "start-up", "work"), (name, stage)
    assert result["startup_estimate_s"] is not None
