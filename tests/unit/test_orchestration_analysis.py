"""The benchmark's analysis of a pipeline run (critical path, gaps, stage split) on a small run.

The fixture has the REST API's shapes: ``GET /dags/{id}/tasks`` and the run's task instances.
    resolve -> s1.build -> s2.wait (a sensor) -> s2.deploy
    resolve -> s1.skipped (skipped, no times) -> s2.wait
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


analysis = load("orchestration_analysis")


def at(seconds: float) -> str:
    return f"2026-01-01T00:00:{seconds:06.3f}Z"


def task(task_id, downstream, class_name="_PythonDecoratedOperator"):
    return {"task_id": task_id, "downstream_task_ids": downstream, "operator_name": "@task",
            "class_ref": {"module_path": "somewhere", "class_name": class_name}}


TASKS = {"tasks": [
    task("resolve", ["s1.build", "s1.skipped"]),
    task("s1.build", ["s2.wait"]),
    task("s1.skipped", ["s2.wait"]),
    task("s2.wait", ["s2.deploy"], class_name="AwaitApprovalSensor"),
    task("s2.deploy", []),
], "total_entries": 5}


def ti(task_id, start, end, state="success"):
    return {"task_id": task_id, "state": state, "map_index": -1,
            "start_date": at(start) if start is not None else None, "end_date": at(end) if end is not None else None}


TIS = {"task_instances": [
    ti("resolve", 1, 3),
    ti("s1.build", 4, 10),
    ti("s1.skipped", None, None, state="skipped"),
    ti("s2.wait", 11, 20),
    ti("s2.deploy", 22, 25),
], "total_entries": 5}
RUN = {"dag_run_id": "commit__abc", "start_date": at(0), "state": "success"}


def test_upstream_lists_and_sensors_come_from_the_tasks_endpoint():
    upstream = analysis.upstream_map(TASKS)
    assert upstream["s2.wait"] == ["s1.build", "s1.skipped"]
    assert upstream["resolve"] == []
    assert analysis.sensor_ids(TASKS) == {"s2.wait"}


def test_gaps_look_through_skipped_tasks():
    times = analysis.task_times(TIS)
    assert "s1.skipped" not in times
    gaps = analysis.gaps(analysis.upstream_map(TASKS), times)
    assert gaps == pytest.approx({"s1.build": 1, "s2.wait": 1, "s2.deploy": 2})
    # A skipped task's only upstream: the timed task above it.
    assert analysis.latest_upstream("s2.wait", analysis.upstream_map(TASKS), times) == "s1.build"


def test_critical_path_walks_back_through_the_upstream_that_ended_last():
    times = analysis.task_times(TIS)
    upstream = analysis.upstream_map(TASKS)
    assert analysis.critical_path(upstream, times) == ["resolve", "s1.build", "s2.wait", "s2.deploy"]
    assert analysis.critical_path(upstream, times, target="s1.build") == ["resolve", "s1.build"]
    assert analysis.critical_path(upstream, times, within={"s2.wait", "s2.deploy"}) == ["s2.wait", "s2.deploy"]


def test_a_run_is_split_into_work_waiting_and_gaps():
    result = analysis.analyse_run(RUN, TASKS, TIS, target="s2.deploy")
    assert [t["task_id"] for t in result["critical_path"]] == ["resolve", "s1.build", "s2.wait", "s2.deploy"]
    assert result["run_start_to_target_end_s"] == 25
    assert result["critical_path_sum_s"] == 20  # 2 + 6 + 9 + 3
    assert result["critical_path_sensor_s"] == 9
    assert result["critical_path_gaps_s"] == 5  # 1 before the first task, then 1 + 1 + 2
    assert result["overhead_s"] == 5 and result["overhead_ratio"] == 1.25
    assert result["gaps_all"] == {"n": 3, "median": 1, "max": 2}
    assert result["gaps_critical_path"] == {"n": 3, "median": 1, "max": 2}
    assert result["worst_gap_task"] == "s2.deploy"
    stages = result["stages"]
    assert list(stages) == ["resolve", "s1", "s2"]  # in the order they started
    s2 = stages["s2"]
    assert (s2["wall_s"], s2["gaps_s"], s2["waiting_s"], s2["work_s"], s2["other_s"]) == (14, 2, 9, 3, 0)
    assert s2["entry_gap_s"] == 1 and s2["path"] == ["s2.wait", "s2.deploy"]
    assert s2["dominated_by"] == "waiting"
    assert (stages["s1"]["wall_s"], stages["s1"]["work_s"], stages["s1"]["tasks"]) == (6, 6, 1)


def test_startup_is_estimated_from_the_cheapest_tasks():
    times = analysis.task_times(TIS)
    # Non-sensor durations 2, 6, 3: the median of the cheapest (all three here) is 3.
    assert analysis.startup_estimate(times, {"s2.wait"}) == 3
    assert analysis.startup_estimate(times, {"s2.wait"}, cheapest=1) == 2
    split = analysis.stage_split(analysis.upstream_map(TASKS), times, {"s2.wait"}, startup=2)
    assert split["s1"]["startup_s"] == 2 and split["s1"]["dominated_by"] == "work"  # 6 s: 2 start-up, 4 work
    assert split["resolve"]["dominated_by"] == "start-up"  # 2 s, all of it start-up


def test_a_task_list_works_as_well_as_the_endpoints_envelope():
    times = analysis.task_times(TIS["task_instances"])
    assert set(times) == {"resolve", "s1.build", "s2.wait", "s2.deploy"}
    assert analysis.upstream_map(TASKS["tasks"]) == analysis.upstream_map(TASKS)


def test_a_tasks_own_log_splits_its_duration():
    events = [
        {"event": "::group::Log message source details"},  # no timestamp: ignored
        {"event": "::endgroup::"},
        {"timestamp": at(4.1), "event": "::group::Pre Execute"},
        {"timestamp": at(4.9), "event": "Worker startup parse complete", "dag_file_parse_ms": 700},
        {"timestamp": at(5.5), "event": "::endgroup::"},
        {"timestamp": at(9.5), "event": "::group::Post Execute"},
        {"timestamp": at(9.6), "event": "::endgroup::"},
    ]
    phases = analysis.phases_from_log(events, start=analysis.ts(at(4)), end=analysis.ts(at(10)))
    assert phases == pytest.approx({"startup_s": 1.5, "work_s": 4.0, "wrapup_s": 0.5, "parse_s": 0.7})
    assert analysis.phases_from_log(events[:3], 0, 1) is None  # no marks: nothing measured

    result = analysis.analyse_run(RUN, TASKS, TIS, target="s2.deploy", logs={"s1.build": events})
    assert result["startup_measured"]["tasks"] == 1
    assert result["startup_measured"]["critical_path_startup_s"] == 1.5
    assert result["stages"]["s1"]["startup_s"] == 1.5  # measured, not the estimate
    assert [t.get("startup_s") for t in result["critical_path"]] == [None, 1.5, None, None]
