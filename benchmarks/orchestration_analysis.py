"""Where a pipeline run's time goes, from the REST API's JSON alone (no Airflow import).

Inputs are what ``GET /api/v2/dags/{dag_id}/tasks`` (``tasks``: the upstream lists, inverted
from ``downstream_task_ids``, and each task's operator) and
``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances`` (``task_instances``: start and
end of each task) answer, and the run itself. Used by ``orchestration.py`` and by the smoke
test against the end-to-end suite's Airflow.

* A task's **gap** is its start minus the latest end among its upstream tasks: the time
  Airflow took to notice the upstream was done, queue the task and start its process.
  Skipped tasks have no times of their own: a skipped upstream counts with the end of the
  latest timed task above it (it was skipped when that one ended).
* The **critical path** walks back from the last task (or a given one) through the upstream
  task that ended last, down to the run's first task.
* A **stage** is a task group (the task id's part before the first "."). Its wall time runs
  from its first task's start to its last task's end, and is split along the stage's own
  critical path into gaps, waiting (sensor tasks: deferred or rescheduled, e.g. approvals
  and AMI readiness) and work (every other task's duration, its process start-up included).
"""

from __future__ import annotations

import statistics
from datetime import datetime

NO_TIMES = ("skipped", "removed", "upstream_failed", None)  # states whose times say nothing


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _items(tasks) -> list[dict]:
    return tasks["tasks"] if isinstance(tasks, dict) and "tasks" in tasks else list(tasks)


def upstream_map(tasks) -> dict[str, list[str]]:
    """task id -> its upstream task ids, from the tasks endpoint's ``downstream_task_ids``."""
    items = _items(tasks)
    upstream: dict[str, list[str]] = {t["task_id"]: [] for t in items}
    for task in items:
        for down in task.get("downstream_task_ids") or []:
            upstream.setdefault(down, []).append(task["task_id"])
    return {k: sorted(v) for k, v in upstream.items()}


def operator_of(task: dict) -> str:
    ref = task.get("class_ref") or {}
    return ref.get("class_name") or task.get("operator_name") or ""


def sensor_ids(tasks) -> set[str]:
    """Tasks whose operator is a sensor (deferrable or rescheduled: they wait, they do not work)."""
    return {t["task_id"] for t in _items(tasks) if operator_of(t).endswith("Sensor")
            or (t.get("operator_name") or "").endswith("Sensor")}


def task_times(task_instances) -> dict[str, dict]:
    """task id -> {start, end, duration, state} for the tasks that ran (mapped instances merged)."""
    items = task_instances.values() if isinstance(task_instances, dict) else task_instances
    if isinstance(task_instances, dict) and "task_instances" in task_instances:
        items = task_instances["task_instances"]
    found: dict[str, dict] = {}
    for ti in items:
        start, end = ts(ti.get("start_date")), ts(ti.get("end_date"))
        if ti.get("state") in NO_TIMES or start is None or end is None:
            continue
        seen = found.get(ti["task_id"])
        if seen:
            start, end = min(start, seen["start"]), max(end, seen["end"])
        found[ti["task_id"]] = {"start": start, "end": end, "duration": end - start, "state": ti["state"]}
    return found


def latest_upstream(task_id: str, upstream: dict[str, list[str]], times: dict[str, dict]) -> str | None:
    """The timed task whose end the task waited for last: its upstream that ended last, looking
    through untimed (skipped) upstreams to the timed tasks above them."""
    best, seen, todo = None, set(), list(upstream.get(task_id, []))
    while todo:
        up = todo.pop()
        if up in seen:
            continue
        seen.add(up)
        if up in times:
            if best is None or times[up]["end"] > times[best]["end"]:
                best = up
        else:
            todo.extend(upstream.get(up, []))
    return best


def gaps(upstream: dict[str, list[str]], times: dict[str, dict]) -> dict[str, float]:
    """task id -> start minus the latest upstream end, for every timed task that has a timed upstream."""
    found = {}
    for task_id, t in times.items():
        up = latest_upstream(task_id, upstream, times)
        if up is not None:
            found[task_id] = t["start"] - times[up]["end"]
    return found


def critical_path(upstream: dict[str, list[str]], times: dict[str, dict], target: str | None = None,
                  within: set[str] | None = None) -> list[str]:
    """From the first task to ``target`` (default: the task that ended last), each step the
    upstream that ended last; ``within``: stop where that upstream is not in this set."""
    if target is None:
        pool = [t for t in times if within is None or t in within]
        if not pool:
            return []
        target = max(pool, key=lambda t: times[t]["end"])
    if target not in times:
        return []
    path = [target]
    while True:
        up = latest_upstream(path[-1], upstream, times)
        if up is None or up in path or (within is not None and up not in within):
            break
        path.append(up)
    return path[::-1]


def stage_of(task_id: str) -> str:
    return task_id.split(".", 1)[0]


def _stats(values: list[float]) -> dict:
    values = list(values)
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def startup_estimate(times: dict[str, dict], sensors: set[str], cheapest: int = 5) -> float | None:
    """A task's own start-up inside its duration, estimated as the median duration of the
    ``cheapest`` shortest non-sensor tasks: tasks whose work is a few calls to moto or the REST
    API, so their duration is mostly the task process starting and parsing its DAG file."""
    durations = sorted(t["duration"] for tid, t in times.items() if tid not in sensors)[:cheapest]
    return round(statistics.median(durations), 2) if durations else None


def phases_from_log(events: list[dict], start: float, end: float) -> dict | None:
    """A task's duration split by its own log (the REST API's structured log of one try):
    ``startup_s`` from its start to the end of "Pre Execute" (the task process starting, parsing
    its DAG file, the on-execute callbacks, rendering its arguments), ``work_s`` from there to
    "Post Execute", ``wrapup_s`` from there to its end (XCom, reporting its state); and the
    DAG file's parse time the task runner logs. None when the log lacks those marks."""
    pre_started = pre_ended = post_started = None
    parse_ms = None
    for event in events:
        when, text = ts(event.get("timestamp")), event.get("event")
        if when is None:
            continue
        if text == "::group::Pre Execute" and pre_started is None:
            pre_started = when
        elif text == "::endgroup::" and pre_started is not None and pre_ended is None:
            pre_ended = when
        elif text == "::group::Post Execute" and pre_ended is not None and post_started is None:
            post_started = when
        elif text == "Worker startup parse complete" and parse_ms is None:
            parse_ms = event.get("dag_file_parse_ms")
    if pre_ended is None or post_started is None:
        return None
    return {"startup_s": round(pre_ended - start, 3), "work_s": round(post_started - pre_ended, 3),
            "wrapup_s": round(end - post_started, 3), "parse_s": parse_ms / 1000 if parse_ms is not None else None}


def stage_split(upstream: dict[str, list[str]], times: dict[str, dict], sensors: set[str],
                startup: float | dict[str, float] | None = None) -> dict[str, dict]:
    """Per stage: wall time (first start to last end) and its split along the stage's own
    critical path: ``gaps_s`` between its tasks, ``waiting_s`` in sensors, ``work_s`` in other
    tasks, of which ``startup_s`` is the tasks' own start-up (``startup``: measured per task id,
    or one estimate for every task), and ``other_s`` (the stage's first start before its path's
    first start). ``entry_gap_s``: the gap before the path's first task (from the previous
    stage, outside the wall time)."""
    stages: dict[str, list[str]] = {}
    for task_id in times:
        stages.setdefault(stage_of(task_id), []).append(task_id)
    gap_before, result = gaps(upstream, times), {}
    for stage, members in stages.items():
        first = min(times[t]["start"] for t in members)
        last = max(times[t]["end"] for t in members)
        path = critical_path(upstream, times, within=set(members))
        inner_gaps = sum(times[b]["start"] - times[a]["end"] for a, b in zip(path, path[1:], strict=False))
        waiting = sum(times[t]["duration"] for t in path if t in sensors)
        work = sum(times[t]["duration"] for t in path if t not in sensors)
        if isinstance(startup, dict):
            starting = sum(startup.get(t, 0.0) for t in path if t not in sensors)
        else:
            starting = (startup or 0) * sum(1 for t in path if t not in sensors)
        wall = last - first
        parts = {"gaps": inner_gaps, "waiting": waiting, "start-up": min(starting, work),
                 "work": max(work - starting, 0)}
        result[stage] = {
            "wall_s": round(wall, 2),
            "first_start": first,
            "tasks": len(members),
            "path": path,
            "gaps_s": round(inner_gaps, 2),
            "waiting_s": round(waiting, 2),
            "work_s": round(work, 2),
            "startup_s": round(min(starting, work), 2),
            "other_s": round(wall - inner_gaps - waiting - work, 2),
            "entry_gap_s": round(gap_before.get(path[0], 0.0), 2) if path else None,
            "dominated_by": max(parts, key=parts.get) if path else None,
        }
    return dict(sorted(result.items(), key=lambda kv: kv[1]["first_start"]))


def analyse_run(run: dict, tasks, task_instances, target: str | None = None,
                logs: dict[str, list[dict]] | None = None) -> dict:
    """Everything about one pipeline run: critical path to ``target`` (default: the task that
    ended last), its task durations and gaps, all gaps, the stages' split. ``logs``: task id ->
    its log events (optional): each non-sensor task's start-up is then measured (phases_from_log),
    else estimated from the cheapest tasks (startup_estimate)."""
    upstream, sensors = upstream_map(tasks), sensor_ids(tasks)
    times = task_times(task_instances)
    all_gaps = gaps(upstream, times)
    path = critical_path(upstream, times, target)
    run_start = ts(run.get("start_date"))
    end = times[path[-1]]["end"] if path else None
    path_gaps = [all_gaps[t] for t in path if t in all_gaps]
    first_gap = times[path[0]]["start"] - run_start if path and run_start else None
    startup = startup_estimate(times, sensors)
    phases = {}
    for task_id, events in (logs or {}).items():
        if task_id in times and task_id not in sensors:
            found = phases_from_log(events, times[task_id]["start"], times[task_id]["end"])
            if found:
                phases[task_id] = found
    on_path = [{"task_id": t, "duration_s": round(times[t]["duration"], 2), "sensor": t in sensors,
                "gap_s": round(all_gaps[t], 2) if t in all_gaps else None,
                **({"startup_s": phases[t]["startup_s"]} if t in phases else {})} for t in path]
    sum_durations = sum(times[t]["duration"] for t in path)
    wall = end - run_start if end and run_start else None
    worst = max(all_gaps, key=all_gaps.get) if all_gaps else None
    return {
        "run_id": run.get("dag_run_id"),
        "target": path[-1] if path else None,
        "run_start_to_target_end_s": round(wall, 2) if wall is not None else None,
        "critical_path": on_path,
        "critical_path_sum_s": round(sum_durations, 2),
        "critical_path_sensor_s": round(sum(times[t]["duration"] for t in path if t in sensors), 2),
        "critical_path_gaps_s": round(sum(path_gaps) + (first_gap or 0), 2),
        "run_start_to_first_task_s": round(first_gap, 2) if first_gap is not None else None,
        "overhead_s": round(wall - sum_durations, 2) if wall is not None else None,
        "overhead_ratio": round(wall / sum_durations, 2) if wall and sum_durations else None,
        "gaps_all": _stats(all_gaps.values()),
        "gaps_critical_path": _stats(path_gaps),
        "worst_gap_task": worst,
        "startup_estimate_s": startup,
        # Measured from the tasks' logs (when given): per task, then over the run's tasks.
        "startup_measured": {
            "tasks": len(phases),
            "startup_s": _stats(p["startup_s"] for p in phases.values()),
            "parse_s": _stats(p["parse_s"] for p in phases.values() if p["parse_s"] is not None),
            "work_s": _stats(p["work_s"] for p in phases.values()),
            "wrapup_s": _stats(p["wrapup_s"] for p in phases.values()),
            "critical_path_startup_s": round(sum(phases[t]["startup_s"] for t in path if t in phases), 2),
            "critical_path_wrapup_s": round(sum(phases[t]["wrapup_s"] for t in path if t in phases), 2),
        } if phases else None,
        "tasks_timed": len(times),
        "stages": {name: {k: v for k, v in s.items() if k != "first_start"} for name, s in stage_split(
            upstream, times, sensors, {t: p["startup_s"] for t, p in phases.items()} if phases else startup).items()},
    }
