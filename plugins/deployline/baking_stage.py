"""Stage 1, ``1-baking``: a new base image (AMI) from the repository's infrastructure script."""

from __future__ import annotations

import logging

from airflow.sdk import TaskGroup, chain, get_current_context

from deployline import aws, images
from deployline.config import PipelineConfig
from deployline.image_readiness import AmiAvailableSensor
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow
from deployline.sources import GitSource
from deployline.ssm_commands import ProvisionInstanceOperator

log = logging.getLogger(__name__)

DOC = """\
### 1-baking: a new base image

Runs when `classify_change` finds infrastructure changes (and for an application's first
release). `resolve_base_image` turns the configured base image (an AMI id or
`resolve:ssm:<parameter>`) into an AMI; `launch_builder` (a setup task) starts a builder
instance from it (IMDSv2 required, tagged `deployline:builder`); `provision_builder`
runs the repository's provisioning script *at this commit* on it through SSM Run
Command, waiting in the triggerer (no worker slot), and fails at once with the command's
status, exit code and stderr tail (output in the log); `create_base_image` makes the AMI
`<app>-base-<version>`, tagged with the application, version and commit;
`wait_for_base_image` is a deferrable sensor that waits for `available` without holding
a worker slot and fails at once on `failed`, `invalid` or `deregistered`;
`record_base_image` writes the base AMI to the release record. `terminate_builder`
(teardown) removes the builder instance on every path. When baking is skipped, the
last good base image is used.
"""


def image_tags(config: PipelineConfig, commit: dict, kind: str) -> dict[str, str]:
    return {
        "deployline:application": config.application,
        "deployline:version": commit["version"],
        "deployline:commit": commit["sha"],
        "deployline:kind": kind,
    }


def builder_key(config: PipelineConfig, commit: dict, kind: str) -> str:
    """Per run: retries of a task find their builder; a later run of the same commit gets its own
    (AWS hands a terminated instance back for a reused client token)."""
    return f"{config.application}-{kind}-{commit['version']}-{get_current_context()['run_id']}"


def baking_stage(config: PipelineConfig, commit) -> TaskGroup:
    baking = config.baking

    with TaskGroup("1-baking", tooltip="builder instance, provisioning, base AMI") as group:
        group.doc_md = DOC

        @task(task_id="resolve_base_image", retries=2)
        def resolve_base_image() -> str:
            image_id = images.resolve_base_image(aws.ssm(config), baking.base_image)
            log.info("base image %s resolves to %s", baking.base_image, image_id)
            return image_id

        @task(task_id="launch_builder", retries=2)
        def launch_builder(source_image: str, commit: dict) -> str:
            instance_id = images.launch_builder(
                aws.ec2(config),
                key=builder_key(config, commit, "base"),
                image_id=source_image,
                instance_type=baking.instance_type,
                subnet_id=baking.subnet_id,
                instance_profile=baking.instance_profile,
                tags=image_tags(config, commit, "builder"),
            )
            log.info("builder instance %s from %s", instance_id, source_image)
            return instance_id

        def provisioning_script(commit: dict) -> tuple[str, str]:
            script = GitSource.from_repository(config.repository).read_file(commit["sha"], baking.provision_script)
            return script, f"{config.application} {commit['version']} base image"

        @task(task_id="create_base_image", retries=2)
        def create_base_image(instance_id: str, source_image: str, commit: dict) -> str:
            tags = image_tags(config, commit, "base") | {"deployline:source-image": source_image}
            image_id = images.create_image(
                aws.ec2(config), instance_id=instance_id, name=f"{config.application}-base-{commit['version']}",
                tags=tags, description=f"{config.application} base image at {commit['sha']}",
            )
            log.info("base image %s created from builder %s", image_id, instance_id)
            return image_id

        @task(task_id="record_base_image", retries=2)
        def record_base_image(image_id: str, source_image: str, commit: dict) -> str:
            ReleaseRegistry.for_config(config).update(
                commit["version"],
                base_image={"id": image_id, "source_image": source_image, "baked": True, "version": commit["version"],
                            "commit": commit["sha"]},
                stages={"1-baking": {"result": "success", "finished_at": utcnow(),
                                     "run_id": get_current_context()["run_id"]}},
            )
            return image_id

        @task(task_id="terminate_builder")
        def terminate_builder(commit: dict) -> None:
            ended = images.terminate_builders(aws.ec2(config), key=builder_key(config, commit, "base"))
            log.info("terminated builder(s): %s", ", ".join(ended) or "none left")

        source = resolve_base_image()
        builder = launch_builder(source, commit)
        image = create_base_image(builder, source, commit)
        ready = AmiAvailableSensor(
            task_id="wait_for_base_image",
            image_id=image,
            aws_conn_id=config.aws.conn_id,
            region_name=config.aws.region,
            deferrable=True,
            poke_interval=15,
            timeout=baking.image_timeout,
        )
        recorded = record_base_image(image, source, commit)
        provisioned = ProvisionInstanceOperator(
            task_id="provision_builder", instance_id=builder, script=provisioning_script, op_kwargs={"commit": commit},
            timeout=baking.provision_timeout, aws_conn_id=config.aws.conn_id, region_name=config.aws.region,
            deferrable=True, poll_interval=15, retries=1,
            doc_md="The repository's provisioning script at this commit, run on the builder with SSM Run Command.",
        )
        chain(builder, provisioned, image, ready, recorded)
        recorded >> terminate_builder(commit).as_teardown(setups=builder)
    return group
