"""CloudFormationDriver against moto (in process): the real template, stacks, ASG, ALB, SSM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from deployline.config import CloudFormationSettings
from deployline.environments.base import EnvironmentFailed, EnvironmentSpec, environment_name
from deployline.environments.cloudformation import CloudFormationDriver
from moto import mock_aws
from moto.cloudformation.models import cloudformation_backends
from moto.core import DEFAULT_ACCOUNT_ID

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "include" / "cloudformation" / "environment.yaml"
ROUTER_TEMPLATE = ROOT / "include" / "cloudformation" / "router.yaml"
REGION = "us-east-1"
PREFIX = "/deployline/network"


@pytest.fixture
def aws(monkeypatch):
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        # Loading moto's default AMIs costs about a second per test; the tests register their own.
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    }.items():
        monkeypatch.setenv(var, value)
    with mock_aws():
        yield {
            name: boto3.client(name, region_name=REGION)
            for name in ("cloudformation", "ssm", "autoscaling", "elbv2", "ec2")
        }


@pytest.fixture
def network(aws):
    """What support infrastructure publishes: a VPC, two public subnets in two AZs, SSM parameters."""
    ec2 = aws["ec2"]
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"][
            "SubnetId"
        ]
        for i, az in enumerate("ab")
    ]
    aws["ssm"].put_parameter(Name=f"{PREFIX}/vpc-id", Value=vpc, Type="String")
    aws["ssm"].put_parameter(Name=f"{PREFIX}/public-subnet-ids", Value=" , ".join(subnets), Type="String")
    return {"vpc": vpc, "subnets": subnets}


@pytest.fixture
def image_id(aws):
    """A 'baked' AMI, registered directly (moto's 1300 default AMIs are not loaded: slow)."""
    return aws["ec2"].register_image(
        Name="sample-service-1.0.0",
        Architecture="x86_64",
        VirtualizationType="hvm",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]


@pytest.fixture
def driver(aws, network):
    return CloudFormationDriver(
        aws["cloudformation"], aws["ssm"], aws["autoscaling"], aws["elbv2"], CloudFormationSettings()
    )


def make_spec(image_id, *, application="sample_service", stage="acceptance", key="run-1", size=2, **extra):
    return EnvironmentSpec(
        application=application,
        stage=stage,
        name=environment_name(application, stage, key),
        size=size,
        version="1.0.0",
        artifact={"bucket": "artifacts", "key": "sample-service-1.0.0.tar.gz"},
        image_id=image_id,
        labels={"owner": "alice", "run_id": key},
        **extra,
    )


def stack_of(aws, name):
    return aws["cloudformation"].describe_stacks(StackName=name)["Stacks"][0]


def group_of(aws, info):
    name = info.details["AutoScalingGroupName"]
    return aws["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]


def moto_stack(name):
    backend = cloudformation_backends[DEFAULT_ACCOUNT_ID][REGION]
    return next(s for s in backend.stacks.values() if s.name == name)


@pytest.mark.parametrize("template", [TEMPLATE, ROUTER_TEMPLATE], ids=lambda p: p.name)
def test_template_passes_cfn_lint(template):
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run([str(cfn_lint), str(template)], capture_output=True, text=True, timeout=120)
    # cfn-lint exit codes: 0 clean, 4 warnings only; 2 / 6 mean errors.
    assert result.returncode in (0, 4), result.stdout + result.stderr


def test_provision_creates_the_stack(aws, driver, image_id, network):
    spec = make_spec(image_id, size=2)
    info = driver.provision(spec)

    stack = stack_of(aws, spec.name)
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert parameters["ImageId"] == image_id
    assert parameters["DesiredCapacity"] == "2"
    assert parameters["Version"] == "1.0.0"
    assert parameters["Stage"] == "acceptance"
    assert parameters["ApplicationName"] == "sample_service"
    assert parameters["InstanceType"] == "t3.micro"
    assert parameters["AppPort"] == "8080"
    assert parameters["VpcId"] == network["vpc"]
    # Its own load balancer: no router's target group.
    assert parameters["TargetGroupArn"] == parameters["LoadBalancerSecurityGroupId"] == ""
    tags = {t["Key"]: t["Value"] for t in stack["Tags"]}
    assert tags["deployline:application"] == "sample_service"
    assert tags["deployline:environment"] == spec.name
    assert tags["deployline:label:owner"] == "alice"

    assert info.name == spec.name and info.driver == "cloudformation"
    assert (info.application, info.stage, info.version, info.size) == ("sample_service", "acceptance", "1.0.0", 2)
    assert info.endpoint.startswith("http://") and info.endpoint == f"http://{info.details['LoadBalancerDnsName']}"
    assert info.labels == {"owner": "alice", "run_id": "run-1"}
    assert info.details["StackStatus"] == "CREATE_COMPLETE"

    group = group_of(aws, info)
    assert group["DesiredCapacity"] == group["MinSize"] == 2
    assert group["MaxSize"] == 3  # room for the one extra instance of a rolling update
    assert len(group["Instances"]) == 2
    assert group["TargetGroupARNs"] == [info.details["TargetGroupArn"]]
    assert group["HealthCheckType"] == "ELB"

    versions = aws["ec2"].describe_launch_template_versions(LaunchTemplateId=info.details["LaunchTemplateId"])
    data = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert data["ImageId"] == image_id
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert all(m["Ebs"]["Encrypted"] for m in data["BlockDeviceMappings"])

    # Port 80 on the load balancer is the only thing open to the world.
    groups = aws["ec2"].describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [network["vpc"]]}])
    world_open = [
        (g["GroupId"], rule["FromPort"], rule["ToPort"])
        for g in groups["SecurityGroups"]
        for rule in g["IpPermissions"]
        if any(r["CidrIp"] == "0.0.0.0/0" for r in rule["IpRanges"])
    ]
    assert [(port, to) for _, port, to in world_open] == [(80, 80)]
    app_rules = [r for g in groups["SecurityGroups"] for r in g["IpPermissions"] if r.get("FromPort") == 8080]
    assert len(app_rules) == 1 and app_rules[0]["IpRanges"] == []
    assert app_rules[0]["UserIdGroupPairs"][0]["GroupId"] == world_open[0][0]


def test_provisioning_twice_leaves_one_stack(aws, driver, image_id):
    spec = make_spec(image_id)
    first = driver.provision(spec)
    second = driver.provision(spec)
    assert second.details["StackId"] == first.details["StackId"]
    stacks = aws["cloudformation"].describe_stacks()["Stacks"]
    assert [s["StackName"] for s in stacks] == [spec.name]


def test_rolled_back_stack_is_replaced(aws, driver, image_id):
    spec = make_spec(image_id)
    first = driver.provision(spec)
    moto_stack(spec.name).status = "ROLLBACK_COMPLETE"  # moto never fails a create by itself

    second = driver.provision(spec)

    assert second.details["StackId"] != first.details["StackId"]
    assert second.details["StackStatus"] == "CREATE_COMPLETE"
    assert len(aws["cloudformation"].describe_stacks()["Stacks"]) == 1


def test_stack_in_a_failed_state_is_not_replaced_silently(aws, driver, image_id):
    spec = make_spec(image_id)
    driver.provision(spec)
    moto_stack(spec.name).status = "UPDATE_ROLLBACK_FAILED"
    with pytest.raises(EnvironmentFailed, match="UPDATE_ROLLBACK_FAILED; tear it down"):
        driver.provision(spec)


def test_failed_create_names_the_failed_resources(aws, driver, image_id, monkeypatch):
    from moto.cloudformation.models import Event

    cfn = aws["cloudformation"]
    real_create = cfn.create_stack

    def failing_create(**kwargs):
        response = real_create(**kwargs)
        stack = moto_stack(kwargs["StackName"])
        stack.events.append(
            Event(
                stack_id=stack.stack_id,
                stack_name=stack.name,
                logical_resource_id="LoadBalancer",
                physical_resource_id="",
                resource_type="AWS::ElasticLoadBalancingV2::LoadBalancer",
                resource_status="CREATE_FAILED",
                resource_status_reason="At least two subnets in two different Availability Zones must be specified",
                resource_properties=None,
            )
        )
        stack.status = "ROLLBACK_COMPLETE"
        return response

    monkeypatch.setattr(cfn, "create_stack", failing_create)
    spec = make_spec(image_id)
    with pytest.raises(EnvironmentFailed) as failed:
        driver.provision(spec)
    message = str(failed.value)
    assert spec.name in message
    assert "LoadBalancer" in message and "two different Availability Zones" in message


def test_get_and_list(aws, driver, image_id):
    assert driver.get("dl-nothing-here") is None
    assert driver.list() == []
    one = driver.provision(make_spec(image_id, key="a", size=1))
    two = driver.provision(make_spec(image_id, key="b", size=1, stage="capacity"))
    other = driver.provision(make_spec(image_id, application="billing", key="c", size=1))
    # A stack that is not an environment (support infrastructure) is never listed.
    aws["cloudformation"].create_stack(
        StackName="support",
        TemplateBody='{"Resources": {"Topic": {"Type": "AWS::SNS::Topic"}}}',
        Tags=[{"Key": "deployline:application", "Value": "sample_service"}],
    )

    got = driver.get(one.name)
    assert got is not None and got.to_dict() == one.to_dict()
    assert got.created_at  # ISO timestamp from CreationTime
    assert sorted(i.name for i in driver.list("sample_service")) == sorted([one.name, two.name])
    assert [i.name for i in driver.list("billing")] == [other.name]
    assert len(driver.list()) == 3
    assert {i.stage for i in driver.list("sample_service")} == {"acceptance", "capacity"}


def test_wait_until_healthy(aws, driver, image_id):
    spec = make_spec(image_id, size=2)
    driver.provision(spec)
    info = driver.wait_until_healthy(spec.name, "/health", timeout=5)
    assert info.size == 2
    # moto registers the group's instances in the target group and reports them "healthy".
    health = aws["elbv2"].describe_target_health(TargetGroupArn=info.details["TargetGroupArn"])
    assert {d["TargetHealth"]["State"] for d in health["TargetHealthDescriptions"]} == {"healthy"}


def test_wait_until_healthy_times_out_naming_what_is_unhealthy(aws, driver, image_id):
    spec = make_spec(image_id, size=2)
    info = driver.provision(spec)
    instances = [i["InstanceId"] for i in group_of(aws, info)["Instances"]]
    aws["elbv2"].deregister_targets(
        TargetGroupArn=info.details["TargetGroupArn"], Targets=[{"Id": instances[0], "Port": 8080}]
    )
    driver.poll_interval = 0.01
    with pytest.raises(EnvironmentFailed) as failed:
        driver.wait_until_healthy(spec.name, "/health", timeout=0.05)
    message = str(failed.value)
    assert spec.name in message and instances[0] in message and "unused" in message
    assert instances[1] not in message

    with pytest.raises(EnvironmentFailed, match="does not exist"):
        driver.wait_until_healthy("dl-nothing-here", "/health", timeout=0)


def test_resize(aws, driver, image_id):
    spec = make_spec(image_id, size=2)
    driver.provision(spec)

    info = driver.resize(spec.name, 3)

    assert info.size == 3 and info.details["StackStatus"] == "UPDATE_COMPLETE"
    group = group_of(aws, info)
    assert group["DesiredCapacity"] == 3 and len(group["Instances"]) == 3
    assert group["MaxSize"] == 4
    parameters = {p["ParameterKey"]: p["ParameterValue"] for p in stack_of(aws, spec.name)["Parameters"]}
    assert parameters["ImageId"] == image_id and parameters["Version"] == "1.0.0"
    assert parameters["MaxCapacity"] == "4"
    assert driver.wait_until_healthy(spec.name, "/health", timeout=5).size == 3

    with pytest.raises(EnvironmentFailed, match="does not exist"):
        driver.resize("dl-nothing-here", 2)


def test_resize_without_changes_is_not_an_error(aws, driver, image_id, monkeypatch):
    spec = make_spec(image_id, size=2)
    driver.provision(spec)

    def no_updates(**kwargs):
        error = {"Error": {"Code": "ValidationError", "Message": "No updates are to be performed."}}
        raise ClientError(error, "UpdateStack")

    monkeypatch.setattr(aws["cloudformation"], "update_stack", no_updates)
    assert driver.resize(spec.name, 2).size == 2


def test_teardown(aws, driver, image_id):
    spec = make_spec(image_id)
    info = driver.provision(spec)

    assert driver.teardown(spec.name) is True

    assert driver.get(spec.name) is None
    assert driver.list() == []
    with pytest.raises(ClientError):
        aws["cloudformation"].describe_stacks(StackName=spec.name)
    names = [g["AutoScalingGroupName"] for g in aws["autoscaling"].describe_auto_scaling_groups()["AutoScalingGroups"]]
    assert info.details["AutoScalingGroupName"] not in names
    assert driver.teardown(spec.name) is False


def test_missing_network_parameter_is_a_clear_error(aws, driver, image_id):
    aws["ssm"].delete_parameter(Name=f"{PREFIX}/public-subnet-ids")
    spec = make_spec(image_id)
    with pytest.raises(EnvironmentFailed) as failed:
        driver.provision(spec)
    message = str(failed.value)
    assert f"{PREFIX}/public-subnet-ids" in message and "support infrastructure" in message
    assert spec.name in message
    assert aws["cloudformation"].describe_stacks()["Stacks"] == []


def test_spec_without_image_is_a_clear_error(aws, driver):
    spec = make_spec(None)
    with pytest.raises(EnvironmentFailed, match="image_id"):
        driver.provision(spec)
    assert aws["cloudformation"].describe_stacks()["Stacks"] == []


def test_template_path_defaults_to_the_project_template(aws):
    driver = CloudFormationDriver(None, None, None, None)
    assert driver.template_path == TEMPLATE
    assert driver.router_template_path == ROUTER_TEMPLATE
    assert driver.settings == CloudFormationSettings()
