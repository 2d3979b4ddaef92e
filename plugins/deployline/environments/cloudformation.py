"""Environments on AWS: one CloudFormation stack per environment, named after it.

The stack (``include/cloudformation/environment.yaml``) runs the baked AMI in an auto
scaling group behind an application load balancer. The network is not part of it: it
belongs to the support infrastructure, which publishes it as SSM parameters.
"""

from __future__ import annotations

import time
from pathlib import Path

from botocore.exceptions import ClientError, WaiterError

from deployline.config import PROJECT_ROOT, CloudFormationSettings
from deployline.environments.base import EnvironmentDriver, EnvironmentFailed, EnvironmentInfo, EnvironmentSpec

APPLICATION_TAG = "deployline:application"
STAGE_TAG = "deployline:stage"
VERSION_TAG = "deployline:version"
ENVIRONMENT_TAG = "deployline:environment"  # marks the stacks this driver owns
LABEL_TAG_PREFIX = "deployline:label:"

# Target states that count as healthy. The load balancer reports "healthy" once the health
# check on HealthCheckPath passes; moto (5.2) reports "healthy" for every running instance the
# auto scaling group registered, at once, without checking anything.
HEALTHY_TARGET_STATES = frozenset({"healthy"})

# Stable states of a stack that runs the environment (after a failed resize, CloudFormation
# rolls back to the previous, working configuration: UPDATE_ROLLBACK_COMPLETE).
_READY = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE"})


class CloudFormationDriver(EnvironmentDriver):
    name = "cloudformation"

    # A load balancer and instances take minutes; give CloudFormation up to 30 of them.
    waiter_config = {"Delay": 5, "MaxAttempts": 360}
    poll_interval = 5.0  # seconds between health checks in wait_until_healthy

    def __init__(
        self,
        cfn_client,
        ssm_client,
        autoscaling_client,
        elbv2_client,
        settings: CloudFormationSettings | None = None,
        template_path: Path | None = None,
        health_path: str = "/health",
    ):
        self.cfn = cfn_client
        self.ssm = ssm_client
        self.autoscaling = autoscaling_client
        self.elbv2 = elbv2_client
        self.settings = settings or CloudFormationSettings()
        self.template_path = Path(template_path or PROJECT_ROOT / self.settings.template)
        # What the load balancer checks (the pipeline's environments.health_path), fixed at creation.
        self.health_path = health_path

    # ------------------------------------------------------------------ interface

    def provision(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        if not spec.image_id:
            raise EnvironmentFailed(f"environment {spec.name}: no image_id (AMI) to run; bake an image first")
        stack = self._describe(spec.name)
        if stack is not None:
            status = stack["StackStatus"]
            if status in _READY:
                return self._info(stack)
            if status == "ROLLBACK_COMPLETE":
                # A stack whose first create failed can only be deleted, not updated.
                self._delete(spec.name)
            elif status == "CREATE_IN_PROGRESS":
                # An earlier try (timed out, or a retry) is creating it: wait for that one.
                return self._wait_for(spec.name, "stack_create_complete", "create")
            else:
                raise EnvironmentFailed(
                    f"environment {spec.name}: stack {spec.name} is {status}; tear it down and try again"
                )

        network = self._network(spec.name)
        parameters = {
            "ApplicationName": spec.application,
            "Stage": spec.stage,
            "Version": spec.version,
            "ImageId": spec.image_id,
            "DesiredCapacity": str(spec.size),
            # Every parameter is passed, defaults too: resize() reuses them all with
            # UsePreviousValue (and moto only remembers the parameters that were passed).
            "InstanceType": self.settings.instance_type,
            "AppPort": str(self.settings.app_port),
            "HealthCheckPath": self.health_path,
            "VpcId": network["vpc-id"],
            "SubnetIds": network["public-subnet-ids"],
        }
        tags = {
            APPLICATION_TAG: spec.application,
            STAGE_TAG: spec.stage,
            VERSION_TAG: spec.version,
            ENVIRONMENT_TAG: spec.name,
            **{f"{LABEL_TAG_PREFIX}{key}": str(value) for key, value in spec.labels.items()},
        }
        try:
            self.cfn.create_stack(
                StackName=spec.name,
                TemplateBody=self.template_path.read_text(encoding="utf-8"),
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
                Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
            )
        except ClientError as exc:
            # Another try created it between our describe and create: wait for that one.
            if exc.response["Error"]["Code"] != "AlreadyExistsException":
                raise
        return self._wait_for(spec.name, "stack_create_complete", "create")

    def wait_until_healthy(self, name: str, health_path: str, timeout: float) -> EnvironmentInfo:
        # The load balancer does the checking, on the HealthCheckPath the stack was created with.
        deadline = time.monotonic() + timeout
        while True:
            info = self.get(name)
            if info is None:
                raise EnvironmentFailed(f"environment {name} does not exist (no stack {name})")
            problem = self._health_problem(info)
            if problem is None:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EnvironmentFailed(
                    f"environment {name} (stack {name}) not healthy after {timeout:g}s "
                    f"(checking {info.details.get('HealthCheckPath', health_path)}): {problem}"
                )
            time.sleep(min(self.poll_interval, remaining))

    def get(self, name: str) -> EnvironmentInfo | None:
        stack = self._describe(name)
        return None if stack is None else self._info(stack)

    def resize(self, name: str, size: int) -> EnvironmentInfo:
        if size < 1:
            raise EnvironmentFailed(f"environment {name}: size must be at least 1, got {size}")
        stack = self._describe(name)
        if stack is None:
            raise EnvironmentFailed(f"environment {name} does not exist (no stack {name})")
        parameters = [
            {"ParameterKey": p["ParameterKey"], "UsePreviousValue": True}
            for p in stack.get("Parameters", [])
            if p["ParameterKey"] != "DesiredCapacity"
        ]
        parameters.append({"ParameterKey": "DesiredCapacity", "ParameterValue": str(size)})
        try:
            self.cfn.update_stack(StackName=name, UsePreviousTemplate=True, Parameters=parameters)
        except ClientError as exc:
            if "No updates are to be performed" in str(exc):
                return self._info(stack)  # already at that size
            raise
        return self._wait_for(name, "stack_update_complete", "resize")

    def teardown(self, name: str) -> bool:
        if self._describe(name) is None:
            return False
        self._delete(name)
        return True

    def list(self, application: str | None = None) -> list[EnvironmentInfo]:
        found = []
        for page in self.cfn.get_paginator("describe_stacks").paginate():
            for stack in page["Stacks"]:
                tags = _tags(stack)
                if stack["StackStatus"] == "DELETE_COMPLETE" or ENVIRONMENT_TAG not in tags:
                    continue
                if application is None or tags.get(APPLICATION_TAG) == application:
                    found.append(self._info(stack))
        return found

    # ------------------------------------------------------------------ helpers

    def _describe(self, name: str) -> dict | None:
        try:
            stacks = self.cfn.describe_stacks(StackName=name)["Stacks"]
        except ClientError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
            return None
        return stacks[0]

    def _delete(self, name: str) -> None:
        self.cfn.delete_stack(StackName=name)
        self._wait(name, "stack_delete_complete", "delete")

    def _wait_for(self, name: str, waiter: str, action: str) -> EnvironmentInfo:
        self._wait(name, waiter, action)
        stack = self._describe(name)
        if stack is None:
            raise EnvironmentFailed(f"environment {name}: stack {name} disappeared during {action}")
        return self._info(stack)

    def _wait(self, name: str, waiter: str, action: str) -> None:
        try:
            self.cfn.get_waiter(waiter).wait(StackName=name, WaiterConfig=self.waiter_config)
        except WaiterError as exc:
            raise EnvironmentFailed(
                f"environment {name}: {action} of stack {name} failed: {self._failure_reasons(name) or exc}"
            ) from exc

    def _failure_reasons(self, name: str) -> str:
        """The reasons CloudFormation gives, from the stack's failed events (newest first)."""
        try:
            events = self.cfn.describe_stack_events(StackName=name)["StackEvents"]
        except ClientError:
            return ""
        failed = [
            f"{e['LogicalResourceId']} ({e.get('ResourceType', '?')}) {e['ResourceStatus']}: "
            f"{e.get('ResourceStatusReason', 'no reason given')}"
            for e in events
            if e["ResourceStatus"].endswith("FAILED")
        ]
        return "; ".join(failed[:5])

    def _network(self, name: str) -> dict[str, str]:
        prefix = self.settings.network_parameter_prefix.rstrip("/")
        wanted = {f"{prefix}/vpc-id": "vpc-id", f"{prefix}/public-subnet-ids": "public-subnet-ids"}
        response = self.ssm.get_parameters(Names=list(wanted))
        if response.get("InvalidParameters"):
            missing = ", ".join(sorted(response["InvalidParameters"]))
            raise EnvironmentFailed(
                f"environment {name}: SSM parameter {missing} not found; "
                "launch the support infrastructure (network) first"
            )
        values = {wanted[p["Name"]]: p["Value"] for p in response["Parameters"]}
        values["public-subnet-ids"] = ",".join(s.strip() for s in values["public-subnet-ids"].split(",") if s.strip())
        return values

    def _health_problem(self, info: EnvironmentInfo) -> str | None:
        """What keeps the environment from being healthy, or None when it is."""
        group_name = info.details.get("AutoScalingGroupName")
        target_group = info.details.get("TargetGroupArn")
        if not group_name or not target_group:
            return f"stack is {info.details.get('StackStatus')} without AutoScalingGroupName/TargetGroupArn outputs"
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name])
        if not groups["AutoScalingGroups"]:
            return f"auto scaling group {group_name} does not exist"
        group = groups["AutoScalingGroups"][0]
        in_service = [
            i["InstanceId"]
            for i in group["Instances"]
            if i["LifecycleState"] == "InService" and i["HealthStatus"] == "Healthy"
        ]
        if len(in_service) < group["DesiredCapacity"]:
            return f"{len(in_service)} of {group['DesiredCapacity']} instances InService in {group_name}"
        # Only the group's current instances: old ones may still be draining from the target group.
        health = self.elbv2.describe_target_health(
            TargetGroupArn=target_group, Targets=[{"Id": i} for i in in_service]
        )["TargetHealthDescriptions"]
        unhealthy = [
            f"{d['Target']['Id']} {d['TargetHealth']['State']}"
            + (f" ({d['TargetHealth']['Description']})" if d["TargetHealth"].get("Description") else "")
            for d in health
            if d["TargetHealth"]["State"] not in HEALTHY_TARGET_STATES
        ]
        if unhealthy:
            return f"targets not healthy in {target_group}: " + "; ".join(unhealthy)
        return None

    def _info(self, stack: dict) -> EnvironmentInfo:
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        parameters = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
        tags = _tags(stack)
        return EnvironmentInfo(
            name=stack["StackName"],
            application=tags.get(APPLICATION_TAG, parameters.get("ApplicationName", "")),
            stage=tags.get(STAGE_TAG, parameters.get("Stage", "")),
            version=parameters.get("Version", tags.get(VERSION_TAG, "")),
            size=int(parameters.get("DesiredCapacity") or 0),
            endpoint=outputs.get("Url", ""),
            driver=self.name,
            created_at=stack["CreationTime"].isoformat(),
            labels={k.removeprefix(LABEL_TAG_PREFIX): v for k, v in tags.items() if k.startswith(LABEL_TAG_PREFIX)},
            details={
                **outputs,
                "HealthCheckPath": parameters.get("HealthCheckPath", ""),
                "StackId": stack["StackId"],
                "StackStatus": stack["StackStatus"],
            },
        )


def _tags(stack: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in stack.get("Tags", [])}
