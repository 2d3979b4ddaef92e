"""``<app>_pipeline``: the deployment pipeline of one application, stages as task groups."""

from __future__ import annotations

import logging

from airflow.sdk import DAG, Param, chain, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from deployline.acceptance_stage import acceptance_stage
from deployline.baking_stage import baking_stage
from deployline.capacity_stage import capacity_stage
from deployline.changes import describe_change
from deployline.commit_stage import commit_stage
from deployline.config import PipelineConfig
from deployline.dag_defaults import START_DATE, default_args, with_trigger_form
from deployline.exploratory_stage import exploratory_stage
from deployline.notifications import PipelineFailureNotifier
from deployline.preproduction_stage import preproduction_stage
from deployline.production_stage import production_stage
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, make_version, utcnow
from deployline.sources import GitSource, UnknownCommit

log = logging.getLogger(__name__)

DOC = """\
## {app}: deployment pipeline

One run takes one commit of `{url}` (branch `{branch}`) through the stages of the
cloud deployment pipeline.  Runs are started by `{app}_commit_poll` for every new
commit (run id `commit__<short sha>`), or by hand with **Trigger** (leave `commit`
empty to build the branch head).

* `resolve_commit`: the commit, its author and message, and its version
  (`r<revision>-<short sha>`, revision = commits on the branch up to it).
* `classify_change`: what changed decides what runs. Infrastructure paths (`{globs}`)
  changed since the commit that baked the newest usable base image mean baking a new
  image; any other path changed since the newest usable build means `2-commit`
  ("usable": not rejected, failed or rolled back, so neither is ever reused). A commit
  that changes nothing is recorded and builds nothing.
* `1-baking`: a builder instance provisioned by the repository's infrastructure script,
  a base AMI from it (deferrable readiness sensor); the builder is always terminated.
* `2-commit`: build, unit tests, static analysis, artifact to S3.
* `3-acceptance`: an environment ({driver} driver) with the artifact, the acceptance tests
  against it, then the application AMI; the result is a release candidate.
* `5-exploratory`: asks `{app}_approve_exploratory` for approval and waits (deferred) while
  people try the candidate in their self-service environments (`{app}_self_service`).
* `6-capacity`, next to `5-exploratory`: load tests (Locust) at the expected and peak
  profiles, judged by the configured latency, error-rate and throughput thresholds.
* `7-pre-production`, only when 5 and 6 both succeeded in this run: the long-lived
  pre-production environment at production size on this version, smoke tests.
* `8-production`: asks `{app}_approve_production`, then a blue/green deploy behind the
  stable production address; unhealthy or failing smoke tests roll back to the live
  version. A version older than the live one is skipped as superseded.

A failed task is written to the release record (stage, task, error).

The release registry is `s3://{bucket}/{app}/releases/`.
"""


def build_pipeline_dag(config: PipelineConfig) -> DAG:
    source_args = {"url": config.repository.url, "branch": config.repository.branch}
    form = {
        "commit": Param(
            "",
            type="string",
            title="Commit",
            description="Full or short sha to build. Empty: the head of the branch.",
            pattern="^([0-9a-fA-F]{4,40})?$",
        ),
    }
    with DAG(
        dag_id=config.pipeline_dag_id,
        description=f"Deployment pipeline of {config.application}",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        # A run waiting for an approval is active for days but holds no worker slot (deferred):
        # a small limit would stop new commits from starting. Work is bounded by pools instead.
        max_active_runs=32,
        default_args=default_args(on_failure_callback=[_failure_recorder(config), PipelineFailureNotifier(config)]),
        tags=["deployline", config.application],
        doc_md=DOC.format(
            app=config.application,
            bucket=config.aws.artifact_bucket,
            globs=", ".join(config.infrastructure_paths),
            driver=config.environments.driver,
            **source_args,
        ),
    ) as dag:

        @task(task_id="resolve_commit", retries=2)
        def resolve_commit() -> dict:
            ctx = get_current_context()
            source = GitSource.from_repository(config.repository)
            requested = (ctx["dag_run"].conf or {}).get("commit") or ctx["params"].get("commit") or ""
            sha = requested.strip().lower() or source.head()
            try:
                commit = source.resolve(sha)
            except UnknownCommit as exc:
                raise AirflowFailException(str(exc)) from exc  # no retry: it will not appear
            if not source.on_branch(commit.sha):
                # Its revision number could make the branch's next releases look "superseded".
                raise AirflowFailException(
                    f"commit {commit.sha} is not on branch {config.repository.branch!r} of "
                    f"{source.display_url}: only commits the branch's head reaches are released (merge it first)")
            revision = source.revision_number(commit.sha)
            version = make_version(revision, commit.sha)
            log.info("building %s as %s: %s (%s)", commit.sha, version, commit.message, commit.author)
            return commit.to_dict() | {"revision": revision, "version": version}

        @task.branch(task_id="classify_change", retries=2)
        def classify_change(commit: dict) -> list[str]:
            ctx = get_current_context()
            source = GitSource.from_repository(config.repository)
            registry = ReleaseRegistry.for_config(config)
            change = describe_change(source, registry, commit, config.infrastructure_paths)
            result, paths = change.classification, change.paths
            included = [c.to_dict() for c in change.included]
            log.info("%d commit(s) since the last usable build (%s) and base image (%s), %d path(s) changed: %s",
                     len(included), change.previous_version or "none", change.image_version or "none",
                     len(paths), result.kind)
            for path in paths[:200]:
                log.info("  %s", path)
            registry.update(
                commit["version"],
                commit=commit,
                run_id=ctx["run_id"],
                previous_version=change.previous_version,
                included_commits=included,
                changed_paths=paths,
                classification=result.to_dict(),
                stages={"classify_change": {"result": result.kind, "finished_at": utcnow()}},
            )
            ctx["ti"].xcom_push(key="classification", value=result.to_dict())
            follow = (["1-baking.resolve_base_image"] if result.bake else []) + (
                ["2-commit.checkout"] if result.build else [])
            if not follow:
                log.info("nothing to bake or build for this commit")
            return follow

        commit = resolve_commit()
        branch = classify_change(commit)
        built = [baking_stage(config, commit), commit_stage(config, commit)]
        acceptance = acceptance_stage(config, commit)
        candidate = acceptance.children["3-acceptance.record_candidate"]
        # 5 and 6 run side by side on the candidate; 7 starts only when both succeeded (the fan-in).
        judged = [exploratory_stage(config, commit, candidate), capacity_stage(config, commit, candidate.output)]
        preproduction = preproduction_stage(config, commit, candidate.output)
        smoke_tested = preproduction.children["7-pre-production.smoke_test"]
        production = production_stage(config, commit, candidate.output, after=smoke_tested)
        chain(commit, branch, built, acceptance, judged, preproduction, production)
        for group in [*built, acceptance, *judged, preproduction, production]:
            _record_start(config, group)
    return with_trigger_form(dag, form)


def _record_start(config: PipelineConfig, group) -> None:
    """The first task(s) of a stage write its start to the release record, for stage durations;
    when a first task skips (nothing to do), the stage is closed as skipped."""
    tasks = list(group)
    inside = {t.task_id for t in tasks}
    started, skipped = _start_recorder(config, group.group_id), _skip_recorder(config, group.group_id)
    for first in (t for t in tasks if not (t.upstream_task_ids & inside) and not t.is_teardown):
        first.on_execute_callback = [*(first.on_execute_callback or []), started]
        first.on_skipped_callback = [*(first.on_skipped_callback or []), skipped]


def _skip_recorder(config: PipelineConfig, stage: str):
    def record_skip(context) -> None:
        commit = context["ti"].xcom_pull(task_ids="resolve_commit")
        if not commit:
            return
        reason = str(context.get("exception") or f"{context['ti'].task_id} skipped")
        try:
            ReleaseRegistry.for_config(config).stage_skipped(commit["version"], stage, context["run_id"], reason)
        except Exception:  # the skip itself must stand
            log.exception("could not record the skip of %s", stage)

    return record_skip


def _start_recorder(config: PipelineConfig, stage: str):
    def record_start(context) -> None:
        commit = context["ti"].xcom_pull(task_ids="resolve_commit")
        if not commit:
            return
        try:
            ReleaseRegistry.for_config(config).stage_started(commit["version"], stage, context["run_id"])
        except Exception:  # a missing start time must not fail the stage itself
            log.exception("could not record the start of %s", stage)

    return record_start


def _failure_recorder(config: PipelineConfig):
    """An on_failure_callback that writes the failed task to the release record."""

    def record_failure(context) -> None:
        ti = context["ti"]
        commit = ti.xcom_pull(task_ids="resolve_commit")
        if not commit:
            return  # the commit itself could not be resolved: there is no record to write to
        stage = ti.task_id.split(".", 1)[0] if "." in ti.task_id else ti.task_id
        error = str(context.get("exception") or "")[-1000:]
        try:
            ReleaseRegistry.for_config(config).update(commit["version"], stages={stage: {
                "result": "failed", "task": ti.task_id, "error": error, "finished_at": utcnow(),
                "run_id": context["run_id"]}})
        except Exception:  # never hide the task's own failure behind a registry problem
            log.exception("could not record the failure of %s", ti.task_id)

    return record_failure
