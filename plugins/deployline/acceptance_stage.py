"""Stage 3, ``3-acceptance``: the release in a real environment, then the application image."""

from __future__ import annotations

import logging
import re
import shlex

from airflow.sdk import TaskGroup, TriggerRule, chain, get_current_context
from airflow.sdk.exceptions import AirflowSkipException

from deployline import aws, images
from deployline.artifacts import ArtifactError
from deployline.baking_stage import builder_key, image_tags
from deployline.config import PipelineConfig
from deployline.environment_tasks import run_environment, run_repository_test
from deployline.image_readiness import AmiAvailableSensor
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow
from deployline.sources import GitSource
from deployline.ssm_commands import ProvisionInstanceOperator

log = logging.getLogger(__name__)

DOC = """\
### 3-acceptance: a release candidate

Runs when what ran before it succeeded (baking, the commit stage, or both).
`select_inputs` picks the base image (baked by this run, else the last good one) and
the artifact (built by this run, else the last published one). `provision_environment`
(setup) starts an environment of the acceptance size with the configured driver (`{driver}`);
`wait_until_healthy` waits for every worker or instance to answer `{health}`;
`acceptance_test` runs the repository's acceptance tests at this commit against the
environment's URL (output in the log); `teardown_environment` removes the environment on
every path. Then the application image: `launch_image_builder` (setup) starts an instance
from the base image, `install_artifact` installs the artifact (sha256 checked) with the
provisioning script through SSM Run Command (waiting in the triggerer), `create_application_image` and the deferrable
`wait_for_application_image` make the AMI `<app>-<version>`, and `terminate_image_builder`
(teardown) removes the instance. `record_candidate` writes the release candidate to the
registry.
"""

# The artifact is checked against the release record's sha256 on the builder, after the download and
# before the provisioning script sees it: a tampered or replaced artifact never gets into an image.
INSTALL_SCRIPT = """\
set -euo pipefail
uri={uri}
expected={sha256}
artifact=/tmp/deployline-{version}.tar.gz
aws s3 cp --only-show-errors "$uri" "$artifact"
actual=$(sha256sum "$artifact" | cut -d' ' -f1)
if [ "$actual" != "$expected" ]; then
  rm -f "$artifact"
  echo "artifact $uri has sha256 $actual, the release record says $expected:" \
    "refusing a tampered or replaced artifact" >&2
  exit 1
fi
cat > /tmp/deployline-provision.sh <<'DEPLOYLINE_SCRIPT_END'
{script}
DEPLOYLINE_SCRIPT_END
bash /tmp/deployline-provision.sh "$artifact"
"""


def install_script(version: str, artifact: dict, script: str) -> str:
    """The shell script that downloads ``artifact``, verifies its sha256 and runs ``script`` with it."""
    sha256 = str(artifact.get("sha256") or "")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ArtifactError(f"artifact {artifact.get('uri')}: the release record's sha256 {sha256!r} "
                            "is not a sha256 (64 hex digits): refusing to install it")
    return INSTALL_SCRIPT.format(version=version, uri=shlex.quote(artifact["uri"]), sha256=sha256, script=script)


def select_release_inputs(registry: ReleaseRegistry, commit: dict) -> dict:
    """The base image and artifact this version is tested with; raises when there is none yet."""
    record = registry.get(commit["version"]) or {}
    base = record.get("base_image") or registry.last_good_base_image(before_revision=commit["revision"])
    artifact, artifact_version = record.get("artifact"), record.get("artifact_version", commit["version"])
    if not artifact:
        previous = registry.last_published(before_revision=commit["revision"])
        if previous:
            artifact, artifact_version = previous["artifact"], previous.get("artifact_version", previous["version"])
    problems = [what for what, found in (("base image", base), ("artifact", artifact)) if not found]
    if problems:
        raise RuntimeError(
            f"no {' and no '.join(problems)} for {commit['version']}: nothing was baked or built before it. "
            "Trigger the pipeline for a commit that changes the application and the infrastructure."
        )
    return {"base_image": base, "artifact": artifact, "artifact_version": artifact_version}


def acceptance_stage(config: PipelineConfig, commit) -> TaskGroup:
    envs = config.environments

    with TaskGroup("3-acceptance", tooltip="environment, acceptance tests, application AMI") as group:
        group.doc_md = DOC.format(driver=envs.driver, health=envs.health_path)

        @task(task_id="select_inputs", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, retries=2)
        def select_inputs(commit: dict) -> dict:
            # It also follows resolve_commit (for the commit): so say "nothing ran" explicitly.
            kind = get_current_context()["ti"].xcom_pull(task_ids="classify_change", key="classification")["kind"]
            if kind == "none":
                raise AirflowSkipException("nothing was baked or built for this commit: no new candidate")
            registry = ReleaseRegistry.for_config(config)
            inputs = select_release_inputs(registry, commit)
            registry.update(commit["version"], **inputs)
            log.info("base image %s (%s), artifact %s of %s", inputs["base_image"]["id"],
                     "baked now" if inputs["base_image"].get("version") == commit["version"] else "reused",
                     inputs["artifact"]["uri"], inputs["artifact_version"])
            return inputs

        @task(task_id="acceptance_test", **envs.host_queue())
        def acceptance_test(endpoint: str, inputs: dict, commit: dict) -> list[str]:
            return run_repository_test(config, config.acceptance, "acceptance", commit, endpoint,
                                       inputs["artifact_version"], f"{get_current_context()['run_id']}-acceptance")

        @task(task_id="launch_image_builder", retries=2)
        def launch_image_builder(inputs: dict, commit: dict) -> str:
            return images.launch_builder(
                aws.ec2(config), key=builder_key(config, commit, "app"), image_id=inputs["base_image"]["id"],
                instance_type=config.baking.instance_type, subnet_id=config.baking.subnet_id,
                instance_profile=config.baking.instance_profile, tags=image_tags(config, commit, "builder"),
            )

        def installation_script(inputs: dict, commit: dict) -> tuple[str, str]:
            script = GitSource.from_repository(config.repository).read_file(
                commit["sha"], config.baking.provision_script)
            return (install_script(commit["version"], inputs["artifact"], script),
                    f"{config.application} {commit['version']} install")

        @task(task_id="create_application_image", retries=2)
        def create_application_image(instance_id: str, inputs: dict, commit: dict) -> str:
            tags = image_tags(config, commit, "application") | {
                "deployline:base-image": inputs["base_image"]["id"],
                "deployline:artifact-sha256": inputs["artifact"]["sha256"],
            }
            return images.create_image(
                aws.ec2(config), instance_id=instance_id, name=f"{config.application}-{commit['version']}",
                tags=tags, description=f"{config.application} {commit['version']} ({commit['sha']})",
            )

        @task(task_id="terminate_image_builder")
        def terminate_image_builder(commit: dict) -> None:
            ended = images.terminate_builders(aws.ec2(config), key=builder_key(config, commit, "app"))
            log.info("terminated image builder(s): %s", ", ".join(ended) or "none left")

        @task(task_id="record_candidate", retries=2)
        def record_candidate(image_id: str, inputs: dict, commit: dict, test_output: list[str]) -> dict:
            ctx = get_current_context()
            candidate = {
                "version": commit["version"], "commit": commit["sha"], "application_image": image_id,
                "base_image": inputs["base_image"]["id"], "artifact": inputs["artifact"],
                "artifact_version": inputs["artifact_version"], "acceptance_output": test_output[-10:],
                "recorded_at": utcnow(), "run_id": ctx["run_id"],
            }
            ReleaseRegistry.for_config(config).update(
                commit["version"], candidate=candidate, application_image={"id": image_id},
                stages={"3-acceptance": {"result": "success", "finished_at": utcnow(), "run_id": ctx["run_id"]}},
            )
            log.info("release candidate %s: application image %s", commit["version"], image_id)
            return candidate

        inputs = select_inputs(commit)
        environment, endpoint, teardown = run_environment(
            config, "acceptance", envs.sizes.acceptance, inputs, commit, image_of=lambda i: i["base_image"]["id"])
        tested = acceptance_test(endpoint, inputs, commit)
        tested >> teardown.as_teardown(setups=environment)

        builder = launch_image_builder(inputs, commit)
        image = create_application_image(builder, inputs, commit)
        ready = AmiAvailableSensor(
            task_id="wait_for_application_image", image_id=image, aws_conn_id=config.aws.conn_id,
            region_name=config.aws.region, deferrable=True, poke_interval=15, timeout=config.baking.image_timeout,
        )
        recorded = record_candidate(image, inputs, commit, tested)
        installed = ProvisionInstanceOperator(
            task_id="install_artifact", instance_id=builder, script=installation_script,
            op_kwargs={"inputs": inputs, "commit": commit}, timeout=config.baking.provision_timeout,
            aws_conn_id=config.aws.conn_id, region_name=config.aws.region, deferrable=True, poll_interval=15,
            retries=1, doc_md="The artifact (sha256 checked) installed on the image builder with the provisioning "
            "script, through SSM Run Command.",
        )
        chain(tested, builder, installed, image, ready, recorded)
        recorded >> terminate_image_builder(commit).as_teardown(setups=builder)
    return group
