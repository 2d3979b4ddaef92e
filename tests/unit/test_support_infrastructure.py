"""Stage 0, support infrastructure (deployline.infrastructure, ``python -m deployline infra``) against
moto in process: the real templates, stacks, SSM parameters, S3, SNS, EC2.

What moto (5.2.5) cannot show, and these tests therefore do not claim:

- deleting the network stack: moto's CloudFormation does not delete subnets, route tables or
  the internet gateway (their deletes are no-ops), so the VPC keeps dependencies and DeleteStack
  fails with DependencyViolation (and moto forgets the stack anyway). The tests check that
  destroy reports that failure clearly and keeps the network's SSM parameters.
- the bucket's public access block, lifecycle and TLS-only policy, the subnets'
  MapPublicIpOnLaunch and the instance's MetadataOptions/SecurityGroupIds: moto's CloudFormation
  ignores them (cfn-lint checks the templates; a test reads the template for the security
  properties). It ignores the bucket's versioning too; ``deployline.moto_server`` (applied to
  these tests by conftest, and to the embedded moto server) applies it, as CloudFormation does.
- the CI instance gets no public IP from moto's CloudFormation, so its ``Url`` output stays an
  unresolved ``${Instance.PublicDnsName}``: launch does not publish that, and says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError
from deployline import infrastructure as infra
from deployline.artifacts import require_versioning
from deployline.cli import main
from deployline.config import CloudFormationSettings
from deployline.environments.cloudformation import CloudFormationDriver
from deployline.infrastructure import (
    COMPONENTS,
    CiSettings,
    DestroyRefused,
    InfrastructureConfig,
    InfrastructureConfigError,
    InfrastructureError,
    NotificationSettings,
    destroy,
    launch,
    load_infrastructure_config,
    resolve_components,
    status,
)
from moto import mock_aws
from moto.cloudformation.models import cloudformation_backends
from moto.core import DEFAULT_ACCOUNT_ID
from stack_changes import SERVICE_ROLE, record_stack_changes

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "include" / "cloudformation"
INFRA_TEMPLATES = [TEMPLATES / f"{name}.yaml" for name in ("network", "artifact-store", "notifications",
                                                             "ci-environment")]
REGION = "us-east-1"
BUCKET = "deployline-infra-test"
REPO = "https://git.example.com/deployline.git"

pytestmark = [
    pytest.mark.filterwarnings("ignore:Tried to parse AWS"),  # moto: no AWS::S3::BucketPolicy
    pytest.mark.filterwarnings("ignore:Exception.DependencyViolationError"),  # moto: the network delete
]


@pytest.fixture
def aws(monkeypatch):
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",  # a second per test; the tests register their AMI
    }.items():
        monkeypatch.setenv(var, value)
    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "DEPLOYLINE_INFRASTRUCTURE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    with mock_aws():
        yield {name: boto3.client(name, region_name=REGION) for name in ("cloudformation", "ssm", "s3", "ec2", "sns")}


@pytest.fixture
def ami(aws):
    return aws["ec2"].register_image(
        Name="al2023-for-tests", Architecture="x86_64", VirtualizationType="hvm", RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]


@pytest.fixture
def config(ami):
    return InfrastructureConfig(
        region=REGION,
        artifact_store={"bucket": BUCKET},
        ci=CiSettings(image_id=ami, repository_url=REPO),
    )


@pytest.fixture
def clients(aws):
    return infra.clients_from_boto3(REGION)


def parameter(aws, name):
    try:
        return aws["ssm"].get_parameter(Name=name)["Parameter"]
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "ParameterNotFound"
        return None


def stack_names(aws):
    return {s["StackName"] for s in aws["cloudformation"].describe_stacks()["Stacks"]}


def moto_stack(name):
    backend = cloudformation_backends[DEFAULT_ACCOUNT_ID][REGION]
    return next(s for s in backend.stacks.values() if s.name == name)


# --------------------------------------------------------------------------------- templates


def test_infrastructure_templates_pass_cfn_lint():
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run([str(cfn_lint), *map(str, INFRA_TEMPLATES)], capture_output=True, text=True, timeout=180)
    # cfn-lint exit codes: 0 clean, 4 warnings only; 2 / 6 mean errors.
    assert result.returncode in (0, 4), result.stdout + result.stderr


def _template(name):
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # short-form intrinsics: not needed here
    return yaml.load((TEMPLATES / name).read_text(), Loader=Loader)


def test_templates_declare_what_moto_ignores():
    resources = _template("ci-environment.yaml")["Resources"]
    instance = resources["Instance"]["Properties"]
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert all(m["Ebs"]["Encrypted"] is True for m in instance["BlockDeviceMappings"])
    ingress = resources["InstanceSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert len(ingress) == 1 and "CidrIp" in ingress[0]  # from UiIngressCidr only
    assert _template("ci-environment.yaml")["Parameters"]["UiIngressCidr"]["Default"] == "10.0.0.0/8"

    store = _template("artifact-store.yaml")["Resources"]
    bucket = store["ArtifactBucket"]
    assert bucket["DeletionPolicy"] == "Delete"
    assert set(bucket["Properties"]["PublicAccessBlockConfiguration"].values()) == {True}
    assert bucket["Properties"]["VersioningConfiguration"]["Status"] == "Enabled"
    statement = store["ArtifactBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert statement["Effect"] == "Deny" and statement["Condition"]["Bool"]["aws:SecureTransport"] == "false"

    topic = _template("notifications.yaml")["Resources"]["Topic"]["Properties"]
    assert topic["KmsMasterKeyId"] == "alias/aws/sns"

    for name in ("network.yaml", "artifact-store.yaml", "notifications.yaml", "ci-environment.yaml"):
        for logical_id, resource in _template(name)["Resources"].items():
            tags = resource.get("Properties", {}).get("Tags")
            if tags is not None:
                assert any(t["Key"] == "deployline:component" for t in tags), f"{name}: {logical_id}"


# --------------------------------------------------------------------------------- launch


def test_launch_all_creates_the_stacks_and_publishes_their_outputs(aws, clients, config, ami):
    results = launch(clients, config, "all")

    assert [r.component for r in results] == list(COMPONENTS)
    assert {r.action for r in results} == {"created"}
    assert {r.stack for r in results} == {"deployline-network", "deployline-artifact-store",
                                          "deployline-notifications", "deployline-ci-environment"}
    for result in results:
        stack = aws["cloudformation"].describe_stacks(StackName=result.stack)["Stacks"][0]
        assert stack["StackStatus"] == "CREATE_COMPLETE"
        tags = {t["Key"]: t["Value"] for t in stack["Tags"]}
        assert tags["deployline:component"] == result.component

    network, store, notifications, ci = results
    # The network: two public and two private subnets in two availability zones.
    vpc = network.outputs["VpcId"]
    public = network.outputs["PublicSubnetIds"].split(",")
    private = network.outputs["PrivateSubnetIds"].split(",")
    subnets = {s["SubnetId"]: s for s in aws["ec2"].describe_subnets(SubnetIds=public + private)["Subnets"]}
    assert {s["VpcId"] for s in subnets.values()} == {vpc}
    assert len({subnets[s]["AvailabilityZone"] for s in public}) == 2
    assert len({subnets[s]["AvailabilityZone"] for s in private}) == 2
    assert aws["ec2"].describe_internet_gateways(
        Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])["InternetGateways"]

    # Published in SSM, exactly where the environment driver reads the network.
    assert parameter(aws, "/deployline/network/vpc-id")["Value"] == vpc
    assert parameter(aws, "/deployline/network/public-subnet-ids")["Value"] == ",".join(public)
    assert parameter(aws, "/deployline/network/private-subnet-ids")["Value"] == ",".join(private)
    assert parameter(aws, "/deployline/network/vpc-id")["Type"] == "String"
    driver = CloudFormationDriver(aws["cloudformation"], aws["ssm"], None, None, CloudFormationSettings())
    assert driver._network("probe") == {"vpc-id": vpc, "public-subnet-ids": ",".join(public)}

    assert parameter(aws, "/deployline/artifact-store/bucket")["Value"] == BUCKET
    encryption = aws["s3"].get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]
    assert encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    # Versioned from the start, as publishing requires (moto_server applies the template's setting).
    assert aws["s3"].get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    require_versioning(aws["s3"], BUCKET)

    topic_arn = parameter(aws, "/deployline/notifications/topic-arn")["Value"]
    assert topic_arn == notifications.outputs["TopicArn"] and topic_arn.endswith(":deployline-notifications")
    assert aws["sns"].get_topic_attributes(TopicArn=topic_arn)["Attributes"]["KmsMasterKeyId"] == "alias/aws/sns"

    instance_id = parameter(aws, "/deployline/ci/instance-id")["Value"]
    instance = aws["ec2"].describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert instance["SubnetId"] == public[0] and instance["ImageId"] == ami
    assert instance["State"]["Name"] == "running"
    assert parameter(aws, "/deployline/ci/private-url")["Value"] == f"http://{instance['PrivateIpAddress']}:8080"
    stack = aws["cloudformation"].describe_stacks(StackName=ci.stack)["Stacks"][0]
    sent = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert sent["RepositoryUrl"] == REPO and sent["UiIngressCidr"] == "10.0.0.0/8" and sent["VpcId"] == vpc
    # moto gives the instance no public DNS name: the Url output is not published (see the top).
    assert parameter(aws, "/deployline/ci/url") is None
    assert any("Url unresolved" in note for note in ci.notes)
    assert "/deployline/ci/instance-id" in ci.parameters


def test_launch_again_changes_nothing(aws, clients, config, monkeypatch):
    launch(clients, config, "all")
    versions = {p["Name"]: p["Version"] for p in aws["ssm"].describe_parameters()["Parameters"]}
    writes = []
    real_put = clients.ssm.put_parameter
    monkeypatch.setattr(clients.ssm, "put_parameter", lambda **kw: writes.append(kw) or real_put(**kw))
    updates = []
    real_update = clients.cfn.update_stack
    monkeypatch.setattr(clients.cfn, "update_stack", lambda **kw: updates.append(kw) or real_update(**kw))

    again = launch(clients, config, "all")

    assert [(r.component, r.action, r.parameters) for r in again] == [(c, "unchanged", []) for c in COMPONENTS]
    assert writes == [] and updates == []
    assert {p["Name"]: p["Version"] for p in aws["ssm"].describe_parameters()["Parameters"]} == versions
    assert "ssm: unchanged" in again[0].line()


def test_no_updates_answer_means_unchanged(aws, clients, config, monkeypatch):
    """Without the comparison shortcut, CloudFormation's "No updates are to be performed" means unchanged."""
    launch(clients, config, ["notifications"])
    monkeypatch.setattr(infra, "_as_deployed", lambda *args: False)
    assert launch(clients, config, ["notifications"])[0].action == "unchanged"


def test_a_missing_parameter_is_written_again(aws, clients, config):
    launch(clients, config, ["notifications"])
    aws["ssm"].delete_parameter(Name="/deployline/notifications/topic-arn")
    result = launch(clients, config, ["notifications"])[0]
    assert (result.action, result.parameters) == ("unchanged", ["/deployline/notifications/topic-arn"])


def test_changed_template_or_parameter_updates_the_stack(aws, clients, config, tmp_path):
    launch(clients, config, ["network", "notifications"])
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    path = templates / "notifications.yaml"
    path.write_text(path.read_text().replace("DisplayName: Deployline", "DisplayName: Deployline pipelines"))
    changed = config.model_copy(update={"template_dir": str(templates)})

    results = launch(clients, changed, ["notifications", "network"])

    assert [(r.component, r.action) for r in results] == [("network", "unchanged"), ("notifications", "updated")]
    assert results[1].parameters == []  # same topic: its ARN did not change
    stack = aws["cloudformation"].describe_stacks(StackName="deployline-notifications")["Stacks"][0]
    assert stack["StackStatus"] == "UPDATE_COMPLETE"
    body = aws["cloudformation"].get_template(StackName="deployline-notifications")["TemplateBody"]
    assert "Deployline pipelines" in body

    # A changed parameter: another topic name, another ARN, its SSM parameter rewritten.
    renamed = changed.model_copy(update={"notifications": NotificationSettings(topic_name="deployline-renamed")})
    result = launch(clients, renamed, "notifications")[0]
    assert (result.action, result.parameters) == ("updated", ["/deployline/notifications/topic-arn"])
    assert parameter(aws, "/deployline/notifications/topic-arn")["Value"].endswith(":deployline-renamed")
    assert parameter(aws, "/deployline/notifications/topic-arn")["Version"] == 2


def test_failed_create_is_reported_and_replaced_at_the_next_launch(aws, clients, config, monkeypatch):
    from moto.cloudformation.models import Event

    real_create = clients.cfn.create_stack

    def failing_create(**kwargs):
        response = real_create(**kwargs)
        stack = moto_stack(kwargs["StackName"])
        stack.events.append(Event(
            stack_id=stack.stack_id, stack_name=stack.name, logical_resource_id="Topic", physical_resource_id="",
            resource_type="AWS::SNS::Topic", resource_status="CREATE_FAILED",
            resource_status_reason="KMS key not accessible", resource_properties=None,
        ))
        stack.status = "ROLLBACK_COMPLETE"
        return response

    monkeypatch.setattr(clients.cfn, "create_stack", failing_create)
    with pytest.raises(InfrastructureError) as failed:
        launch(clients, config, ["notifications"])
    message = str(failed.value)
    assert "deployline-notifications" in message and "ROLLBACK_COMPLETE" in message
    assert "Topic (AWS::SNS::Topic) CREATE_FAILED: KMS key not accessible" in message
    assert parameter(aws, "/deployline/notifications/topic-arn") is None

    monkeypatch.setattr(clients.cfn, "create_stack", real_create)
    result = launch(clients, config, ["notifications"])[0]
    assert result.action == "created" and any("ROLLBACK_COMPLETE" in n for n in result.notes)
    stack = aws["cloudformation"].describe_stacks(StackName="deployline-notifications")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"


def test_a_stack_that_cannot_be_updated_is_refused(aws, clients, config):
    launch(clients, config, ["notifications"])
    moto_stack("deployline-notifications").status = "UPDATE_ROLLBACK_FAILED"
    with pytest.raises(InfrastructureError, match="deployline-notifications is UPDATE_ROLLBACK_FAILED"):
        launch(clients, config, ["notifications"])


# --------------------------------------------------------------------------------- the service role

def role_of(aws, stack):
    return aws["cloudformation"].describe_stacks(StackName=stack)["Stacks"][0].get("RoleARN")


def test_a_service_role_is_passed_on_every_create_update_and_delete(aws, clients, config, monkeypatch):
    with_role = config.model_copy(update={"service_role_arn": SERVICE_ROLE})
    calls = record_stack_changes(monkeypatch, clients.cfn)

    assert launch(clients, with_role, ["notifications"])[0].action == "created"
    assert role_of(aws, "deployline-notifications") == SERVICE_ROLE
    renamed = with_role.model_copy(update={"notifications": NotificationSettings(topic_name="deployline-renamed")})
    assert launch(clients, renamed, ["notifications"])[0].action == "updated"
    assert role_of(aws, "deployline-notifications") == SERVICE_ROLE  # moto forgets it on an update without one
    assert launch(clients, renamed, ["notifications"])[0].action == "unchanged"
    destroy(clients, renamed, ["notifications"])

    stack = "deployline-notifications"
    assert calls == [("create_stack", stack, SERVICE_ROLE), ("update_stack", stack, SERVICE_ROLE),
                     ("delete_stack", stack, SERVICE_ROLE)]


def test_a_service_role_set_later_comes_with_the_next_change(aws, clients, config):
    """A role alone is no change: launch compares template, parameters and tags (and moto answers an update
    that only changes the role with "No updates are to be performed"). A stack made without one gets the role
    with its next update; a delete uses the role passed to it in any case."""
    launch(clients, config, ["notifications"])
    with_role = config.model_copy(update={"service_role_arn": SERVICE_ROLE})
    assert launch(clients, with_role, ["notifications"])[0].action == "unchanged"
    assert role_of(aws, "deployline-notifications") is None

    renamed = with_role.model_copy(update={"notifications": NotificationSettings(topic_name="deployline-renamed")})
    assert launch(clients, renamed, ["notifications"])[0].action == "updated"
    assert role_of(aws, "deployline-notifications") == SERVICE_ROLE


def test_without_a_service_role_no_role_arn_is_passed(aws, clients, config, monkeypatch):
    assert config.service_role_arn is None
    calls = record_stack_changes(monkeypatch, clients.cfn)

    launch(clients, config, ["notifications"])
    assert role_of(aws, "deployline-notifications") is None
    renamed = config.model_copy(update={"notifications": NotificationSettings(topic_name="deployline-renamed")})
    launch(clients, renamed, ["notifications"])
    destroy(clients, renamed, ["notifications"])

    assert [(operation, role) for operation, _, role in calls] == [
        ("create_stack", None), ("update_stack", None), ("delete_stack", None)]


# --------------------------------------------------------------------------------- components and order


def test_unknown_component_names_it_and_the_valid_ones(clients, config):
    for call in (lambda: launch(clients, config, ["network", "databse"]),
                 lambda: destroy(clients, config, ["databse"]),
                 lambda: status(clients, config, "databse")):
        with pytest.raises(ValueError) as error:
            call()
        assert "'databse'" in str(error.value)
        assert all(name in str(error.value) for name in COMPONENTS)
    with pytest.raises(ValueError, match="no component"):
        resolve_components([])


def test_components_run_in_dependency_order(aws, clients, config):
    assert resolve_components(["ci_environment", "notifications", "network"]) == [
        "network", "notifications", "ci_environment"]
    assert resolve_components(["artifact-store", "all", "network"]) == list(COMPONENTS)
    assert resolve_components("ci-environment") == ["ci_environment"]

    # The CI environment alone, without its network: nothing is created.
    with pytest.raises(InfrastructureError, match="ci_environment needs network: stack deployline-network does not"):
        launch(clients, config, ["ci_environment"])
    assert stack_names(aws) == set()

    results = launch(clients, config, ["ci_environment", "network"])
    assert [r.component for r in results] == ["network", "ci_environment"]

    # The network cannot go while the CI environment runs in it.
    with pytest.raises(DestroyRefused, match="ci_environment .* still runs in it"):
        destroy(clients, config, ["network"])
    assert stack_names(aws) == {"deployline-network", "deployline-ci-environment"}


def test_ci_environment_needs_a_repository_url(aws, clients, config):
    no_repo = config.model_copy(update={"ci": config.ci.model_copy(update={"repository_url": " "})})
    with pytest.raises(InfrastructureError, match="ci.repository_url is empty"):
        launch(clients, no_repo, "all")
    assert stack_names(aws) == set()  # checked before anything was launched


def test_image_id_from_ssm(aws, clients, config, ami):
    aws["ssm"].put_parameter(Name="/test/ami/al2023", Value=ami, Type="String")
    ci = config.ci.model_copy(update={"image_id": "resolve:ssm:/test/ami/al2023"})
    from_ssm = config.model_copy(update={"ci": ci})
    launch(clients, from_ssm, ["network", "ci_environment"])
    stack = aws["cloudformation"].describe_stacks(StackName="deployline-ci-environment")["Stacks"][0]
    assert {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}["ImageId"] == ami


# --------------------------------------------------------------------------------- destroy


def test_destroy_removes_stacks_and_parameters(aws, clients, config):
    launch(clients, config, ["artifact_store", "notifications"])
    aws["s3"].put_object(Bucket=BUCKET, Key="sample_service/sample-service-1.0.0.tar.gz", Body=b"artifact")

    results = destroy(clients, config, ["artifact_store", "notifications"])

    assert [(r.component, r.action) for r in results] == [("notifications", "deleted"), ("artifact_store", "deleted")]
    assert results[0].parameters == ["/deployline/notifications/topic-arn"]
    assert stack_names(aws) == set()
    assert parameter(aws, "/deployline/notifications/topic-arn") is None
    assert parameter(aws, "/deployline/artifact-store/bucket") is None
    # No release records: the bucket is emptied (CloudFormation deletes empty buckets only) and goes.
    assert BUCKET not in {b["Name"] for b in aws["s3"].list_buckets()["Buckets"]}
    assert "1 object version(s)" in results[1].notes[0]

    again = destroy(clients, config, ["artifact_store", "notifications"])
    assert [r.action for r in again] == ["absent", "absent"]


def test_destroy_all_goes_in_reverse_order(aws, clients, config):
    launch(clients, config, "all")
    with pytest.raises(InfrastructureError) as failed:
        destroy(clients, config, "all")
    # Everything but the network is gone, dependents first.
    assert [(r.component, r.action) for r in failed.value.done] == [
        ("ci_environment", "deleted"), ("notifications", "deleted"), ("artifact_store", "deleted")]
    for name in ("/deployline/ci/instance-id", "/deployline/notifications/topic-arn",
                 "/deployline/artifact-store/bucket"):
        assert parameter(aws, name) is None
    instance = failed.value.done[0].outputs["InstanceId"]
    state = aws["ec2"].describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "terminated"
    # moto cannot delete the network stack (see the top): the failure says so and names it.
    assert "network: delete of stack deployline-network failed: DependencyViolation" in str(failed.value)


def test_network_delete_failure_keeps_its_parameters(aws, clients, config):
    """moto 5.2.5: DeleteStack of a VPC with subnets and an internet gateway fails (DependencyViolation);
    in AWS CloudFormation deletes them in dependency order. Either way the parameters stay while
    the network may still exist."""
    launch(clients, config, ["network"])
    with pytest.raises(InfrastructureError, match="DependencyViolation"):
        destroy(clients, config, ["network"])
    assert parameter(aws, "/deployline/network/vpc-id") is not None
    assert parameter(aws, "/deployline/network/public-subnet-ids") is not None


def test_artifact_store_with_releases_is_refused_unless_forced(aws, clients, config):
    launch(clients, config, ["artifact_store", "notifications"])
    s3 = aws["s3"]
    s3.put_object(Bucket=BUCKET, Key="sample_service/releases/1.0.0.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="sample_service/releases/1.0.0.json", Body=b'{"v": 2}')  # two versions
    s3.put_object(Bucket=BUCKET, Key="sample_service/sample-service-1.0.0.tar.gz", Body=b"artifact")
    s3.put_object(Bucket=BUCKET, Key="scratch.txt", Body=b"x")
    s3.delete_object(Bucket=BUCKET, Key="scratch.txt")  # a delete marker over an old version

    with pytest.raises(DestroyRefused) as refused:
        destroy(clients, config, ["artifact_store", "notifications"])
    message = str(refused.value)
    assert BUCKET in message and "1 release record(s)" in message
    assert "sample_service/releases/1.0.0.json" in message and "--force" in message
    # Nothing was destroyed, not even the component before it.
    assert stack_names(aws) == {"deployline-artifact-store", "deployline-notifications"}
    assert parameter(aws, "/deployline/notifications/topic-arn") is not None

    results = destroy(clients, config, ["artifact_store", "notifications"], force=True)
    assert [r.action for r in results] == ["deleted", "deleted"]
    # 2 + 1 + 1 object versions and 1 delete marker.
    assert "5 object version(s)" in results[1].notes[0]
    assert BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert stack_names(aws) == set()


def test_status_reports_stacks_and_stale_parameters(aws, clients, config):
    assert {s.status for s in status(clients, config)} == {"absent"}
    launch(clients, config, ["network", "notifications"])
    aws["ssm"].put_parameter(Name="/deployline/network/vpc-id", Value="vpc-0000000000", Type="String",
                             Overwrite=True)
    found = {s.component: s for s in status(clients, config)}
    assert found["network"].status == "CREATE_COMPLETE"
    assert found["network"].stale == ["/deployline/network/vpc-id"]
    assert found["notifications"].stale == []
    assert found["ci_environment"].status == "absent"
    assert found["notifications"].parameters["/deployline/notifications/topic-arn"].endswith(
        ":deployline-notifications")
    json.dumps([s.to_dict() for s in found.values()])  # fit for XCom
    # The next launch repairs it.
    assert launch(clients, config, "network")[0].parameters == ["/deployline/network/vpc-id"]


# --------------------------------------------------------------------------------- configuration


def test_the_project_config_loads(monkeypatch):
    monkeypatch.setenv("DEPLOYLINE_ARTIFACT_BUCKET", "my-artifacts")
    monkeypatch.delenv("DEPLOYLINE_CI_REPOSITORY_URL", raising=False)
    monkeypatch.delenv("DEPLOYLINE_CFN_SERVICE_ROLE_ARN", raising=False)
    config = load_infrastructure_config(ROOT / "include" / "infrastructure.yaml")
    assert config.stack_prefix == "deployline" and config.conn_id == "aws_default"
    assert config.ssm_prefix == "/deployline" and config.artifact_store.bucket == "my-artifacts"
    assert config.ci.repository_url == "" and config.ci.ui_cidr == "10.0.0.0/8"
    assert config.service_role_arn is None  # ${DEPLOYLINE_CFN_SERVICE_ROLE_ARN:-} unset: no service role
    assert config.source_file.endswith("infrastructure.yaml")
    for component in COMPONENTS:
        assert config.template_path(component).is_file()
    # The driver's network prefix is where the network is published.
    assert config.parameter_names("network")["VpcId"].rsplit("/", 1)[0] == (
        CloudFormationSettings().network_parameter_prefix)


def test_the_service_role_comes_from_the_environment():
    path = ROOT / "include" / "infrastructure.yaml"
    role = "arn:aws:iam::123456789012:role/cd/deployline-cloudformation"  # a path is fine
    assert load_infrastructure_config(path, environ={"DEPLOYLINE_CFN_SERVICE_ROLE_ARN": role}).service_role_arn == role
    assert load_infrastructure_config(path, environ={}).service_role_arn is None


@pytest.mark.parametrize("text, expected", [
    ("ci:\n  ui_cidr: 0.0.0.0/0\n", "ci: Value error, ui_cidr: the Airflow UI is never open to the world"),
    ("network:\n  vpc_cidr: 10.40.0.0/33\n", "network.vpc_cidr: Value error, not an IPv4 CIDR block"),
    ("network:\n  public_subnet_cidrs: [10.50.0.0/24, 10.40.1.0/24]\n", "subnet 10.50.0.0/24 is not inside"),
    ("artifact_store:\n  bucket: Not_A_Bucket\n", "artifact_store.bucket: String should match pattern"),
    ("stack_prefx: x\n", "stack_prefx: unknown field"),
    ("service_role_arn: arn:aws:iam::123456789012:user/deployer\n",
     "service_role_arn: Value error, not an IAM role ARN (arn:<partition>:iam::<12-digit account>:role/<path/name>) "
     "(got 'arn:aws:iam::123456789012:user/deployer')"),
    ("region: ${NOT_SET_ANYWHERE}\n", "region: environment variable ${NOT_SET_ANYWHERE} is not set"),
    ("network: [\n", "malformed YAML at line"),
    ("- a\n", "expected a mapping at the top level"),
])
def test_config_errors_name_file_and_field(tmp_path, text, expected):
    path = tmp_path / "infrastructure.yaml"
    path.write_text(text)
    with pytest.raises(InfrastructureConfigError) as error:
        load_infrastructure_config(path, environ={})
    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)


# --------------------------------------------------------------------------------- clients


def test_clients_from_boto3_take_an_endpoint():
    clients = infra.clients_from_boto3("eu-west-1", "http://127.0.0.1:5055")
    for client in (clients.cfn, clients.ssm, clients.s3):
        assert client.meta.endpoint_url == "http://127.0.0.1:5055" and client.meta.region_name == "eu-west-1"


def test_clients_from_airflow_use_the_connection(aws, config, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_INFRA_TEST", json.dumps({"conn_type": "aws", "login": "testing",
                                                              "password": "testing"}))
    clients = infra.clients_from_airflow(config.model_copy(update={"conn_id": "infra_test"}))
    assert clients.cfn.meta.region_name == REGION and clients.cfn.meta.service_model.service_name == "cloudformation"
    result = launch(clients, config, ["notifications"])[0]
    assert result.action == "created" and parameter(aws, "/deployline/notifications/topic-arn")


# --------------------------------------------------------------------------------- command line


def test_cli_end_to_end(aws, ami, tmp_path, capsys):
    path = tmp_path / "infrastructure.yaml"
    path.write_text(yaml.safe_dump({
        "stack_prefix": "dlcli", "region": REGION, "ssm_prefix": "/dlcli",
        "template_dir": str(TEMPLATES), "artifact_store": {"bucket": BUCKET},
        "ci": {"image_id": ami, "repository_url": REPO},
    }))
    cfg = ["--config", str(path)]

    assert main(["infra", "up", *cfg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["created", "network", "dlcli-network"], ["created", "artifact_store", "dlcli-artifact-store"],
        ["created", "notifications", "dlcli-notifications"], ["created", "ci_environment", "dlcli-ci-environment"]]
    assert "VpcId=vpc-" in lines[0] and "ssm: 4 written" in lines[0]
    assert parameter(aws, "/dlcli/network/vpc-id") is not None

    assert main(["infra", "up", "network", "notifications", *cfg]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["unchanged", "unchanged"]

    assert main(["infra", "status", *cfg]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["CREATE_COMPLETE"] * 4

    aws["s3"].put_object(Bucket=BUCKET, Key="sample_service/releases/1.0.0.json", Body=b"{}")
    assert main(["infra", "down", "artifact_store", *cfg]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("infra down failed: artifact_store: bucket deployline-infra-test holds 1 release")

    assert main(["infra", "down", "artifact-store", "notifications", "--force", *cfg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["deleted", "notifications"], ["deleted", "artifact_store"]]

    assert main(["infra", "up", "databse", *cfg]) == 1
    captured = capsys.readouterr()
    assert "unknown component 'databse'" in captured.err and "Traceback" not in captured.err

    bad = tmp_path / "bad.yaml"
    bad.write_text("ci:\n  ui_cidr: 0.0.0.0/0\n")
    assert main(["infra", "status", "--config", str(bad)]) == 1
    assert f"{bad}: ci:" in capsys.readouterr().err
