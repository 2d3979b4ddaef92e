"""Stage start times: the first task(s) of every stage write ``started_at`` to the release record."""

from pathlib import Path

from deployline.config import load_pipeline_config
from deployline.pipeline import build_pipeline_dag
from deployline.releases import ReleaseRegistry

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "stage-times"
STAGES = ("1-baking", "2-commit", "3-acceptance", "5-exploratory", "6-capacity", "7-pre-production",
          "8-production")


def recorders(task) -> list:
    return [c for c in (task.on_execute_callback or []) if getattr(c, "__name__", "") == "record_start"]


def test_only_the_first_tasks_of_each_stage_record_its_start():
    config = load_pipeline_config(ROOT / "include/pipelines/sample_service.yaml", environ={})
    dag = build_pipeline_dag(config)
    firsts = {}
    for task in dag.tasks:
        if recorders(task):
            firsts.setdefault(task.task_id.split(".")[0], []).append(task.task_id)
    assert set(firsts) == set(STAGES)
    assert firsts["2-commit"] == ["2-commit.checkout"] and firsts["6-capacity"] == ["6-capacity.provision_environment"]
    skippers = [t.task_id for t in dag.tasks
                if any(getattr(c, "__name__", "") == "record_skip" for c in t.on_skipped_callback or [])]
    assert sorted(skippers) == sorted(t for ids in firsts.values() for t in ids)  # the first tasks only
    for stage, task_ids in firsts.items():
        for task_id in task_ids:
            task = dag.get_task(task_id)
            inside = {t for t in task.upstream_task_ids if t.startswith(f"{stage}.")}
            assert not inside and not task.is_teardown and len(recorders(task)) == 1, task_id


def test_the_recorder_writes_the_start_for_the_run(s3, monkeypatch):
    config = load_pipeline_config(ROOT / "include/pipelines/sample_service.yaml", environ={})
    registry = ReleaseRegistry(s3, BUCKET, config.application)
    monkeypatch.setattr(ReleaseRegistry, "for_config", classmethod(lambda cls, c: registry))
    (callback,) = recorders(build_pipeline_dag(config).get_task("2-commit.checkout"))

    class TaskInstance:
        def xcom_pull(self, task_ids):
            return {"version": "r7-abcdef1234"} if task_ids == "resolve_commit" else None

    callback({"ti": TaskInstance(), "run_id": "commit__abcdef1234"})
    entry = registry.get("r7-abcdef1234")["stages"]["2-commit"]
    assert entry["result"] == "running" and entry["run_id"] == "commit__abcdef1234" and entry["started_at"]
