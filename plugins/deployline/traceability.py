"""One release traced from commit to production, from its registry record (for the UI plugin)."""

from __future__ import annotations

from urllib.parse import quote

from deployline.metrics import STAGES, parse_time
from deployline.releases import revision_of

STAGE_TITLES = {
    "1-baking": "Baking (base image)",
    "2-commit": "Commit (build, unit tests, static analysis, artifact)",
    "3-acceptance": "Acceptance (environment, acceptance tests, application image)",
    "5-exploratory": "Exploratory (people try it, approval)",
    "6-capacity": "Capacity (load tests)",
    "7-pre-production": "Pre-production (smoke tests)",
    "8-production": "Production (approval, blue/green deploy)",
}


def seconds_between(start: str | None, end: str | None) -> float | None:
    started, finished = parse_time(start), parse_time(end)
    return (finished - started).total_seconds() if started and finished else None


def task_link(ui_root: str, dag_id: str, run_id: str | None, stage: str, task_id: str | None) -> str | None:
    """The stage (task group), or the task that failed, in its Airflow run."""
    if not run_id:
        return None
    run = f"{ui_root.rstrip('/')}/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}"
    return f"{run}/tasks/{quote(task_id)}" if task_id else f"{run}/tasks/group/{quote(stage)}"


def stage_rows(record: dict, dag_id: str, ui_root: str) -> list[dict]:
    """Every pipeline stage in order, with what the record says about it ("not run" if nothing)."""
    stages = record.get("stages") or {}
    rows = []
    for stage in STAGES:
        entry = stages.get(stage) or {}
        rows.append({
            "stage": stage,
            "title": STAGE_TITLES[stage],
            "result": entry.get("result") or "not run",
            "started_at": entry.get("started_at"),
            "finished_at": entry.get("finished_at"),
            "seconds": seconds_between(entry.get("started_at"), entry.get("finished_at")),
            "task": entry.get("task"),
            "error": entry.get("error"),
            "link": task_link(ui_root, dag_id, entry.get("run_id") or record.get("run_id"), stage, entry.get("task")),
        })
    return rows


def production_status(record: dict, live_version: str | None) -> str:
    """live, was live, rolled back, superseded, waiting or not yet."""
    if record["version"] == live_version:
        return "live"
    attempts = record.get("deployments") or []
    if any(a.get("result") == "deployed" for a in attempts):
        return "was live"
    if attempts and attempts[-1].get("result") == "rolled_back":
        return "rolled back"
    if (record.get("production") or {}).get("result") == "superseded":
        return "superseded"
    return "not deployed"


def release_summary(record: dict, live_version: str | None) -> dict:
    """One row of the release list."""
    commit = record.get("commit") or {}
    stages = record.get("stages") or {}
    return {
        "version": record["version"],
        "revision": revision_of(record["version"]),
        "commit": {k: commit.get(k) for k in ("sha", "short", "author", "message", "committed_at")},
        "candidate": bool(record.get("candidate")),
        "stages": {stage: (stages.get(stage) or {}).get("result", "not run") for stage in STAGES},
        "production": production_status(record, live_version),
        "updated_at": record.get("updated_at"),
    }


def trace(record: dict, dag_id: str, ui_root: str, live_version: str | None) -> dict:
    """Everything the registry knows about one version, in the order a release goes through it."""
    commit = record.get("commit") or {}
    approvals = record.get("approvals") or {}
    return {
        "application": record.get("application"),
        "version": record["version"],
        "production": production_status(record, live_version),
        "commit": commit,
        "included_commits": record.get("included_commits") or [],
        "previous_version": record.get("previous_version"),
        "classification": record.get("classification"),
        "changed_paths": len(record.get("changed_paths") or []),
        "artifact": record.get("artifact"),
        "artifact_version": record.get("artifact_version"),
        "base_image": record.get("base_image"),
        "application_image": record.get("application_image"),
        "stages": stage_rows(record, dag_id, ui_root),
        "load_tests": record.get("load_tests") or {},
        "approvals": [approvals[gate] | {"gate": gate} for gate in ("exploratory", "production") if gate in approvals],
        "preproduction": record.get("preproduction"),
        "deployments": record.get("deployments") or [],
        "rollback": record.get("rollback"),
        "self_service": record.get("self_service") or {},
        "run_link": task_link(ui_root, dag_id, record.get("run_id"), "", None).removesuffix("/tasks/group/")
        if record.get("run_id") else None,
        "updated_at": record.get("updated_at"),
    }
