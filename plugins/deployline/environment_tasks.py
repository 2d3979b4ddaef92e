"""Tasks several stages share: an environment for one run (setup, health, teardown) and test commands
from the repository run against a live environment."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable

from airflow.sdk import chain, get_current_context

from deployline import aws
from deployline.commands import run_command
from deployline.config import PipelineConfig, RepositoryTest
from deployline.environments.base import EnvironmentSpec, environment_name
from deployline.python_tasks import task
from deployline.sources import GitSource
from deployline.workdirs import remove_workspace, workspace

log = logging.getLogger(__name__)


def run_repository_test(config: PipelineConfig, test: RepositoryTest | None, field: str, commit: dict, endpoint: str,
                        expected_version: str, key: str) -> list[str]:
    """Run ``test.command`` from the repository at ``commit`` against ``endpoint``; the last output lines."""
    if test is None:
        raise RuntimeError(f"{config.source_file}: {field}: no command is configured")
    checkout = GitSource.from_repository(config.repository).checkout(commit["sha"], workspace(config.application, key))
    try:
        command = test.command.format(base_url=shlex.quote(endpoint))
        env = {"BASE_URL": endpoint, "EXPECTED_VERSION": expected_version}
        return run_command(command, checkout / config.commit_stage.workdir, test.timeout,
                           env=config.commit_stage.env | env, logger=log)
    finally:
        remove_workspace(config.application, key)


def run_environment(config: PipelineConfig, stage: str, size: int, inputs, commit,
                    image_of: Callable[[dict], str | None]):
    """``provision_environment`` (setup) -> ``wait_until_healthy``, and the ``teardown_environment`` task.

    The environment is named after the stage and run, so a retry finds its own.  ``inputs`` is
    an XCom with the ``artifact`` to run; ``image_of(inputs)`` is the AMI (cloudformation driver).
    Returns (provisioned, endpoint, teardown); wire ``teardown.as_teardown(setups=provisioned)``.
    """
    envs = config.environments

    def env_name() -> str:
        return environment_name(config.application, stage, get_current_context()["run_id"])

    @task(task_id="provision_environment", retries=1, **envs.host_queue())
    def provision_environment(inputs: dict, commit: dict) -> dict:
        spec = EnvironmentSpec(
            application=config.application, stage=stage, name=env_name(), size=size, version=commit["version"],
            artifact=inputs["artifact"], image_id=image_of(inputs),
            labels={"run_id": get_current_context()["run_id"]},
        )
        info = aws.environment_driver(config).provision(spec)
        log.info("%s environment %s at %s (%d)", stage, info.name, info.endpoint, info.size)
        return info.to_dict()

    @task(task_id="wait_until_healthy", **envs.host_queue())
    def wait_until_healthy() -> str:
        info = aws.environment_driver(config).wait_until_healthy(env_name(), envs.health_path, envs.health_timeout)
        log.info("environment %s is healthy at %s", info.name, info.endpoint)
        return info.endpoint

    @task(task_id="teardown_environment", **envs.host_queue())
    def teardown_environment() -> None:
        removed = aws.environment_driver(config).teardown(env_name())
        log.info("environment %s %s", env_name(), "removed" if removed else "was already gone")

    provisioned = provision_environment(inputs, commit)
    endpoint = wait_until_healthy()
    chain(provisioned, endpoint)
    return provisioned, endpoint, teardown_environment()
