"""Environments on AWS: one CloudFormation stack per environment, named after it.

The stack (``include/cloudformation/environment.yaml``) runs the baked AMI in an auto
scaling group behind an application load balancer. The network is not part of it: it
belongs to the support infrastructure, which publishes it as SSM parameters.

Production is blue/green behind one load balancer per application, CodeDeploy style: the
router stack (``include/cloudformation/router.yaml``, ``dl-<application>-router``) holds the
load balancer, two target groups (Blue, Green), a production listener (80) and a test
listener (8080). An environment stack created from ``green_spec`` has no load balancer of its
own: its instances register in the router's idle target group. ``test_endpoint`` and
``switch`` point the listeners at a target group with ModifyListener; which environment is
live is read back from the production listener, never recorded elsewhere.

With ``environments.cloudformation.service_role_arn`` every create, update and delete passes that
CloudFormation service role (``RoleARN``): CloudFormation makes the resources with its permissions,
and the pipeline role needs only ``iam:PassRole`` on it (``include/iam/README.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from pathlib import Path

from botocore.exceptions import ClientError, WaiterError
from botocore.waiter import WaiterModel, create_waiter_with_client

from deployline.config import PROJECT_ROOT, CloudFormationSettings
from deployline.environments.base import (
    EnvironmentDriver,
    EnvironmentFailed,
    EnvironmentInfo,
    EnvironmentSpec,
    RouterInfo,
    StackOperation,
)

APPLICATION_TAG = "deployline:application"
STAGE_TAG = "deployline:stage"
VERSION_TAG = "deployline:version"
ENVIRONMENT_TAG = "deployline:environment"  # marks the stacks this driver owns
ROUTER_TAG = "deployline:router"  # marks router stacks: never listed as environments
LABEL_TAG_PREFIX = "deployline:label:"

ROUTER_TEMPLATE = PROJECT_ROOT / "include" / "cloudformation" / "router.yaml"
# Labels green_spec adds: where provision registers the instances (kept as tags on the stack).
TARGET_GROUP_LABEL = "target_group_arn"
LB_SECURITY_GROUP_LABEL = "lb_security_group"
ROUTER_LABEL = "router"
SLOT_LABEL = "slot"  # blue or green
SLOTS = ("blue", "green")
# What a listener answers when it forwards nowhere (before the first release, after switch(None)).
NOT_LIVE = {"StatusCode": "503", "ContentType": "text/plain", "MessageBody": "no release in production yet"}

# Target states that count as healthy. The load balancer reports "healthy" once the health
# check on HealthCheckPath passes; moto (5.2) reports "healthy" for every running instance the
# auto scaling group registered, at once, without checking anything.
HEALTHY_TARGET_STATES = frozenset({"healthy"})

# Stable states of a stack that runs the environment (after a failed resize, CloudFormation
# rolls back to the previous, working configuration: UPDATE_ROLLBACK_COMPLETE).
_READY = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE"})

_UPDATING = frozenset({"UPDATE_IN_PROGRESS", "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS"})
# The waiter for each operation (deployline/waiters/cloudformation.json): the blocking calls here and
# stack_readiness.StackSettledTrigger (in the triggerer) wait alike; a rollback fails a create or update at once.
WAITERS_FILE = Path(__file__).resolve().parents[1] / "waiters" / "cloudformation.json"
WAITERS = {"create": "stack_created", "update": "stack_updated", "delete": "stack_deleted", "settle": "stack_settled"}
# Start-and-wait rounds one blocking call may take (replace a failed stack: delete, then create).
MAX_ROUNDS = 10


def role_argument(role_arn: str | None) -> dict[str, str]:
    """``RoleARN`` for CreateStack, UpdateStack and DeleteStack: CloudFormation then acts with that
    service role, not with the caller's credentials. None: no argument, the caller's own rights."""
    return {"RoleARN": role_arn} if role_arn else {}


def describe_stack(cfn, name: str) -> dict | None:
    """The stack called ``name``, or None when it does not exist (or is deleted)."""
    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except ClientError as exc:
        if "does not exist" in str(exc):
            return None
        raise
    if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
        return None
    return stacks[0]


def stack_waiter(cfn, name: str):
    """A waiter of ``waiters/cloudformation.json`` (stack_created, ...) for a plain boto3 client."""
    return create_waiter_with_client(name, _waiter_model(), cfn)


@functools.cache
def _waiter_model() -> WaiterModel:
    return WaiterModel(json.loads(WAITERS_FILE.read_text(encoding="utf-8")))


def failure_reasons(events: list[dict]) -> str:
    """The reasons CloudFormation gives, from a stack's failed events (DescribeStackEvents, newest first)."""
    failed = [
        f"{e['LogicalResourceId']} ({e.get('ResourceType', '?')}) {e['ResourceStatus']}: "
        f"{e.get('ResourceStatusReason', 'no reason given')}"
        for e in events
        if e["ResourceStatus"].endswith("FAILED")
    ]
    return "; ".join(failed[:5])


class CloudFormationDriver(EnvironmentDriver):
    name = "cloudformation"

    # A load balancer and instances take minutes; give CloudFormation up to 30 of them.
    waiter_config = {"Delay": 5, "MaxAttempts": 360}
    poll_interval = 5.0  # seconds between health checks in wait_until_healthy
    # After ModifyListener the load balancer's nodes take a few seconds to route every new
    # request by the new action; switch() returns after this.
    switch_grace = 5.0

    def __init__(
        self,
        cfn_client,
        ssm_client,
        autoscaling_client,
        elbv2_client,
        settings: CloudFormationSettings | None = None,
        template_path: Path | None = None,
        health_path: str = "/health",
        router_template_path: Path | None = None,
        test_ingress_cidr: str = "10.0.0.0/8",
        deregistration_delay: int = 30,
    ):
        self.cfn = cfn_client
        self.ssm = ssm_client
        self.autoscaling = autoscaling_client
        self.elbv2 = elbv2_client
        self.settings = settings or CloudFormationSettings()
        self.template_path = Path(template_path or PROJECT_ROOT / self.settings.template)
        # What the load balancer checks (the pipeline's environments.health_path), fixed at creation.
        self.health_path = health_path
        self.router_template_path = Path(router_template_path or ROUTER_TEMPLATE)
        self.test_ingress_cidr = test_ingress_cidr  # who may use a router's test listener
        self.deregistration_delay = deregistration_delay  # seconds a removed instance finishes requests

    # ------------------------------------------------------------------ interface

    def provision(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        self._complete(lambda: self.start_provision(spec))
        return self._require(spec.name, "create")

    def start_provision(self, spec: EnvironmentSpec) -> StackOperation | None:
        if not spec.image_id:
            raise EnvironmentFailed(f"environment {spec.name}: no image_id (AMI) to run; bake an image first")
        stack = self._describe(spec.name)
        if stack is not None:
            status = stack["StackStatus"]
            if status in _READY:
                return None
            if status == "ROLLBACK_COMPLETE":
                # A stack whose first create failed can only be deleted, not updated.
                return self._start_delete(spec.name)
            elif status == "CREATE_IN_PROGRESS":
                # An earlier try (timed out, or a retry) is creating it: wait for that one.
                return StackOperation(spec.name, "create")
            elif status == "DELETE_IN_PROGRESS":
                return StackOperation(spec.name, "delete")  # replacing a failed one; then create
            elif status == "ROLLBACK_IN_PROGRESS":
                return StackOperation(spec.name, "settle")  # a failed create (a retry): then replace it
            else:
                raise EnvironmentFailed(
                    f"environment {spec.name}: stack {spec.name} is {status}; tear it down and try again"
                )

        target_group = spec.labels.get(TARGET_GROUP_LABEL, "")
        lb_security_group = spec.labels.get(LB_SECURITY_GROUP_LABEL, "")
        if target_group and not lb_security_group:
            raise EnvironmentFailed(
                f"environment {spec.name}: label {TARGET_GROUP_LABEL} without {LB_SECURITY_GROUP_LABEL}; "
                "use green_spec() to place an environment behind a router"
            )
        if spec.size < 1:
            raise EnvironmentFailed(f"environment {spec.name}: size must be at least 1, got {spec.size}")
        network = self._network(spec.name)
        parameters = {
            "ApplicationName": spec.application,
            "Stage": spec.stage,
            "Version": spec.version,
            "ImageId": spec.image_id,
            "DesiredCapacity": str(spec.size),
            "MaxCapacity": str(spec.size + 1),  # room for the rolling update's extra instance
            # Every parameter is passed, defaults too: resize() reuses them all with
            # UsePreviousValue (and moto only remembers the parameters that were passed).
            "InstanceType": self.settings.instance_type,
            "AppPort": str(self.settings.app_port),
            "HealthCheckPath": self.health_path,
            "VpcId": network["vpc-id"],
            "SubnetIds": network["public-subnet-ids"],
            # Empty: the environment's own load balancer; else a router's target group (green_spec).
            "TargetGroupArn": target_group,
            "LoadBalancerSecurityGroupId": lb_security_group,
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
                **self._role(),
            )
        except ClientError as exc:
            # Another try created it between our describe and create: wait for that one.
            if exc.response["Error"]["Code"] != "AlreadyExistsException":
                raise
        return StackOperation(spec.name, "create")

    def wait_until_healthy(self, name: str, health_path: str, timeout: float) -> EnvironmentInfo:
        # The load balancer does the checking, on the HealthCheckPath the stack (or the router
        # whose target group it uses) was created with.
        deadline = time.monotonic() + timeout
        while True:
            info, problem = self._look(name)
            if info is None:
                raise EnvironmentFailed(problem)
            if problem is None:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EnvironmentFailed(
                    f"environment {name} (stack {name}) not healthy after {timeout:g}s "
                    f"(checking {info.details.get('HealthCheckPath', health_path)}): {problem}"
                )
            time.sleep(min(self.poll_interval, remaining))

    def health_problem(self, name: str, health_path: str) -> str | None:
        # One look at what the load balancer found (it checks the path the stack was created with).
        return self._look(name)[1]

    def get(self, name: str) -> EnvironmentInfo | None:
        stack = self._describe(name)
        return None if stack is None else self._info(stack)

    def resize(self, name: str, size: int) -> EnvironmentInfo:
        self._complete(lambda: self.start_resize(name, size))
        return self._require(name, "resize")

    def start_resize(self, name: str, size: int) -> StackOperation | None:
        if size < 1:
            raise EnvironmentFailed(f"environment {name}: size must be at least 1, got {size}")
        stack = self._describe(name)
        if stack is None:
            raise EnvironmentFailed(f"environment {name} does not exist (no stack {name})")
        if stack["StackStatus"] in _UPDATING:
            return StackOperation(name, "update")  # an earlier try's resize
        existing = {p["ParameterKey"] for p in stack.get("Parameters", [])}
        new = {"DesiredCapacity": str(size)}
        if "MaxCapacity" in existing:  # stacks created before MaxCapacity have MaxSize = DesiredCapacity
            new["MaxCapacity"] = str(size + 1)
        if _has_parameters(stack, new):
            return None  # already at that size
        parameters = _parameters(existing, new)
        try:
            self.cfn.update_stack(StackName=name, UsePreviousTemplate=True, Parameters=parameters, **self._role())
        except ClientError as exc:
            if "No updates are to be performed" in str(exc):
                return None  # already at that size
            raise
        return StackOperation(name, "update")

    def update(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        self._complete(lambda: self.start_update(spec))
        return self._require(spec.name, "update")

    def start_update(self, spec: EnvironmentSpec) -> StackOperation | None:
        if not spec.image_id:
            raise EnvironmentFailed(f"environment {spec.name}: no image_id (AMI) to run; bake an image first")
        if spec.size < 1:
            raise EnvironmentFailed(f"environment {spec.name}: size must be at least 1, got {spec.size}")
        stack = self._describe(spec.name)
        if stack is not None and stack["StackStatus"] in _UPDATING:
            # An earlier try is updating it: let that one finish, then bring it to this spec.
            return StackOperation(spec.name, "update")
        if stack is None or stack["StackStatus"] not in _READY:
            return self.start_provision(spec)  # creates it, or waits for, replaces or refuses it by its status
        if _tags(stack).get(ROUTER_TAG):
            raise EnvironmentFailed(f"{spec.name} is a router stack, not an environment")

        existing = {p["ParameterKey"] for p in stack.get("Parameters", [])}
        new = {
            "Version": spec.version,
            "ImageId": spec.image_id,
            "DesiredCapacity": str(spec.size),
            "MaxCapacity": str(spec.size + 1),
        }
        tags = {
            **_tags(stack),
            VERSION_TAG: spec.version,
            **{f"{LABEL_TAG_PREFIX}{key}": str(value) for key, value in spec.labels.items()},
        }
        if _has_parameters(stack, new) and tags == _tags(stack):
            return None  # runs this version at this size already (the update done, or a retry's)
        try:
            # The current template: a long-lived stack gets its improvements (such as the rolling
            # UpdatePolicy) with the next release. Parameters the stack does not have yet take
            # their defaults (TargetGroupArn "": it keeps its own load balancer).
            self.cfn.update_stack(
                StackName=spec.name,
                TemplateBody=self.template_path.read_text(encoding="utf-8"),
                Parameters=_parameters(existing, new),
                Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
                **self._role(),
            )
        except ClientError as exc:
            if "No updates are to be performed" in str(exc):
                return None  # already runs that version at that size
            raise
        # The auto scaling group's UpdatePolicy replaces the instances one by one, each new one
        # in service before an old one stops; CloudFormation rolls back if one does not come up.
        return StackOperation(spec.name, "update")

    def teardown(self, name: str) -> bool:
        if self._describe(name) is None:
            return False
        self._complete(lambda: self.start_teardown(name))
        return True

    def start_teardown(self, name: str) -> StackOperation | None:
        stack = self._describe(name)
        if stack is None:
            return None
        if _tags(stack).get(ROUTER_TAG):
            raise EnvironmentFailed(f"{name} is a router stack, not an environment; use remove_router")
        if stack["StackStatus"] == "DELETE_IN_PROGRESS":
            return StackOperation(name, "delete")
        self._refuse_if_live(stack)
        # Behind a router the stack has no target group of its own: the router's stays.
        return self._start_delete(name)

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

    # ------------------------------------------------------------------ production traffic (blue/green)

    def ensure_router(self, application: str) -> RouterInfo:
        self._complete(lambda: self.start_ensure_router(application))
        return self._require_router(application)

    def start_ensure_router(self, application: str) -> StackOperation | None:
        name = router_name(application)
        stack = self._describe(name)
        if stack is not None:
            status = stack["StackStatus"]
            if status in _READY:
                return None
            if status == "ROLLBACK_COMPLETE":
                return self._start_delete(name)  # its first create failed: it can only be deleted
            elif status == "CREATE_IN_PROGRESS":
                return StackOperation(name, "create")
            elif status == "DELETE_IN_PROGRESS":
                return StackOperation(name, "delete")
            else:
                raise EnvironmentFailed(f"router {name}: stack {name} is {status}; fix or delete it and try again")

        network = self._network(name)
        parameters = {
            "ApplicationName": application,
            "AppPort": str(self.settings.app_port),
            "HealthCheckPath": self.health_path,
            "DeregistrationDelay": str(self.deregistration_delay),
            "TestListenerPort": "8080",
            "TestIngressCidr": self.test_ingress_cidr,
            "VpcId": network["vpc-id"],
            "SubnetIds": network["public-subnet-ids"],
        }
        try:
            self.cfn.create_stack(
                StackName=name,
                TemplateBody=self.router_template_path.read_text(encoding="utf-8"),
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
                Tags=[{"Key": APPLICATION_TAG, "Value": application}, {"Key": ROUTER_TAG, "Value": name}],
                **self._role(),
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "AlreadyExistsException":
                raise
        return StackOperation(name, "create")

    def router(self, application: str) -> RouterInfo | None:
        stack = self._describe(router_name(application))
        if stack is None or stack["StackStatus"] not in _READY:
            return None  # missing, being created, or failed: ensure_router deals with it
        return self._router_info(stack)

    def green_spec(self, router: RouterInfo, spec: EnvironmentSpec) -> EnvironmentSpec:
        slots = {slot: router.details[f"{slot.capitalize()}TargetGroupArn"] for slot in SLOTS}
        current = self._describe(spec.name)
        placed = _parameter(current, "TargetGroupArn") if current else ""
        if placed in slots.values():
            target_group = placed  # a retry: the stack is where an earlier try put it (maybe live by now)
        else:
            live = router.details.get("LiveTargetGroupArn")
            target_group = slots["green"] if live == slots["blue"] else slots["blue"]
            others = [
                info.name
                for info in self.list(spec.application)
                if info.name != spec.name and info.details.get("TargetGroupArn") == target_group
            ]
            if others:
                raise EnvironmentFailed(
                    f"environment {spec.name}: the idle target group of router {router.name} ({target_group}) "
                    f"still has environment(s) {', '.join(sorted(others))}; tear them down first"
                )
        slot = next(s for s, arn in slots.items() if arn == target_group)
        return dataclasses.replace(
            spec,
            labels={
                **spec.labels,
                ROUTER_LABEL: router.name,
                SLOT_LABEL: slot,
                TARGET_GROUP_LABEL: target_group,
                LB_SECURITY_GROUP_LABEL: router.details["LoadBalancerSecurityGroupId"],
            },
        )

    def test_endpoint(self, router: RouterInfo, name: str) -> str:
        target_group = self._router_target_group(router, name)
        self.elbv2.modify_listener(
            ListenerArn=router.details["TestListenerArn"],
            DefaultActions=[{"Type": "forward", "TargetGroupArn": target_group}],
        )
        return router.details["TestUrl"]

    def switch(self, application: str, name: str | None) -> RouterInfo:
        router = self._require_router(application)
        if name is None:
            action = {"Type": "fixed-response", "FixedResponseConfig": NOT_LIVE}
        else:
            action = {"Type": "forward", "TargetGroupArn": self._router_target_group(router, name)}
        # In-flight requests complete on the targets that received them: the old target group
        # keeps its instances (until their stack is torn down, which waits for the deregistration
        # delay before it stops an instance).
        self.elbv2.modify_listener(ListenerArn=router.details["ProductionListenerArn"], DefaultActions=[action])
        time.sleep(self.switch_grace)
        switched = self._require_router(application)
        if switched.live != name:
            raise EnvironmentFailed(
                f"router {router.name}: production listener forwards to {switched.live or 'nothing'} "
                f"after switching to {name or 'nothing'}"
            )
        return switched

    def remove_router(self, application: str) -> bool:
        # Environments still registered in its target groups stay (their instances keep running,
        # unreachable); tear them down with teardown().
        name = router_name(application)
        if self._describe(name) is None:
            return False
        self._delete(name)
        return True

    def _require_router(self, application: str) -> RouterInfo:
        router = self.router(application)
        if router is None:
            raise EnvironmentFailed(
                f"application {application} has no router (stack {router_name(application)}); ensure_router first"
            )
        return router

    def _router_target_group(self, router: RouterInfo, name: str) -> str:
        """The target group of ``router`` that environment ``name`` registers in."""
        info = self.get(name)
        if info is None:
            raise EnvironmentFailed(f"environment {name} does not exist (no stack {name})")
        target_group = info.details.get("TargetGroupArn")
        slots = (router.details["BlueTargetGroupArn"], router.details["GreenTargetGroupArn"])
        if target_group not in slots:
            raise EnvironmentFailed(
                f"environment {name} is not behind router {router.name} (its target group: {target_group}); "
                "provision it from green_spec()"
            )
        return target_group

    def _refuse_if_live(self, stack: dict) -> None:
        """Never remove the environment that takes production traffic: switch first."""
        target_group = _parameter(stack, "TargetGroupArn")
        if not target_group:
            return  # its own load balancer: no router sends it anything
        router = self.router(_tags(stack).get(APPLICATION_TAG, ""))
        if router is not None and router.details.get("LiveTargetGroupArn") == target_group:
            raise EnvironmentFailed(
                f"environment {stack['StackName']} takes the production traffic of router {router.name}; "
                "switch production elsewhere (or to nothing) before tearing it down"
            )

    def _router_info(self, stack: dict) -> RouterInfo:
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        tags = _tags(stack)
        application = tags.get(APPLICATION_TAG, "")
        production = outputs["ProductionListenerArn"]
        test = outputs["TestListenerArn"]
        listeners = {
            listener["ListenerArn"]: listener
            for listener in self.elbv2.describe_listeners(ListenerArns=[production, test])["Listeners"]
        }
        live_group = _forwards_to(listeners[production])
        tested_group = _forwards_to(listeners[test])
        slot_of = {outputs["BlueTargetGroupArn"]: "blue", outputs["GreenTargetGroupArn"]: "green"}
        # Newest first: with green_spec's check one environment at most uses a target group.
        environments = sorted(self.list(application), key=lambda i: i.created_at, reverse=True)
        by_group: dict[str, list[str]] = {}
        for info in environments:
            by_group.setdefault(info.details.get("TargetGroupArn", ""), []).append(info.name)
        live = by_group.get(live_group, [None])[0] if live_group else None
        return RouterInfo(
            application=application,
            name=stack["StackName"],
            endpoint=outputs["Url"],
            live=live,
            driver=self.name,
            details={
                **outputs,
                "LiveTargetGroupArn": live_group,
                "LiveSlot": slot_of.get(live_group),
                "TestTargetGroupArn": tested_group,
                "UnderTest": by_group.get(tested_group, [None])[0] if tested_group else None,
                "StackId": stack["StackId"],
                "StackStatus": stack["StackStatus"],
            },
        )

    # ------------------------------------------------------------------ helpers

    def _look(self, name: str) -> tuple[EnvironmentInfo | None, str | None]:
        """The environment and what keeps it from being healthy (None: healthy)."""
        info = self.get(name)
        if info is None:
            return None, f"environment {name} does not exist (no stack {name})"
        return info, self._health_problem(info)

    def _describe(self, name: str) -> dict | None:
        return describe_stack(self.cfn, name)

    def _role(self) -> dict[str, str]:
        # On every create, update and delete, not only the create: AWS keeps a stack's role, but moto
        # (5.2) forgets it on an update without one, and a changed setting counts from the next call.
        return role_argument(self.settings.service_role_arn)

    def _delete(self, name: str) -> None:
        self._start_delete(name)
        self._wait(name, WAITERS["delete"], "delete")

    def _start_delete(self, name: str) -> StackOperation:
        self.cfn.delete_stack(StackName=name, **self._role())
        return StackOperation(name, "delete")

    def _complete(self, start) -> None:
        """Blocking: ``start()`` and wait for what it started, until it has nothing left to wait for."""
        for _ in range(MAX_ROUNDS):
            pending = start()
            if pending is None:
                return
            self._wait(pending.stack, WAITERS[pending.operation], pending.operation)
        raise EnvironmentFailed(f"stack {pending.stack}: still not done after {MAX_ROUNDS} operations")

    def wait_for(self, operation: StackOperation) -> None:
        self._wait(operation.stack, WAITERS[operation.operation], operation.operation)

    def _require(self, name: str, action: str) -> EnvironmentInfo:
        stack = self._describe(name)
        if stack is None:
            raise EnvironmentFailed(f"environment {name}: stack {name} disappeared during {action}")
        return self._info(stack)

    def _wait(self, name: str, waiter: str, action: str) -> None:
        try:
            stack_waiter(self.cfn, waiter).wait(StackName=name, WaiterConfig=self.waiter_config)
        except WaiterError as exc:
            raise EnvironmentFailed(
                f"environment {name}: {action} of stack {name} failed: {self._failure_reasons(name) or exc}"
            ) from exc

    def _failure_reasons(self, name: str) -> str:
        try:
            return failure_reasons(self.cfn.describe_stack_events(StackName=name)["StackEvents"])
        except ClientError:
            return ""

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


def router_name(application: str) -> str:
    """The router stack of ``application``: safe for CloudFormation, never an environment's name
    (those end with a hash, see environment_name)."""
    base = re.sub(r"[^a-z0-9-]+", "-", application.lower().replace("_", "-")).strip("-")
    return f"dl-{base[:100]}-router"


def _parameters(existing: set[str], new: dict[str, str]) -> list[dict]:
    """``new`` values; every other parameter the stack has keeps its value."""
    return [{"ParameterKey": k, "UsePreviousValue": True} for k in sorted(existing - set(new))] + [
        {"ParameterKey": k, "ParameterValue": v} for k, v in new.items()
    ]


def _has_parameters(stack: dict, wanted: dict[str, str]) -> bool:
    return all(_parameter(stack, key) == value for key, value in wanted.items())


def _parameter(stack: dict, key: str) -> str:
    return next((p.get("ParameterValue", "") for p in stack.get("Parameters", []) if p["ParameterKey"] == key), "")


def _forwards_to(listener: dict) -> str | None:
    """The one target group a listener's default action forwards to, None for a fixed response."""
    for action in listener.get("DefaultActions", []):
        if action["Type"] != "forward":
            continue
        if action.get("TargetGroupArn"):
            return action["TargetGroupArn"]
        groups = [g["TargetGroupArn"] for g in action.get("ForwardConfig", {}).get("TargetGroups", [])]
        return groups[0] if len(groups) == 1 else None
    return None
