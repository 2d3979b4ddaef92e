"""CloudFormationDriver blue/green against moto (in process): the router stack, green placement, switches, update.

moto 5.2 runs the real templates: the router's listeners start with a fixed-response 503 and
ModifyListener changes them; instances registered by an auto scaling group are "healthy" at once.
"""

from __future__ import annotations

from dataclasses import replace

import boto3
import pytest
from botocore.exceptions import ClientError
from deployline.config import CloudFormationSettings
from deployline.environments.base import EnvironmentFailed, EnvironmentSpec, environment_name
from deployline.environments.cloudformation import (
    LB_SECURITY_GROUP_LABEL,
    TARGET_GROUP_LABEL,
    CloudFormationDriver,
    router_name,
)
from moto import mock_aws
from stack_changes import SERVICE_ROLE, record_stack_changes

REGION = "us-east-1"
PREFIX = "/deployline/network"
APP = "sample_service"
ROUTER = "dl-sample-service-router"


@pytest.fixture
def aws(monkeypatch):
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",  # the tests register their own images
    }.items():
        monkeypatch.setenv(var, value)
    with mock_aws():
        yield {
            name: boto3.client(name, region_name=REGION)
            for name in ("cloudformation", "ssm", "autoscaling", "elbv2", "ec2")
        }


@pytest.fixture
def network(aws):
    ec2 = aws["ec2"]
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"][
            "SubnetId"
        ]
        for i, az in enumerate("ab")
    ]
    aws["ssm"].put_parameter(Name=f"{PREFIX}/vpc-id", Value=vpc, Type="String")
    aws["ssm"].put_parameter(Name=f"{PREFIX}/public-subnet-ids", Value=",".join(subnets), Type="String")
    return {"vpc": vpc, "subnets": subnets}


def register_image(aws, name):
    return aws["ec2"].register_image(
        Name=name,
        Architecture="x86_64",
        VirtualizationType="hvm",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]


@pytest.fixture
def images(aws):
    return {"1.0.0": register_image(aws, "sample-service-1.0.0"), "1.1.0": register_image(aws, "sample-service-1.1.0")}


@pytest.fixture
def driver(aws, network):
    driver = CloudFormationDriver(
        aws["cloudformation"], aws["ssm"], aws["autoscaling"], aws["elbv2"], CloudFormationSettings()
    )
    driver.switch_grace = 0
    return driver


def spec_for(images, version, *, stage="production", size=2, key=None):
    return EnvironmentSpec(
        application=APP,
        stage=stage,
        name=environment_name(APP, stage, key or version),
        size=size,
        version=version,
        artifact={"bucket": "artifacts", "key": f"sample-service-{version}.tar.gz"},
        image_id=images[version],
        labels={"run_id": f"run-{version}"},
    )


def release(driver, images, version):
    """What a production deploy does up to the switch: green placed in the idle slot, healthy, tested."""
    green = driver.green_spec(driver.ensure_router(APP), spec_for(images, version))
    driver.provision(green)
    driver.wait_until_healthy(green.name, "/health", timeout=5)
    return green


def default_action(aws, listener_arn):
    (listener,) = aws["elbv2"].describe_listeners(ListenerArns=[listener_arn])["Listeners"]
    (action,) = listener["DefaultActions"]
    return action


def stack_parameters(aws, name):
    stack = aws["cloudformation"].describe_stacks(StackName=name)["Stacks"][0]
    return {p["ParameterKey"]: p.get("ParameterValue") for p in stack["Parameters"]}


def resource_types(aws, name):
    summaries = aws["cloudformation"].list_stack_resources(StackName=name)["StackResourceSummaries"]
    return sorted(s["ResourceType"] for s in summaries if s["ResourceType"])


# ---------------------------------------------------------------------- the router


def test_router_is_created_once(aws, driver, network):
    assert driver.router(APP) is None

    first = driver.ensure_router(APP)
    second = driver.ensure_router(APP)

    assert first == second
    assert first.name == ROUTER == router_name(APP)
    assert (first.application, first.driver, first.live) == (APP, "cloudformation", None)
    assert first.endpoint == f"http://{first.details['LoadBalancerDnsName']}"
    assert first.details["TestUrl"] == f"{first.endpoint}:8080"
    assert driver.router(APP) == first
    stacks = aws["cloudformation"].describe_stacks()["Stacks"]
    assert [s["StackName"] for s in stacks] == [ROUTER]
    tags = {t["Key"]: t["Value"] for t in stacks[0]["Tags"]}
    assert tags == {"deployline:application": APP, "deployline:router": ROUTER}
    assert driver.list() == [] and driver.list(APP) == []  # a router is not an environment
    assert stack_parameters(aws, ROUTER)["TestIngressCidr"] == "10.0.0.0/8"

    # Before the first release both listeners answer 503 themselves.
    for listener in ("ProductionListenerArn", "TestListenerArn"):
        action = default_action(aws, first.details[listener])
        assert action["Type"] == "fixed-response" and action["FixedResponseConfig"]["StatusCode"] == "503"

    groups = aws["elbv2"].describe_target_groups(
        TargetGroupArns=[first.details["BlueTargetGroupArn"], first.details["GreenTargetGroupArn"]]
    )["TargetGroups"]
    assert len(groups) == 2
    for group in groups:
        assert (group["Port"], group["HealthCheckPath"], group["Matcher"]["HttpCode"]) == (8080, "/health", "200")
        assert group["VpcId"] == network["vpc"]

    (balancer,) = aws["elbv2"].describe_load_balancers()["LoadBalancers"]
    assert balancer["Scheme"] == "internet-facing"
    assert balancer["SecurityGroups"] == [first.details["LoadBalancerSecurityGroupId"]]


def test_router_security_group_opens_only_http_to_the_world(aws, driver, network):
    router = driver.ensure_router(APP)
    (group,) = aws["ec2"].describe_security_groups(GroupIds=[router.details["LoadBalancerSecurityGroupId"]])[
        "SecurityGroups"
    ]
    rules = {(r["FromPort"], r["ToPort"]): [ip["CidrIp"] for ip in r["IpRanges"]] for r in group["IpPermissions"]}
    assert rules == {(80, 80): ["0.0.0.0/0"], (8080, 8080): ["10.0.0.0/8"]}


def test_remove_router(aws, driver, images):
    assert driver.remove_router(APP) is False
    driver.ensure_router(APP)

    assert driver.remove_router(APP) is True

    assert driver.router(APP) is None
    assert aws["elbv2"].describe_load_balancers()["LoadBalancers"] == []
    # (moto 5.2 leaves a deleted stack's target groups behind: they are not checked here.)
    assert driver.remove_router(APP) is False
    with pytest.raises(EnvironmentFailed, match="no router"):
        driver.switch(APP, None)


def test_router_name_is_safe_for_cloudformation():
    assert router_name("sample_service") == "dl-sample-service-router"
    assert router_name("Billing.API") == "dl-billing-api-router"


# ---------------------------------------------------------------------- green, test, switch, rollback


def test_green_goes_to_the_idle_target_group_without_a_load_balancer_of_its_own(aws, driver, images):
    router = driver.ensure_router(APP)
    spec = spec_for(images, "1.0.0")

    green = driver.green_spec(router, spec)

    blue_group = router.details["BlueTargetGroupArn"]  # nothing is live: Blue is idle
    assert green.name == spec.name and green.version == spec.version
    assert green.labels == {
        "run_id": "run-1.0.0",
        "router": ROUTER,
        "slot": "blue",
        TARGET_GROUP_LABEL: blue_group,
        LB_SECURITY_GROUP_LABEL: router.details["LoadBalancerSecurityGroupId"],
    }
    assert spec.labels == {"run_id": "run-1.0.0"}  # the caller's spec is not changed

    info = driver.provision(green)

    assert info.details["TargetGroupArn"] == blue_group
    assert info.endpoint == ""  # reachable through the router only
    assert "AWS::ElasticLoadBalancingV2::LoadBalancer" not in resource_types(aws, green.name)
    assert resource_types(aws, green.name) == [
        "AWS::AutoScaling::AutoScalingGroup",
        "AWS::EC2::LaunchTemplate",
        "AWS::EC2::SecurityGroup",
    ]
    assert len(aws["elbv2"].describe_load_balancers()["LoadBalancers"]) == 1  # the router's
    (group,) = aws["autoscaling"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[info.details["AutoScalingGroupName"]]
    )["AutoScalingGroups"]
    assert group["TargetGroupARNs"] == [blue_group]
    # The instances take the application port from the router's load balancer only.
    instance_groups = aws["ec2"].describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"{green.name}-InstanceSecurityGroup-*"]}]
    )["SecurityGroups"]
    (rule,) = instance_groups[0]["IpPermissions"]
    assert (rule["FromPort"], rule["IpRanges"]) == (8080, [])
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [router.details["LoadBalancerSecurityGroupId"]]

    assert driver.wait_until_healthy(green.name, "/health", timeout=5).name == green.name
    assert driver.health_problem(green.name, "/health") is None
    assert [i.name for i in driver.list(APP)] == [green.name]


def test_test_endpoint_points_the_test_listener_at_green(aws, driver, images):
    green = release(driver, images, "1.0.0")
    router = driver.router(APP)

    url = driver.test_endpoint(router, green.name)

    assert url == router.details["TestUrl"]
    action = default_action(aws, router.details["TestListenerArn"])
    assert action["Type"] == "forward" and action["TargetGroupArn"] == router.details["BlueTargetGroupArn"]
    after = driver.router(APP)
    assert after.details["UnderTest"] == green.name
    assert after.live is None  # testing does not touch production
    assert default_action(aws, router.details["ProductionListenerArn"])["Type"] == "fixed-response"


def test_switch_moves_production_and_rolls_back(aws, driver, images):
    blue = release(driver, images, "1.0.0")
    live = driver.switch(APP, blue.name)
    assert live.live == blue.name and live.details["LiveSlot"] == "blue"
    production = live.details["ProductionListenerArn"]
    assert default_action(aws, production)["TargetGroupArn"] == live.details["BlueTargetGroupArn"]

    # The next release goes to the other slot, tested there while blue serves production.
    green = release(driver, images, "1.1.0")
    assert green.labels["slot"] == "green"
    assert green.labels[TARGET_GROUP_LABEL] == live.details["GreenTargetGroupArn"]
    router = driver.router(APP)
    assert router.live == blue.name
    driver.test_endpoint(router, green.name)
    assert (
        default_action(aws, router.details["TestListenerArn"])["TargetGroupArn"]
        == router.details["GreenTargetGroupArn"]
    )

    switched = driver.switch(APP, green.name)

    assert switched.live == green.name and switched.details["LiveSlot"] == "green"
    assert switched.endpoint == live.endpoint  # the production URL never changes
    assert default_action(aws, production)["TargetGroupArn"] == switched.details["GreenTargetGroupArn"]
    assert driver.router(APP).live == green.name

    # Rollback: back to blue, which kept running.
    back = driver.switch(APP, blue.name)
    assert back.live == blue.name and driver.router(APP).live == blue.name
    assert default_action(aws, production)["TargetGroupArn"] == back.details["BlueTargetGroupArn"]


def test_teardown_of_green_leaves_the_router_intact(aws, driver, images):
    blue = release(driver, images, "1.0.0")
    driver.switch(APP, blue.name)
    green = release(driver, images, "1.1.0")
    router = driver.router(APP)
    driver.test_endpoint(router, green.name)

    assert driver.teardown(green.name) is True

    assert driver.get(green.name) is None
    after = driver.router(APP)
    assert after is not None and after.live == blue.name
    assert after.details["StackStatus"] == "CREATE_COMPLETE"
    groups = aws["elbv2"].describe_target_groups(
        TargetGroupArns=[router.details["BlueTargetGroupArn"], router.details["GreenTargetGroupArn"]]
    )["TargetGroups"]
    assert len(groups) == 2
    assert len(aws["elbv2"].describe_load_balancers()["LoadBalancers"]) == 1
    assert driver.health_problem(blue.name, "/health") is None

    # The slot is free again: the next release goes there.
    again = driver.green_spec(after, spec_for(images, "1.1.0", key="retry"))
    assert again.labels["slot"] == "green"


def test_the_live_environment_is_not_torn_down(aws, driver, images):
    blue = release(driver, images, "1.0.0")
    driver.switch(APP, blue.name)

    with pytest.raises(EnvironmentFailed, match="production traffic"):
        driver.teardown(blue.name)
    assert driver.get(blue.name) is not None

    nothing = driver.switch(APP, None)
    assert nothing.live is None and nothing.details["LiveTargetGroupArn"] is None
    action = default_action(aws, nothing.details["ProductionListenerArn"])
    assert action["Type"] == "fixed-response" and action["FixedResponseConfig"]["StatusCode"] == "503"
    assert driver.teardown(blue.name) is True
    assert driver.router(APP) is not None
    with pytest.raises(EnvironmentFailed, match="router stack"):
        driver.teardown(ROUTER)


def test_green_spec_is_stable_across_retries(aws, driver, images):
    router = driver.ensure_router(APP)
    spec = spec_for(images, "1.0.0")
    green = driver.green_spec(router, spec)
    driver.provision(green)
    assert driver.green_spec(driver.router(APP), spec) == green

    live = driver.switch(APP, green.name)
    # A retry after the switch finds its environment where it is (live), not in the idle slot.
    assert driver.green_spec(live, spec) == green


def test_idle_slot_still_in_use_is_refused(aws, driver, images):
    blue = release(driver, images, "1.0.0")
    driver.switch(APP, blue.name)
    green = release(driver, images, "1.1.0")
    driver.switch(APP, green.name)  # blue stays, in the now idle Blue group

    with pytest.raises(EnvironmentFailed, match=f"still has environment.*{blue.name}.*tear them down"):
        driver.green_spec(driver.router(APP), spec_for(images, "1.1.0", key="next"))

    driver.teardown(blue.name)
    assert driver.green_spec(driver.router(APP), spec_for(images, "1.1.0", key="next")).labels["slot"] == "blue"


def test_only_environments_behind_the_router_can_be_switched_to(aws, driver, images):
    router = driver.ensure_router(APP)
    own = driver.provision(spec_for(images, "1.0.0", stage="acceptance"))  # its own load balancer

    with pytest.raises(EnvironmentFailed, match="not behind router"):
        driver.switch(APP, own.name)
    with pytest.raises(EnvironmentFailed, match="not behind router"):
        driver.test_endpoint(router, own.name)
    with pytest.raises(EnvironmentFailed, match="does not exist"):
        driver.switch(APP, "dl-nothing-here")
    assert driver.router(APP).live is None


def test_target_group_label_needs_the_security_group(aws, driver, images):
    router = driver.ensure_router(APP)
    spec = spec_for(images, "1.0.0")
    half = replace(spec, labels={TARGET_GROUP_LABEL: router.details["BlueTargetGroupArn"]})
    with pytest.raises(EnvironmentFailed, match=LB_SECURITY_GROUP_LABEL):
        driver.provision(half)


# ---------------------------------------------------------------------- update and health


def test_update_changes_version_image_and_size(aws, driver, images):
    spec = spec_for(images, "1.0.0", stage="preproduction", key="preproduction", size=2)
    created = driver.update(spec)  # missing: created
    assert (created.version, created.size, created.details["StackStatus"]) == ("1.0.0", 2, "CREATE_COMPLETE")

    newer = replace(spec, version="1.1.0", image_id=images["1.1.0"], size=3, labels={"run_id": "run-1.1.0"})
    info = driver.update(newer)

    assert (info.version, info.size, info.details["StackStatus"]) == ("1.1.0", 3, "UPDATE_COMPLETE")
    assert info.name == created.name and info.details["StackId"] == created.details["StackId"]
    assert info.endpoint == created.endpoint  # the same load balancer
    parameters = stack_parameters(aws, spec.name)
    assert parameters["Version"] == "1.1.0" and parameters["ImageId"] == images["1.1.0"]
    assert (parameters["DesiredCapacity"], parameters["MaxCapacity"]) == ("3", "4")
    assert parameters["InstanceType"] == "t3.micro" and parameters["TargetGroupArn"] == ""
    stack = aws["cloudformation"].describe_stacks(StackName=spec.name)["Stacks"][0]
    tags = {t["Key"]: t["Value"] for t in stack["Tags"]}
    assert tags["deployline:version"] == "1.1.0" and tags["deployline:environment"] == spec.name
    assert tags["deployline:label:run_id"] == "run-1.1.0"
    versions = aws["ec2"].describe_launch_template_versions(LaunchTemplateId=info.details["LaunchTemplateId"])
    latest = max(versions["LaunchTemplateVersions"], key=lambda v: v["VersionNumber"])
    assert latest["LaunchTemplateData"]["ImageId"] == images["1.1.0"]
    (group,) = aws["autoscaling"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[info.details["AutoScalingGroupName"]]
    )["AutoScalingGroups"]
    assert (group["DesiredCapacity"], group["MinSize"], group["MaxSize"], len(group["Instances"])) == (3, 3, 4, 3)
    assert driver.wait_until_healthy(spec.name, "/health", timeout=5).version == "1.1.0"


def test_update_behind_the_router_stays_in_its_target_group(aws, driver, images):
    blue = release(driver, images, "1.0.0")
    newer = replace(blue, version="1.1.0", image_id=images["1.1.0"])

    info = driver.update(newer)

    assert info.version == "1.1.0"
    assert info.details["TargetGroupArn"] == blue.labels[TARGET_GROUP_LABEL]
    assert stack_parameters(aws, blue.name)["TargetGroupArn"] == blue.labels[TARGET_GROUP_LABEL]
    assert driver.health_problem(blue.name, "/health") is None


def test_update_without_changes_is_not_an_error(aws, driver, images, monkeypatch):
    spec = spec_for(images, "1.0.0", stage="preproduction", key="preproduction")
    driver.update(spec)

    def no_updates(**kwargs):
        error = {"Error": {"Code": "ValidationError", "Message": "No updates are to be performed."}}
        raise ClientError(error, "UpdateStack")

    monkeypatch.setattr(aws["cloudformation"], "update_stack", no_updates)
    info = driver.update(spec)
    assert (info.version, info.details["StackStatus"]) == ("1.0.0", "CREATE_COMPLETE")


def test_health_problem_is_one_look(aws, driver, images):
    assert "dl-nothing-here does not exist" in driver.health_problem("dl-nothing-here", "/health")

    green = release(driver, images, "1.0.0")
    info = driver.get(green.name)
    (group,) = aws["autoscaling"].describe_auto_scaling_groups(
        AutoScalingGroupNames=[info.details["AutoScalingGroupName"]]
    )["AutoScalingGroups"]
    first = group["Instances"][0]["InstanceId"]
    aws["elbv2"].deregister_targets(
        TargetGroupArn=info.details["TargetGroupArn"], Targets=[{"Id": first, "Port": 8080}]
    )

    problem = driver.health_problem(green.name, "/health")

    assert problem is not None and first in problem and "unused" in problem


# ---------------------------------------------------------------------- the CloudFormation service role

def every_stack_change(aws, driver, images) -> dict[str, str | None]:
    """Environment and router: create, resize, update in place, tear down; the stacks' RoleARN meanwhile."""
    roles = {}
    spec = spec_for(images, "1.0.0", stage="acceptance", size=1)
    driver.provision(spec)
    driver.resize(spec.name, 2)
    driver.update(replace(spec, version="1.1.0", image_id=images["1.1.0"], size=2))
    # moto forgets a stack's role on an update without RoleARN: still there, so each update passed it.
    roles[spec.name] = aws["cloudformation"].describe_stacks(StackName=spec.name)["Stacks"][0].get("RoleARN")
    driver.ensure_router(APP)
    roles[ROUTER] = aws["cloudformation"].describe_stacks(StackName=ROUTER)["Stacks"][0].get("RoleARN")
    driver.teardown(spec.name)
    driver.remove_router(APP)
    return roles


def test_a_service_role_is_passed_on_every_create_update_and_delete(aws, network, images, monkeypatch):
    driver = CloudFormationDriver(aws["cloudformation"], aws["ssm"], aws["autoscaling"], aws["elbv2"],
                                  CloudFormationSettings(service_role_arn=SERVICE_ROLE))
    calls = record_stack_changes(monkeypatch, aws["cloudformation"])

    roles = every_stack_change(aws, driver, images)

    assert [call[0] for call in calls] == [
        "create_stack", "update_stack", "update_stack", "create_stack", "delete_stack", "delete_stack"]
    assert {call[2] for call in calls} == {SERVICE_ROLE}
    assert set(roles.values()) == {SERVICE_ROLE}


def test_without_a_service_role_no_role_arn_is_passed(aws, driver, images, monkeypatch):
    assert driver.settings.service_role_arn is None
    calls = record_stack_changes(monkeypatch, aws["cloudformation"])

    roles = every_stack_change(aws, driver, images)

    assert len(calls) == 6 and {call[2] for call in calls} == {None}
    assert set(roles.values()) == {None}  # CloudFormation acts with the caller's credentials, as before


# ---------------------------------------------------------------------- the deploy task (BlueGreenDeployOperator)


def held_in_progress(driver, monkeypatch):
    """Every stack the driver creates stays CREATE_IN_PROGRESS (moto completes them at once)."""
    from moto.cloudformation.models import cloudformation_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    held = []
    start_provision = driver.start_provision

    def holding(spec):
        pending = start_provision(spec)
        if pending and pending.operation == "create":
            fake = next(s for s in cloudformation_backends[DEFAULT_ACCOUNT_ID][REGION].stacks.values()
                        if s.name == pending.stack and s.status != "DELETE_COMPLETE")
            if fake.status == "CREATE_COMPLETE" and fake.name not in [f.name for f in held]:
                fake.status = "CREATE_IN_PROGRESS"
                held.append(fake)
        return pending

    monkeypatch.setattr(driver, "start_provision", holding)
    return held


@pytest.fixture
def deploy_task(aws, driver, images, monkeypatch):
    import json

    from deployline.blue_green_operator import BlueGreenDeployOperator
    from deployline.config import Production
    from deployline.deployments import BlueGreen

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": REGION}}))
    outcomes, smoked = {}, []

    def make(version):
        return BlueGreenDeployOperator(
            task_id="deploy", op_kwargs={"version": version}, region_name=REGION,
            deploy=lambda version: BlueGreen(driver, spec_for(images, version),
                                             Production(drain_seconds=0, verify_seconds=0.5, check_interval=0.1),
                                             health_path="/health", health_timeout=10, smoke=smoked.append),
            on_deployed=lambda deployed, state, version: outcomes.setdefault("deployed", deployed),
            on_rolled_back=lambda error, state, version: outcomes.setdefault("rolled_back", error))

    return make, outcomes, smoked


def test_the_deploy_task_waits_for_greens_stack_in_the_triggerer(aws, driver, deploy_task, monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred
    from deployline.stack_readiness import StackSettledTrigger

    make, outcomes, smoked = deploy_task
    held = held_in_progress(driver, monkeypatch)
    with pytest.raises(TaskDeferred) as deferred:
        make("1.0.0").execute(context={})
    trigger, state = deferred.value.trigger, deferred.value.kwargs["state"]
    green = environment_name(APP, "production", "1.0.0")
    assert isinstance(trigger, StackSettledTrigger) and (trigger.stack_name, trigger.operation) == (green, "create")
    assert state["phase"] == "provision" and state["waiting"] == {"stack": green, "operation": "create"}
    assert smoked == [] and driver.router(APP).live is None  # nothing switched while green is being made

    held[0].status = "CREATE_COMPLETE"
    make("1.0.0").resume({}, event={"status": "success", "stack_name": green, "operation": "create"}, state=state)
    deployed = outcomes["deployed"]
    assert deployed.result == "deployed" and driver.router(APP).live == green
    assert smoked == [driver.router(APP).details["TestUrl"], deployed.endpoint]  # green's address, then production


def test_a_failed_green_stack_rolls_the_deploy_back(aws, driver, images, deploy_task, monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred
    from deployline.deployments import RolledBack

    make, outcomes, smoked = deploy_task
    make("1.0.0").execute(context={})  # the first release, not held
    held = held_in_progress(driver, monkeypatch)
    with pytest.raises(TaskDeferred) as deferred:
        make("1.1.0").execute(context={})
    green = environment_name(APP, "production", "1.1.0")
    held[0].status = "ROLLBACK_COMPLETE"  # what CloudFormation does when an instance does not come up
    event = {"status": "error", "stack_name": green, "operation": "create", "stack_status": "ROLLBACK_COMPLETE",
             "message": "create of stack ended ROLLBACK_COMPLETE: Instances: the subnet is in use"}
    with pytest.raises(RolledBack) as caught:
        make("1.1.0").resume({}, event=event, state=deferred.value.kwargs["state"])
    assert caught.value.restored == "1.0.0" and "the subnet is in use" in caught.value.reason
    assert outcomes["rolled_back"] is caught.value
    assert driver.get(green) is None and driver.router(APP).live == environment_name(APP, "production", "1.0.0")


def test_the_router_listeners_are_the_only_ones_the_pipeline_role_may_change(aws, driver, images):
    """include/iam/deployline-pipeline-policy.json allows ModifyListener on listener/app/dlr-*/* only:
    the routers' load balancers are named so; an environment's own load balancer is not."""
    import fnmatch
    import json
    from pathlib import Path

    policy = json.loads((Path(__file__).resolve().parents[2] / "include/iam/deployline-pipeline-policy.json")
                        .read_text())
    (pattern,) = [s["Resource"] for s in policy["Statement"] if s["Sid"] == "ElbSwitchRouterListeners"]
    router = driver.ensure_router(APP)
    listeners = [router.details["ProductionListenerArn"], router.details["TestListenerArn"]]
    assert all(fnmatch.fnmatch(arn, pattern) for arn in listeners), listeners
    own = driver.provision(spec_for(images, "1.0.0", stage="acceptance"))  # its own load balancer
    arns = [lb["LoadBalancerArn"] for lb in aws["elbv2"].describe_load_balancers()["LoadBalancers"]]
    others = [x["ListenerArn"] for arn in arns
              for x in aws["elbv2"].describe_listeners(LoadBalancerArn=arn)["Listeners"] if x["ListenerArn"] not in
              listeners]
    assert others and not any(fnmatch.fnmatch(arn, pattern) for arn in others), (own.name, others)
