"""Stage 2, ``2-commit``: clean checkout, build, unit tests, static analysis, publish the artifact."""

from __future__ import annotations

import logging
from datetime import timedelta

from airflow.sdk import TaskGroup, chain, get_current_context

from deployline import artifacts
from deployline.commands import run_command
from deployline.config import PipelineConfig
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow
from deployline.sources import GitSource
from deployline.workdirs import remove_workspace, workspace

log = logging.getLogger(__name__)

DOC = """\
### 2-commit: build once, test, store

Runs when `classify_change` finds application changes. In a clean checkout of the
commit (`checkout`, a setup task), it runs the configured `build`, then `unit_test` and
`static_analysis` side by side; each command's output is in its task log, and a
failure names the command and the last lines it printed.  `publish_artifact` uploads
the one file the artifact glob matches to
`s3://<bucket>/<app>/artifacts/<version>/` with its sha256 in the object metadata,
and writes the release record `s3://<bucket>/<app>/releases/<version>.json`.
Later stages use this very artifact and verify its sha256.  `clean_workspace`
(a teardown task) removes the checkout on every path.
"""


def _command_env(commit: dict) -> dict[str, str]:
    return {"DEPLOYLINE_VERSION": commit["version"], "DEPLOYLINE_COMMIT": commit["sha"]}


# A failing command fails for good (CommandFailed is final); a try lost with its worker is
# retried, and the retry first stops what the lost try left running.
AFTER_A_LOST_WORKER = {"retries": 1, "retry_delay": timedelta(seconds=5)}


def commit_stage(config: PipelineConfig, commit) -> TaskGroup:
    """The ``2-commit`` group; ``commit`` is the ``resolve_commit`` output."""
    stage = config.commit_stage

    def run_step(step_name: str, commit: dict) -> None:
        step = getattr(stage, step_name)
        ctx = get_current_context()
        folder = workspace(config.application, ctx["run_id"]) / stage.workdir
        run_command(step.command, folder, step.timeout, env=stage.env | _command_env(commit), logger=log)

    with TaskGroup("2-commit", tooltip="build, unit test, static analysis, publish", ) as group:
        group.doc_md = DOC

        @task(task_id="checkout", retries=2)
        def checkout(commit: dict) -> str:
            ctx = get_current_context()
            dest = workspace(config.application, ctx["run_id"])
            GitSource.from_repository(config.repository).checkout(commit["sha"], dest)
            log.info("checked out %s at %s", commit["sha"], dest)
            return str(dest)

        @task(task_id="build", execution_timeout=config.step_timeout("build"), **AFTER_A_LOST_WORKER)
        def build(commit: dict) -> None:
            run_step("build", commit)

        @task(task_id="unit_test", execution_timeout=config.step_timeout("unit_test"), **AFTER_A_LOST_WORKER)
        def unit_test(commit: dict) -> None:
            run_step("unit_test", commit)

        @task(task_id="static_analysis", execution_timeout=config.step_timeout("static_analysis"),
              **AFTER_A_LOST_WORKER)
        def static_analysis(commit: dict) -> None:
            run_step("static_analysis", commit)

        @task(task_id="publish_artifact", retries=2)
        def publish_artifact(commit: dict) -> dict:
            ctx = get_current_context()
            folder = workspace(config.application, ctx["run_id"]) / stage.workdir
            dist = artifacts.find_distribution(folder, stage.artifact)
            registry = ReleaseRegistry.for_config(config)
            artifact, uploaded = artifacts.publish(
                registry.s3_client, config.aws.artifact_bucket, config.application, commit["version"], dist,
                source=config.source_file,
            )
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
            removed = remove_workspace(config.application, ctx["run_id"])
            log.info("workspace %s", "removed" if removed else "was already gone")

        checked_out = checkout(commit)
        built = build(commit)
        published = publish_artifact(commit)
        chain(checked_out, built, [unit_test(commit), static_analysis(commit)], published)
        published >> clean_workspace().as_teardown(setups=checked_out)
    return group
