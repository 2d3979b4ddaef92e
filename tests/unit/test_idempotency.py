"""Idempotent retries (issue 8): a retried task, or a cleared and rerun stage, creates no second AMI,
instance, stack, artifact, environment, router, deployment entry or gate run.

One test (or more) per task that touches AWS or creates something, at the level of the library
functions the task calls, with the task's own names and keys. Each runs the function twice, or
simulates a retry after a crash in the middle (the resource was made, the task died before it
returned or recorded it), and then counts what exists: ``describe_images`` by name,
``describe_instances`` by tag and state, ``describe_stacks``, ``list_objects_v2`` and ETags, the
local driver's environment folders and processes, the release record.

AWS is moto in process. Where moto (5.2.5) does not enforce an AWS guarantee the code relies on, the
test says so: moto ignores ``run_instances``' ``ClientToken``, so ``TokenHonouringEc2`` below adds
what AWS documents ("the same response ... the client token is valid for at least 24 hours after the
termination of the instance") on top of moto.

Covered elsewhere, and not repeated here:

* tests/unit/test_images.py::test_launch_builder_twice_gives_one_instance_with_imdsv2,
  ::test_terminate_builders_is_idempotent, ::test_create_image_is_idempotent_by_name_and_tags_image_and_snapshots,
  ::test_client_token_is_deterministic_and_short
* tests/unit/test_registry_and_artifacts.py::test_publish_with_sha256_build_once_and_verify,
  ::test_a_stage_keeps_its_start_time_for_the_same_run
* tests/unit/test_local_environments.py::test_provision_runs_workers_behind_a_proxy_and_is_idempotent,
  ::test_teardown_kills_every_process_even_if_some_are_dead
* tests/unit/test_cloudformation_environments.py::test_provisioning_twice_leaves_one_stack
* tests/unit/test_cloudformation_blue_green.py::test_router_is_created_once,
  ::test_green_spec_is_stable_across_retries, ::test_update_without_changes_is_not_an_error
* tests/unit/test_blue_green_local.py::test_a_retry_after_the_switch_does_nothing
* tests/unit/test_self_service_requests.py::test_a_retried_provision_knows_it_created_the_environment,
  ::test_launch_records_the_environment_and_a_relaunch_reuses_and_extends_it,
  ::test_launch_reuse_and_reap_with_the_local_driver
* tests/unit/test_support_infrastructure.py::test_launch_again_changes_nothing
* tests/e2e/test_approvals.py::test_rerunning_the_stage_creates_no_second_gate_run (the gate run, in Airflow)
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import boto3
import psutil
import pytest
from botocore.exceptions import ClientError
from deployline import images
from deployline import infrastructure as infra
from deployline.baking_stage import builder_key
from deployline.capacity_stage import _upload_reports
from deployline.config import CloudFormationSettings, Production, load_pipeline_config
from deployline.deployments import AFTER_SWITCH, RolledBack, blue_green, remove_idle
from deployline.environments.base import EnvironmentFailed, EnvironmentSpec, environment_name
from deployline.environments.cloudformation import CloudFormationDriver
from deployline.images import BUILDER_TAG, ImageError, create_image, launch_builder, terminate_builders
from deployline.pipeline import build_pipeline_dag
from deployline.preproduction_stage import preproduction_name
from deployline.production_stage import record_deployment
from deployline.releases import ReleaseRegistry
from deployline.self_service import provision, record_launch, resolve_request
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from test_local_environments import get

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "deployline-idempotency-test"  # the conftest ``s3`` fixture creates it
REGION = "us-east-1"
APP = "sample_service"
V1, V2 = "r1-abcdef0123", "r2-bcdef01234"
RUN = "commit__abcdef0123"
COMMIT = {"sha": "abcdef0123" + "0" * 30, "version": V1, "revision": 1}
FAST = Production(drain_seconds=0.2, verify_seconds=0.5, check_interval=0.2)


class Crash(BaseException):
    """The task dies here (a killed worker): no ``except Exception`` sees it."""


@pytest.fixture(scope="module")
def config():
    return load_pipeline_config(ROOT / "include" / "pipelines" / "sample_service.yaml", environ={})


# ---------------------------------------------------------------------- EC2 (baking, application image)


@pytest.fixture
def aws(monkeypatch):
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",  # a second per test; the base image is registered below
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2", region_name=REGION)


@pytest.fixture
def base_ami(ec2):
    return ec2.register_image(
        Name="al2023-for-tests", Architecture="x86_64", VirtualizationType="hvm", RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]


@pytest.fixture
def in_run(monkeypatch):
    """The Airflow context ``builder_key`` reads: the pipeline run ``RUN``."""
    monkeypatch.setattr("deployline.baking_stage.get_current_context", lambda: {"run_id": RUN})


class TokenHonouringEc2:
    """moto's EC2 client plus what AWS does with ``run_instances``' ``ClientToken`` and moto does not:
    a request with a token seen before answers with that launch's instance, whatever its state."""

    def __init__(self, client):
        self._client = client
        self.launched: dict[str, str] = {}  # token -> instance id
        self.launches = 0

    def run_instances(self, **request):
        token = request["ClientToken"]
        if token in self.launched:
            described = self._client.describe_instances(InstanceIds=[self.launched[token]])
            return {"Instances": described["Reservations"][0]["Instances"]}
        response = self._client.run_instances(**request)
        self.launched[token] = response["Instances"][0]["InstanceId"]
        self.launches += 1
        return response

    def __getattr__(self, name):
        return getattr(self._client, name)


def builders(ec2, key, states=("pending", "running")) -> list[str]:
    filters = [{"Name": f"tag:{BUILDER_TAG}", "Values": [key]}, {"Name": "instance-state-name", "Values": list(states)}]
    reservations = ec2.describe_instances(Filters=filters)["Reservations"]
    return [i["InstanceId"] for r in reservations for i in r["Instances"]]


def images_named(ec2, name) -> list[str]:
    found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
    return [i["ImageId"] for i in found]


def launch(ec2, key, image_id, **extra):
    return launch_builder(ec2, key=key, image_id=image_id, instance_type="t3.micro", waiter_delay=1, **extra)


def test_retrying_launch_builder_makes_no_second_instance(ec2, base_ami, config, in_run):
    key = builder_key(config, COMMIT, "base")
    assert key == f"{APP}-base-{V1}-{RUN}"  # per run: a retry of the task has the same key
    first = launch(ec2, key, base_ami)
    # The retry after the task died between the launch and its XCom: the builder is found by its tag.
    assert launch(ec2, key, base_ami) == first
    assert builders(ec2, key) == [first]


def test_retrying_launch_builder_after_a_lost_answer_reuses_the_client_token(ec2, base_ami, config, in_run,
                                                                             monkeypatch):
    """The tag lookup does not see the instance yet (the answer to run_instances was lost, describe is
    eventually consistent): the same key sends the same ClientToken, and AWS answers with that launch."""
    key = builder_key(config, COMMIT, "base")
    honest = TokenHonouringEc2(ec2)
    first = launch(honest, key, base_ami)
    monkeypatch.setattr(images, "_find_builders", lambda client, k, states: [])
    assert launch(honest, key, base_ami) == first
    assert honest.launches == 1 and builders(ec2, key) == [first]


def test_launch_builder_in_a_cleared_and_rerun_stage_launches_one_new_builder(ec2, base_ami, config, in_run,
                                                                              monkeypatch):
    """The stage cleared after terminate_builder (its teardown) ran: the run's key, so its first token,
    names a terminated instance. The rerun gets one new builder, and a retry of the rerun finds it."""
    key = builder_key(config, COMMIT, "base")
    honest = TokenHonouringEc2(ec2)
    first = launch(honest, key, base_ami)
    assert terminate_builders(honest, key=key) == [first]
    assert terminate_builders(honest, key=key) == []  # terminate_builder retried: nothing more

    rerun = launch(honest, key, base_ami)  # the cleared stage's launch_builder
    assert rerun != first and builders(ec2, key) == [rerun]
    assert launch(honest, key, base_ami) == rerun  # its retry
    # The tag lookup missing it too, the rerun's token still leads to the same instance.
    with monkeypatch.context() as patched:
        patched.setattr(images, "_find_builders", lambda client, k, states: [])
        assert launch(honest, key, base_ami) == rerun
    assert honest.launches == 2 and builders(ec2, key) == [rerun]

    terminate_builders(honest, key=key)  # and a second clear and rerun of the stage
    again = launch(honest, key, base_ami)
    assert again not in (first, rerun) and builders(ec2, key) == [again] and honest.launches == 3


def test_launch_builder_still_refuses_a_stopped_builder_of_its_token(ec2, base_ami, config, in_run):
    key = builder_key(config, COMMIT, "base")
    honest = TokenHonouringEc2(ec2)
    first = launch(honest, key, base_ami)
    ec2.stop_instances(InstanceIds=[first])
    with pytest.raises(ImageError, match=f"its instance {first} is already stopp"):
        launch(honest, key, base_ami)


def test_retrying_create_base_image_makes_no_second_ami(ec2, base_ami, config, in_run):
    builder = launch(ec2, builder_key(config, COMMIT, "base"), base_ami)
    name = f"{APP}-base-{V1}"  # what create_base_image names it
    tags = {"deployline:application": APP, "deployline:version": V1, "deployline:kind": "base"}
    first = create_image(ec2, instance_id=builder, name=name, tags=tags)
    # The image exists (still pending), the task died before returning its id: the retry returns it.
    ec2_backends[DEFAULT_ACCOUNT_ID][REGION].amis[first].state = "pending"
    assert create_image(ec2, instance_id=builder, name=name, tags=tags) == first
    assert images_named(ec2, name) == [first]


def test_rerunning_baking_in_a_later_run_reuses_the_base_image(ec2, base_ami, config, monkeypatch):
    """Another run of the same commit has its own builder key, but the AMI name is the version's."""
    monkeypatch.setattr("deployline.baking_stage.get_current_context", lambda: {"run_id": "manual__1"})
    name = f"{APP}-base-{V1}"
    first = create_image(ec2, instance_id=launch(ec2, builder_key(config, COMMIT, "base"), base_ami),
                         name=name, tags={})
    monkeypatch.setattr("deployline.baking_stage.get_current_context", lambda: {"run_id": "manual__2"})
    later = launch(ec2, builder_key(config, COMMIT, "base"), base_ami)
    assert create_image(ec2, instance_id=later, name=name, tags={}) == first
    assert images_named(ec2, name) == [first]


def test_retrying_launch_image_builder_and_create_application_image_makes_one_of_each(ec2, base_ami, config,
                                                                                       in_run):
    key = builder_key(config, COMMIT, "app")  # 3-acceptance's image builder: its own key
    assert key != builder_key(config, COMMIT, "base")
    builder = launch(ec2, key, base_ami)
    assert launch(ec2, key, base_ami) == builder
    name = f"{APP}-{V1}"  # what create_application_image names it
    image = create_image(ec2, instance_id=builder, name=name, tags={"deployline:kind": "application"})
    assert create_image(ec2, instance_id=builder, name=name, tags={"deployline:kind": "application"}) == image
    assert builders(ec2, key) == [builder] and images_named(ec2, name) == [image]
    assert terminate_builders(ec2, key=key) == [builder] and terminate_builders(ec2, key=key) == []


# ---------------------------------------------------------------------- S3: artifact, reports, registry


def objects(s3, prefix) -> dict[str, str]:
    return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}


def test_retrying_publish_artifact_uploads_once(s3, tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    path = dist / f"sample-service-{V1}.tar.gz"
    path.write_bytes(b"the first build")
    registry = ReleaseRegistry(s3, BUCKET, APP)
    first, uploaded = registry.publish(V1, path, tmp_path / "work")
    assert uploaded
    before = objects(s3, f"{APP}/artifacts/")
    # The upload happened, the task died before writing the record. The retry (its workspace rebuilt,
    # other bytes) keeps the first upload and records that one.
    path.write_bytes(b"a rebuild with other bytes")
    again, uploaded = registry.publish(V1, path, tmp_path / "work")
    assert not uploaded and again == first
    registry.update(V1, artifact=again.to_dict(), artifact_version=V1)
    registry.update(V1, artifact=again.to_dict(), artifact_version=V1)
    assert objects(s3, f"{APP}/artifacts/") == before and len(before) == 1  # one object, its ETag unchanged
    assert registry.get(V1)["artifact"]["sha256"] == first.sha256 == hashlib.sha256(b"the first build").hexdigest()


def test_retrying_a_load_test_overwrites_its_reports(s3, config, tmp_path, monkeypatch):
    monkeypatch.setattr("deployline.capacity_stage.aws.s3", lambda c: s3)
    s3.create_bucket(Bucket=config.aws.artifact_bucket)
    reports = {}
    for name in ("report.html", "stats.csv"):
        reports[name] = str(tmp_path / name)
        Path(reports[name]).write_text(name)
    first = _upload_reports(config, V1, "expected", reports)
    again = _upload_reports(config, V1, "expected", reports)
    assert again == first
    listed = s3.list_objects_v2(Bucket=config.aws.artifact_bucket, Prefix=f"{APP}/load-tests/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"{APP}/load-tests/{V1}/expected/{n}" for n in sorted(reports)]


def test_retrying_the_record_tasks_merges_into_one_record(s3):
    """record_base_image, select_inputs, record_candidate, record_capacity, smoke_test, classify_change:
    registry.update merges, so writing the same fields again changes nothing but updated_at."""
    registry = ReleaseRegistry(s3, BUCKET, APP)
    fields = {"base_image": {"id": "ami-0123456789abcdef0", "baked": True, "version": V1},
              "candidate": {"version": V1, "application_image": "ami-0fedcba9876543210"},
              "stages": {"1-baking": {"result": "success", "run_id": RUN, "finished_at": "t1"},
                         "3-acceptance": {"result": "success", "run_id": RUN, "finished_at": "t2"}}}
    first = registry.update(V1, **fields)
    again = registry.update(V1, **fields)
    first.pop("updated_at"), again.pop("updated_at")
    assert again == first
    assert list(objects(s3, f"{APP}/releases/")) == [f"{APP}/releases/{V1}.json"]


def test_a_deployment_recorded_twice_is_one_entry(s3):
    registry = ReleaseRegistry(s3, BUCKET, APP)
    attempt = {"result": "deployed", "started_at": "t0", "at": "t1", "run_id": RUN, "previous_version": None}
    registry.add_deployment(V1, attempt)
    record = registry.add_deployment(V1, dict(attempt))
    assert record["deployments"] == [attempt]
    # Another attempt of the same run (the stage cleared after a rollback) is a deploy of its own.
    record = registry.add_deployment(V1, {"result": "rolled_back", "started_at": "t2", "at": "t3", "run_id": RUN})
    assert [d["result"] for d in record["deployments"]] == ["deployed", "rolled_back"]


def test_a_deployment_write_whose_answer_was_lost_is_one_entry(s3, monkeypatch):
    """S3 stored the write but its answer was lost; the resend is refused (412: the ETag moved on) and
    the registry reads and merges again: the attempt it finds there is not appended a second time."""
    registry = ReleaseRegistry(s3, BUCKET, APP)
    registry.update(V1, candidate={"version": V1})
    real_put, lost = s3.put_object, []

    def put_then_lose_the_answer(**request):
        real_put(**request)
        if not lost and request["Key"].endswith(f"{V1}.json"):
            lost.append(request["Key"])
            raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "lost answer, resent"}}, "PutObject")

    monkeypatch.setattr(s3, "put_object", put_then_lose_the_answer)
    attempt = {"result": "deployed", "started_at": "t0", "at": "t1", "run_id": RUN}
    record = registry.add_deployment(V1, attempt)
    assert lost and record["deployments"] == [attempt] == registry.get(V1)["deployments"]


# ---------------------------------------------------------------------- the local driver: environments




def pids(info) -> list[int]:
    return [p["pid"] for p in info.details["processes"]]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


def version_at(url: str) -> str:
    status, body = get(url, "/version")
    assert status == 200, body
    return json.loads(body)["version"]


def run_spec(artifact: dict, stage: str, key: str, size: int = 1, version: str = V1) -> EnvironmentSpec:
    return EnvironmentSpec(application=APP, stage=stage, name=environment_name(APP, stage, key), size=size,
                           version=version, artifact=artifact, labels={"run_id": key})


@pytest.mark.parametrize("stage", ["acceptance", "capacity"])
def test_retrying_provision_environment_after_a_crash_leaves_one_environment(driver, published, root, stage):
    """run_environment's provision_environment: named after the stage and run. The first try was killed
    before the environment was ready (state ``provisioning``, processes running): the retry replaces
    that leftover, a second retry reuses the result, and teardown_environment twice removes it once."""
    spec = run_spec(published[V1], stage, RUN)
    crashed = driver.provision(spec)
    state_file = root / spec.name / "state.json"
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"status": "provisioning"}))

    retried = driver.provision(spec)
    assert folders(root) == [spec.name] and [e.name for e in driver.list(APP)] == [spec.name]
    assert not any(alive(pid) for pid in pids(crashed))
    assert driver.provision(spec).details["processes"] == retried.details["processes"]  # reused
    assert version_at(driver.wait_until_healthy(spec.name, "/health", 20).endpoint) == V1

    assert driver.teardown(spec.name) is True and driver.teardown(spec.name) is False
    assert folders(root) == [] and not any(alive(pid) for pid in pids(retried))


def test_retrying_update_environment_keeps_one_preproduction_environment(driver, published, root, config):
    name = preproduction_name(config)
    spec = EnvironmentSpec(application=APP, stage="preproduction", name=name, size=1, version=V1,
                           artifact=published[V1], labels={"run_id": RUN})
    first = driver.update(spec)
    again = driver.update(spec)  # the retry: the same processes, nothing started or stopped
    assert pids(again) == pids(first) and folders(root) == [name]

    newer = EnvironmentSpec(application=APP, stage="preproduction", name=name, size=1, version=V2,
                            artifact=published[V2], labels={"run_id": "commit__2"})
    second = driver.update(newer)
    assert pids(driver.update(newer)) == pids(second) and folders(root) == [name]
    assert version_at(second.endpoint) == V2 and second.size == 1


def test_retrying_update_environment_after_a_crash_mid_release_serves_the_new_version(driver, published, root,
                                                                                      config, monkeypatch):
    """Killed after the new version's workers started, before the proxy was switched to them: the
    state already says V2 and holds both versions' workers. The retry must finish the switch, not
    stop the new workers and keep serving V1 under V2's name."""
    name = preproduction_name(config)
    old = driver.update(EnvironmentSpec(application=APP, stage="preproduction", name=name, size=1, version=V1,
                                        artifact=published[V1]))
    driver.wait_until_healthy(name, "/health", 20)
    newer = EnvironmentSpec(application=APP, stage="preproduction", name=name, size=1, version=V2,
                            artifact=published[V2])

    def killed(*args, **kwargs):
        raise Crash("killed while switching the proxy")

    monkeypatch.setattr(driver, "set_backends", killed)
    with pytest.raises(Crash):
        driver.update(newer)
    monkeypatch.undo()

    retried = driver.update(newer)
    assert retried.version == V2 and retried.size == 1 and folders(root) == [name]
    assert version_at(driver.wait_until_healthy(name, "/health", 20).endpoint) == V2
    old_worker = next(p["pid"] for p in old.details["processes"] if p["role"] == "worker")
    assert not alive(old_worker)
    assert sorted(p.name for p in (root / name).iterdir() if p.name.startswith("release")) == [f"release-{V2}"]


def test_retrying_self_service_launch_reuses_the_environment_of_the_same_owner_and_version(driver, published, root,
                                                                                           config, s3):
    registry = ReleaseRegistry(s3, BUCKET, APP)
    registry.update(V1, candidate={"version": V1, "artifact": published[V1], "artifact_version": V1})
    now = datetime.now(UTC)
    params = {"action": "launch", "version": V1, "owner": "alice", "size": 1, "ttl_hours": 1}

    def launch_once(run_id):
        request = resolve_request(registry, params, config, now, user="alice")
        environment = provision(driver, config, request, run_id)
        return environment, record_launch(registry, request, environment, run_id, "alice", now)

    first, _ = launch_once("manual__1")
    retried, _ = launch_once("manual__1")  # provision_environment retried
    later, entry = launch_once("manual__2")  # the same owner launches the same version again
    assert first["created"] and retried["created"] and not later["created"] and entry["reused"]
    assert first["name"] == retried["name"] == later["name"] and folders(root) == [first["name"]]
    assert [e.name for e in driver.list(APP)] == [first["name"]]
    assert driver.get(first["name"]).labels["run_id"] == "manual__1"  # the launch that created it
    assert list(registry.get(V1)["self_service"]) == [first["name"]]


# ---------------------------------------------------------------------- production


def production_spec(artifact: dict, version: str) -> EnvironmentSpec:
    return EnvironmentSpec(application=APP, stage="production", name=environment_name(APP, "production", version),
                           size=1, version=version, artifact=artifact, labels={"run_id": f"commit__{version}"})


def deploy(driver, artifact, version):
    return blue_green(driver, production_spec(artifact, version), FAST, health_path="/health", health_timeout=20,
                      smoke=version_at)


def test_retrying_ensure_production_address_keeps_one_router(driver, root):
    first = driver.ensure_router(APP)
    again = driver.ensure_router(APP)
    assert again.endpoint == first.endpoint and again.details["processes"] == first.details["processes"]
    assert folders(root) == [first.name] and driver.list(APP) == []


def test_retrying_deploy_after_the_switch_reports_already_live_and_records_one_deployment(driver, published, s3):
    registry = ReleaseRegistry(s3, BUCKET, APP)
    deployed = deploy(driver, published[V1], V1)
    first = record_deployment(registry, V1, deployed, "commit__1", "t0")
    assert first["result"] == "deployed"
    record = registry.get(V1)

    again = deploy(driver, published[V1], V1)  # the deploy task retried, or its stage cleared
    assert again.result == "already_live"
    record_deployment(registry, V1, again, "commit__1", "t9")
    assert [e.name for e in driver.list(APP)] == [deployed.environment]
    assert registry.get(V1)["deployments"] == record["deployments"] and len(record["deployments"]) == 1
    assert registry.get(V1)["production"] == record["production"]  # what the deploy wrote stays
    assert registry.production()["version"] == V1 and registry.production()["history"] == []
    assert remove_idle(driver, APP) == [] and remove_idle(driver, APP) == []  # clean_up_environments


def test_retrying_deploy_killed_after_the_switch_records_the_deployment_once(driver, published, s3, monkeypatch):
    """Killed during the drain, after the switch to V2: nothing recorded, blue still running. The retry
    finds V2 live (already_live), does not deploy again, and writes the deploy the first try could not:
    the production pointer and one ``deployments`` entry; clean_up_environments removes blue."""
    registry = ReleaseRegistry(s3, BUCKET, APP)
    record_deployment(registry, V1, deploy(driver, published[V1], V1), "commit__1", "t0")

    def killed(name):
        raise Crash(f"killed before removing {name}")

    monkeypatch.setattr(driver, "teardown", killed)
    with pytest.raises(Crash):
        deploy(driver, published[V2], V2)
    monkeypatch.undo()
    assert driver.router(APP).live == environment_name(APP, "production", V2)
    assert registry.production()["version"] == V1 and "deployments" not in (registry.get(V2) or {})

    for _ in range(2):  # the retry, and a retry of the retry
        again = deploy(driver, published[V2], V2)
        assert again.result == "already_live"
        record_deployment(registry, V2, again, "commit__2", "t5")
    (entry,) = registry.get(V2)["deployments"]
    assert (entry["result"], entry["run_id"], entry["previous_version"]) == ("deployed", "commit__2", V1)
    live = registry.production()
    assert live["version"] == V2 and [h["version"] for h in live["history"]] == [V1]
    assert remove_idle(driver, APP) == [environment_name(APP, "production", V1)]
    assert [e.version for e in driver.list(APP)] == [V2] and version_at(driver.router(APP).endpoint) == V2


def journal_of(registry, version):
    return lambda status, details: registry.note_production_change(version, status, **details)


def test_a_deploy_killed_during_verification_is_verified_by_the_retry_never_called_live(driver, published, s3):
    """Killed after the switch to V2, before its verification ended: production.json says so. The
    clean-up keeps V1 (the rollback target), another version may not deploy, and the retry verifies
    V2 before calling it deployed (not ``already_live`` with 0 s verified)."""
    registry = ReleaseRegistry(s3, BUCKET, APP)
    record_deployment(registry, V1, blue_green(driver, production_spec(published[V1], V1), FAST, health_path="/health",
                                               health_timeout=20, smoke=version_at, journal=journal_of(registry, V1)),
                      "commit__1", "t0")
    smoked = []

    def killed_while_verifying(url):
        smoked.append(url)
        if len(smoked) == 2:  # the smoke tests through the production address, after the switch
            raise Crash("killed during the verification")
        return version_at(url)

    with pytest.raises(Crash):
        blue_green(driver, production_spec(published[V2], V2), FAST, health_path="/health", health_timeout=20,
                   smoke=killed_while_verifying, journal=journal_of(registry, V2))
    pending = registry.production()["pending"]
    v1_env, v2_env = (environment_name(APP, "production", v) for v in (V1, V2))
    assert (pending["version"], pending["status"], pending["previous_version"]) == (V2, "verifying", V1)
    assert driver.router(APP).live == v2_env and registry.production()["version"] == V1
    assert remove_idle(driver, APP, pending=pending) == []  # clean_up_environments keeps V1
    with pytest.raises(EnvironmentFailed, match=f"production runs {V2} unverified"):
        blue_green(driver, production_spec(published[V1], "r3-cdef0123"), FAST, health_path="/health",
                   health_timeout=20, smoke=version_at, pending=pending)

    again = blue_green(driver, production_spec(published[V2], V2), FAST, health_path="/health", health_timeout=20,
                       smoke=version_at, journal=journal_of(registry, V2), pending=pending)
    assert again.result == "deployed" and again.previous_version == V1 and again.verified_seconds >= FAST.verify_seconds
    assert registry.production()["pending"]["status"] == "verified"
    record_deployment(registry, V2, again, "commit__2", "t5")
    live = registry.production()
    assert live["version"] == V2 and "pending" not in live and [h["version"] for h in live["history"]] == [V1]
    assert [e.version for e in driver.list(APP)] == [V2]


def test_a_failed_verification_on_retry_goes_back_to_the_last_verified_version(driver, published, s3):
    registry = ReleaseRegistry(s3, BUCKET, APP)
    blue_green(driver, production_spec(published[V1], V1), FAST, health_path="/health", health_timeout=20,
               smoke=version_at, journal=journal_of(registry, V1))
    smoked = []

    def killed_while_verifying(url):
        smoked.append(url)
        if len(smoked) == 2:
            raise Crash("killed during the verification")

    with pytest.raises(Crash):
        blue_green(driver, production_spec(published[V2], V2), FAST, health_path="/health", health_timeout=20,
                   smoke=killed_while_verifying, journal=journal_of(registry, V2))

    def failing(url):
        raise AssertionError(f"smoke tests failed against {url}")

    with pytest.raises(RolledBack) as caught:
        blue_green(driver, production_spec(published[V2], V2), FAST, health_path="/health", health_timeout=20,
                   smoke=failing, journal=journal_of(registry, V2), pending=registry.production()["pending"])
    assert caught.value.phase == AFTER_SWITCH and caught.value.restored == V1
    assert version_at(driver.router(APP).endpoint) == V1 and [e.version for e in driver.list(APP)] == [V1]
    assert "pending" not in registry.production()


# ---------------------------------------------------------------------- CloudFormation environments


@pytest.fixture
def cfn_driver(aws):
    clients = {name: boto3.client(name, region_name=REGION) for name in ("cloudformation", "ssm", "autoscaling",
                                                                         "elbv2", "ec2")}
    vpc = clients["ec2"].create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [clients["ec2"].create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24",
                                            AvailabilityZone=f"{REGION}{az}")["Subnet"]["SubnetId"]
               for i, az in enumerate("ab")]
    clients["ssm"].put_parameter(Name="/deployline/network/vpc-id", Value=vpc, Type="String")
    clients["ssm"].put_parameter(Name="/deployline/network/public-subnet-ids", Value=",".join(subnets), Type="String")
    driver = CloudFormationDriver(clients["cloudformation"], clients["ssm"], clients["autoscaling"], clients["elbv2"],
                                  CloudFormationSettings())
    driver.switch_grace = 0
    return driver


def live_stacks(cfn) -> list[str]:
    return sorted(s["StackName"] for s in cfn.describe_stacks()["Stacks"] if s["StackStatus"] != "DELETE_COMPLETE")


def test_retrying_provision_environment_when_the_stack_is_not_visible_yet_makes_no_second_stack(cfn_driver, ec2,
                                                                                                base_ami, monkeypatch):
    """The retry's describe_stacks misses the stack the first try created: create_stack is refused
    (AlreadyExists, the name is deterministic) and the driver waits for that stack instead."""
    spec = EnvironmentSpec(application=APP, stage="acceptance", name=environment_name(APP, "acceptance", RUN),
                           size=1, version=V1, artifact={"bucket": BUCKET, "key": "a.tar.gz"}, image_id=base_ami)
    first = cfn_driver.provision(spec)
    real, misses = cfn_driver._describe, []

    def not_visible_once(name):
        if misses:
            return real(name)
        misses.append(name)
        return None

    monkeypatch.setattr(cfn_driver, "_describe", not_visible_once)
    again = cfn_driver.provision(spec)
    assert misses == [spec.name] and again.details["StackId"] == first.details["StackId"]
    assert live_stacks(cfn_driver.cfn) == [spec.name]


# ---------------------------------------------------------------------- support infrastructure


@pytest.fixture
def infra_config(aws, base_ami):
    return infra.InfrastructureConfig(region=REGION, artifact_store={"bucket": "deployline-infra-idempotency"},
                                      ci=infra.CiSettings(image_id=base_ami, repository_url="https://git.example/x.git"))


@pytest.mark.filterwarnings("ignore:Tried to parse AWS")
def test_retrying_infrastructure_launch_after_a_crash_before_publishing_leaves_one_stack_each(infra_config,
                                                                                             monkeypatch):
    """support_infrastructure's launch: killed after the notifications stack was created, before its
    SSM parameter was written. The retry creates no second stack and writes the parameter."""
    clients = infra.clients_from_boto3(REGION)
    real, calls = infra._publish, []

    def killed_once(clients, config, component, stack, outputs):
        calls.append(component)
        if component == "notifications" and calls.count(component) == 1:
            raise Crash("killed before publishing")
        return real(clients, config, component, stack, outputs)

    monkeypatch.setattr(infra, "_publish", killed_once)
    components = ["artifact_store", "notifications"]
    with pytest.raises(Crash):
        infra.launch(clients, infra_config, components)
    stacks = live_stacks(clients.cfn)

    retried = infra.launch(clients, infra_config, components)
    assert [(r.component, r.action) for r in retried] == [("artifact_store", "unchanged"),
                                                         ("notifications", "unchanged")]
    assert retried[1].parameters == ["/deployline/notifications/topic-arn"]  # written now, once
    assert live_stacks(clients.cfn) == stacks == [infra_config.stack_name(c) for c in components]
    again = infra.launch(clients, infra_config, components)
    assert [(r.action, r.parameters) for r in again] == [("unchanged", []), ("unchanged", [])]
    assert len(boto3.client("sns", region_name=REGION).list_topics()["Topics"]) == 1
    assert [b["Name"] for b in clients.s3.list_buckets()["Buckets"]] == ["deployline-infra-idempotency"]


# ---------------------------------------------------------------------- the approval gates


def test_request_approval_reuses_the_gate_run_of_the_pipeline_run(config):
    """5-exploratory and 8-production: the gate run's id is the pipeline run's, and an existing gate run
    makes request_approval skip (and so notify_approval_requested), never trigger a second one. What
    Airflow does with that is tests/e2e/test_approvals.py::test_rerunning_the_stage_creates_no_second_gate_run."""
    dag = build_pipeline_dag(config)
    for stage in ("5-exploratory", "8-production"):
        request = dag.get_task(f"{stage}.request_approval")
        assert request.trigger_run_id == "{{ run_id }}"
        assert request.skip_when_already_exists is True and request.reset_dag_run is False
        assert f"{stage}.notify_approval_requested" in request.downstream_task_ids
        notify = dag.get_task(f"{stage}.notify_approval_requested")
        assert notify.trigger_rule == "all_success"  # skipped with request_approval
