"""Stage 2, ``2-commit``: clean checkout, build, unit tests, static analysis, publish the artifact."""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path

from airflow.sdk import TaskGroup, chain, get_current_context

from deployline import artifacts, aws, workspace_store
from deployline.commands import run_command
from deployline.config import PipelineConfig
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow
from deployline.sources import GitSource
from deployline.workdirs import remove_workspace, safe_name, workspace

log = logging.getLogger(__name__)

DOC = """\
### 2-commit: build once, test the very build, store

Runs when `classify_change` finds application changes. `checkout` (a setup task) takes
the commit's tree; `build` runs the configured build in it; `unit_test` and
`static_analysis` run side by side on that very build. Each task may run on any worker:
the tree and the built workspace are kept in S3 under the run
(`s3://<bucket>/<app>/workspaces/<run>/`) and their sha256 in XCom, and each task
restores and checks what it uses. Each command's output is in its task log, and a
failure names the command and the last lines it printed. `publish_artifact` uploads
the one file the artifact glob matches to `s3://<bucket>/<app>/artifacts/<version>/`
with its sha256, and writes the release record
`s3://<bucket>/<app>/releases/<version>.json`. Later stages use this very artifact and
verify its sha256. `clean_workspace` (a teardown task) deletes the run's workspaces on
every path.
"""


def _command_env(config: PipelineConfig, commit: dict, step: str) -> dict[str, str]:
    """What a commit's command sees besides the allow-list: the config's env, the version and commit,
    and the short-lived credentials of ``commit_stage.aws_role_arn`` when it names one."""
    env = config.commit_stage.env | {"DEPLOYLINE_VERSION": commit["version"], "DEPLOYLINE_COMMIT": commit["sha"]}
    role = config.commit_stage.aws_role_arn
    if role:
        env |= aws.command_credentials(config, role, f"deployline-{config.application}-{step}")
        log.info("%s gets 15-minute credentials of %s", step, role)
    return env


# A failing command fails for good (CommandFailed is final); a try lost with its worker is
# retried (on any worker), and the retry first stops what the lost try left running.
AFTER_A_LOST_WORKER = {"retries": 1, "retry_delay": timedelta(seconds=5)}


def _run_folder(ctx) -> str:
    return safe_name(ctx["run_id"])


def _scratch(config: PipelineConfig, ctx) -> Path:
    """This task's own folder on this worker (the same on a retry here, so a retry replaces it)."""
    return workspace(config.application, ctx["run_id"]) / ctx["ti"].task_id.rsplit(".", 1)[-1]


def _snapshot_key(config: PipelineConfig, ctx, name: str) -> str:
    return f"{workspace_store.run_prefix(config.application, _run_folder(ctx))}{name}.tar.gz"


def commit_stage(config: PipelineConfig, commit) -> TaskGroup:
    """The ``2-commit`` group; ``commit`` is the ``resolve_commit`` output."""
    stage = config.commit_stage
    bucket = config.aws.artifact_bucket

    def restored(snapshot: dict, ctx) -> tuple[Path, Path]:
        """The snapshot unpacked in this task's folder: (folder, the configured workdir in it)."""
        folder = _scratch(config, ctx)
        with artifacts.bucket_must_exist(bucket, config.source_file):
            workspace_store.restore(aws.s3(config), snapshot, folder)
        log.info("restored %s (sha256 %s, checked) in %s", snapshot["key"], snapshot["sha256"], folder)
        return folder, folder / stage.workdir

    def run_step(step_name: str, commit: dict, build: dict) -> None:
        step = getattr(stage, step_name)
        ctx = get_current_context()
        folder, workdir = restored(build, ctx)
        try:
            run_command(step.command, workdir, step.timeout, env=_command_env(config, commit, step_name),
                        logger=log)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    with TaskGroup("2-commit", tooltip="build, unit test, static analysis, publish", ) as group:
        group.doc_md = DOC

        @task(task_id="checkout", retries=2)
        def checkout(commit: dict) -> dict:
            ctx = get_current_context()
            folder = _scratch(config, ctx)
            try:
                GitSource.from_repository(config.repository).checkout(commit["sha"], folder)
                with artifacts.bucket_must_exist(bucket, config.source_file):
                    snapshot = workspace_store.store(aws.s3(config), bucket, _snapshot_key(config, ctx, "source"),
                                                     folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            log.info("checked out %s: %s (%d bytes, sha256 %s)", commit["sha"], snapshot.uri, snapshot.size,
                     snapshot.sha256)
            return snapshot.to_dict()

        @task(task_id="build", execution_timeout=config.step_timeout("build"), **AFTER_A_LOST_WORKER)
        def build(commit: dict, source: dict) -> dict:
            ctx = get_current_context()
            folder, workdir = restored(source, ctx)
            try:
                run_command(stage.build.command, workdir, stage.build.timeout,
                            env=_command_env(config, commit, "build"), logger=log)
                with artifacts.bucket_must_exist(bucket, config.source_file):
                    snapshot = workspace_store.store(aws.s3(config), bucket, _snapshot_key(config, ctx, "build"),
                                                     folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            log.info("built workspace stored: %s (%d bytes, sha256 %s)", snapshot.uri, snapshot.size, snapshot.sha256)
            return snapshot.to_dict()

        @task(task_id="unit_test", execution_timeout=config.step_timeout("unit_test"), **AFTER_A_LOST_WORKER)
        def unit_test(commit: dict, build: dict) -> None:
            run_step("unit_test", commit, build)

        @task(task_id="static_analysis", execution_timeout=config.step_timeout("static_analysis"),
              **AFTER_A_LOST_WORKER)
        def static_analysis(commit: dict, build: dict) -> None:
            run_step("static_analysis", commit, build)

        @task(task_id="publish_artifact", retries=2)
        def publish_artifact(commit: dict, build: dict) -> dict:
            ctx = get_current_context()
            folder, workdir = restored(build, ctx)
            try:
                dist = artifacts.find_distribution(workdir, stage.artifact)
                registry = ReleaseRegistry.for_config(config)
                artifact, uploaded = registry.publish(commit["version"], dist, folder / "published")
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if uploaded:
                log.info("published %s (sha256 %s, %d bytes)", artifact.uri, artifact.sha256, artifact.size)
            else:
                log.info("%s was published before (sha256 %s): build once, keeping it", artifact.uri, artifact.sha256)
            registry.update(
                commit["version"],
                artifact=artifact.to_dict(),
                artifact_version=commit["version"],
                stages={"2-commit": {"result": "success", "finished_at": utcnow(), "run_id": ctx["run_id"]}},
            )
            return artifact.to_dict()

        @task(task_id="clean_workspace")
        def clean_workspace() -> None:
            ctx = get_current_context()
            with artifacts.bucket_must_exist(bucket, config.source_file):
                deleted = workspace_store.delete_run(aws.s3(config), bucket, config.application, _run_folder(ctx))
            local = remove_workspace(config.application, ctx["run_id"])  # what a killed try left on this worker
            log.info("deleted %d workspace object(s) of this run from s3://%s/%s%s", deleted, bucket,
                     workspace_store.run_prefix(config.application, _run_folder(ctx)),
                     "; removed this worker's leftover folder" if local else "")

        source = checkout(commit)
        built = build(commit, source)
        published = publish_artifact(commit, built)
        chain(source, built, [unit_test(commit, built), static_analysis(commit, built)], published)
        published >> clean_workspace().as_teardown(setups=source)
    return group
