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
from deployline.environments.base import EnvironmentFailed, EnvironmentSpec, environment_name
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry
from deployline.sources import GitSource
from deployline.stack_readiness import StackOperator
from deployline.workdirs import remove_workspace, workspace

log = logging.getLogger(__name__)

# How often a deferred environment task's trigger looks at its stack, and how long one stack
# operation may take (a load balancer and instances take minutes: as the driver's blocking wait).
STACK_POLL_INTERVAL = 15
STACK_TIMEOUT = 1800


def stack_task(config: PipelineConfig, task_id: str, start: Callable, finish: Callable, doc: str,
               op_kwargs: dict | None = None, **operator_args):
    """A :class:`StackOperator` task with the pipeline's AWS connection: ``start`` (a driver's
    ``start_*``) until nothing is left to wait for, waiting in the triggerer; returns its output."""
    return StackOperator(
        task_id=task_id, start=start, finish=finish, op_kwargs=op_kwargs or {}, doc_md=doc,
        aws_conn_id=config.aws.conn_id, region_name=config.aws.region,
        poll_interval=STACK_POLL_INTERVAL, timeout=STACK_TIMEOUT, **operator_args,
    ).output


def existing_environment(driver, name: str):
    info = driver.get(name)
    if info is None:
        raise EnvironmentFailed(f"environment {name} is gone after its stack settled")
    return info


def run_repository_test(config: PipelineConfig, test: RepositoryTest | None, field: str, commit: dict, endpoint: str,
                        expected_version: str, key: str) -> list[str]:
    """Run ``test.command`` from the repository at ``commit`` against ``endpoint``; the last output lines.

    The command gets ``BASE_URL``, ``EXPECTED_VERSION`` (the artifact's version: an
    infrastructure-only release runs an earlier build) and ``EXPECTED_COMMIT`` (the commit that
    artifact was built from, from its release record), so the tests can check what is deployed.
    """
    if test is None:
        raise RuntimeError(f"{config.source_file}: {field}: no command is configured")
    built_by = ReleaseRegistry.for_config(config).get(expected_version) or {}
    expected_commit = (built_by.get("commit") or {}).get("sha")
    if not expected_commit:
        raise RuntimeError(f"{field}: the release record of {expected_version}, which built the artifact, "
                           "names no commit: cannot tell the tests which build to expect")
    checkout = GitSource.from_repository(config.repository).checkout(commit["sha"], workspace(config.application, key))
    try:
        command = test.command.format(base_url=shlex.quote(endpoint))
        env = {"BASE_URL": endpoint, "EXPECTED_VERSION": expected_version, "EXPECTED_COMMIT": expected_commit}
        return run_command(command, checkout / config.commit_stage.workdir, test.timeout,
                           env=config.commit_stage.env | env, logger=log)
    finally:
        remove_workspace(config.application, key)


def run_environment(config: PipelineConfig, stage: str, size: int, inputs, commit,
                    image_of: Callable[[dict], str | None]):
    """``provision_environment`` (setup) -> ``wait_until_healthy``, and the ``teardown_environment`` task.

    The environment is named after the stage and run, so a retry finds its own.  ``inputs`` is
    an XCom with the ``artifact`` to run; ``image_of(inputs)`` is the AMI (cloudformation driver).
    Provisioning and teardown wait for their stack in the triggerer (``StackOperator``); with the
    local driver they finish at once.
    Returns (provisioned, endpoint, teardown); wire ``teardown.as_teardown(setups=provisioned)``.
    """
    envs = config.environments

    def env_name() -> str:
        return environment_name(config.application, stage, get_current_context()["run_id"])

    def start_provision(inputs: dict, commit: dict):
        spec = EnvironmentSpec(
            application=config.application, stage=stage, name=env_name(), size=size, version=commit["version"],
            artifact=inputs["artifact"], image_id=image_of(inputs),
            labels={"run_id": get_current_context()["run_id"]},
        )
        return aws.environment_driver(config).start_provision(spec)

    def provisioned_info(inputs: dict, commit: dict) -> dict:
        info = existing_environment(aws.environment_driver(config), env_name())
        log.info("%s environment %s at %s (%d)", stage, info.name, info.endpoint, info.size)
        return info.to_dict()

    def start_teardown():
        return aws.environment_driver(config).start_teardown(env_name())

    def torn_down() -> None:
        log.info("environment %s removed (or already gone)", env_name())

    @task(task_id="wait_until_healthy", **envs.host_queue())
    def wait_until_healthy() -> str:
        info = aws.environment_driver(config).wait_until_healthy(env_name(), envs.health_path, envs.health_timeout)
        log.info("environment %s is healthy at %s", info.name, info.endpoint)
        return info.endpoint

    provisioned = stack_task(
        config, "provision_environment", start_provision, provisioned_info,
        f"The {stage} environment of this run, created or found (a retry finds its own); its stack is "
        "waited for in the triggerer.", op_kwargs={"inputs": inputs, "commit": commit}, retries=1,
        **envs.host_queue())
    endpoint = wait_until_healthy()
    chain(provisioned, endpoint)
    teardown = stack_task(
        config, "teardown_environment", start_teardown, torn_down,
        f"Removes the {stage} environment of this run on every path; its stack's delete is waited for "
        "in the triggerer.", **envs.host_queue())
    return provisioned, endpoint, teardown
