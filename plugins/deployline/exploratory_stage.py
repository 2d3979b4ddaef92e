"""Stage 5, ``5-exploratory``: people try the candidate (self-service) and approve or reject it."""

from __future__ import annotations

from airflow.sdk import TaskGroup

from deployline.approvals import approval_tasks
from deployline.config import PipelineConfig
from deployline.releases import ReleaseRegistry, utcnow

DOC = """\
### 5-exploratory: people try it, then approve or reject

`describe_release` summarizes the candidate (version, commit, application image, links);
`request_approval` creates the `{app}_approve_exploratory` run with this run's id and
logical date (a rerun never creates a second one) and `notify_approval_requested`
tells the application's SNS topic. Meanwhile anyone authorized launches their own
environment of this candidate with `{app}_self_service`. `await_approval` is a deferrable
`ExternalTaskSensor` on the gate's `decision`: it holds no worker slot while it waits,
succeeds when `decision` is marked success (approved) and fails when it is marked failed
(rejected) or times out ({hours:g} h), which stops the release here.

The fan-in closes at once: when `6-capacity` fails, the gate withdraws its request (its
`decision` ends *skipped*, answered Reject with the comment "Withdrawn: <reason>" on the
Required Actions page) and `await_approval` ends skipped; when the decision is a rejection
(or none comes in time) while the load tests run, they stop and `6-capacity` ends skipped
with that reason.
"""


def exploratory_stage(config: PipelineConfig, commit, candidate_recorded) -> TaskGroup:
    with TaskGroup("5-exploratory", tooltip="exploratory approval while people use self-service") as group:
        group.doc_md = DOC.format(app=config.application, hours=config.approvals.exploratory.timeout_hours)
        *_, wait = approval_tasks(config, "exploratory", commit, after=candidate_recorded)
        # The approval ends the stage; a rejection is written by the pipeline's failure callback.
        wait.on_success_callback = [_record_approved(config)]
    return group


def _record_approved(config: PipelineConfig):
    def record_approved(context) -> None:
        commit = context["ti"].xcom_pull(task_ids="resolve_commit")
        if commit:
            ReleaseRegistry.for_config(config).update(commit["version"], stages={"5-exploratory": {
                "result": "success", "finished_at": utcnow(), "run_id": context["run_id"]}})

    return record_approved
