"""Stage 0, support infrastructure: the shared AWS resources every pipeline uses, one
CloudFormation stack per component, launched and destroyed with one call.

==================  ===============================  ==========================================
component           template (include/cloudformation)  SSM parameters (under ``ssm_prefix``)
==================  ===============================  ==========================================
``network``         ``network.yaml``                 ``network/vpc-id``, ``network/vpc-cidr``,
                                                     ``network/public-subnet-ids``,
                                                     ``network/private-subnet-ids``
``artifact_store``  ``artifact-store.yaml``          ``artifact-store/bucket``,
                                                     ``artifact-store/bucket-arn``
``notifications``   ``notifications.yaml``           ``notifications/topic-arn``
``ci_environment``  ``ci-environment.yaml``          ``ci/instance-id``, ``ci/url``,
                                                     ``ci/private-url``, ``ci/security-group-id``
==================  ===============================  ==========================================

The settings come from ``include/infrastructure.yaml`` (:func:`load_infrastructure_config`).
With ``service_role_arn`` every create, update and delete passes that CloudFormation service role
(``RoleARN``), and CloudFormation makes the resources with its permissions, not the caller's.
:func:`launch` creates a missing stack, updates an existing one with the current template and
parameters (``unchanged`` when CloudFormation has nothing to do), and publishes the stack's
outputs as SSM String parameters, writing only those whose value changed: launching twice
changes nothing. The environment driver (``environments/cloudformation.py``) reads the
network from ``<ssm_prefix>/network/vpc-id`` and ``.../public-subnet-ids``.

:func:`destroy` deletes the stacks in reverse dependency order, and their SSM parameters. It
refuses to delete the artifact store while its bucket holds release records (objects under
``*/releases/``) unless forced; when the delete goes ahead, the bucket is emptied first (every
object version and delete marker: versioning is on), since CloudFormation only deletes an
empty bucket.

Used by an Airflow DAG (:func:`clients_from_airflow`) and, for the very first bootstrap, by
``python -m deployline infra up|down|status`` (:mod:`deployline.infra_cli`,
:func:`clients_from_boto3`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from botocore.exceptions import ClientError
from pydantic import AfterValidator, Field, ValidationError, model_validator

from deployline.config import PROJECT_ROOT, PipelineConfigError, ServiceRoleArn, _Strict, expand_vars
from deployline.config import _describe as _describe_error
from deployline.environments.base import StackOperation
from deployline.environments.cloudformation import describe_stack, failure_reasons, role_argument
from deployline.infrastructure_components import COMPONENTS

DEPENDENCIES: dict[str, tuple[str, ...]] = {"ci_environment": ("network",)}

CONFIG_ENV = "DEPLOYLINE_INFRASTRUCTURE_CONFIG"
DEFAULT_CONFIG = PROJECT_ROOT / "include" / "infrastructure.yaml"

COMPONENT_TAG = "deployline:component"
INFRASTRUCTURE_TAG = "deployline:infrastructure"  # the stack prefix: which set of support stacks

# Seconds between looks at a stack in progress, and how long to wait for one (a NAT gateway or
# an instance takes minutes; CloudFormation itself gives up on most resources within an hour).
POLL_INTERVAL = 5.0
WAIT_TIMEOUT = 3600.0

Action = Literal["created", "updated", "unchanged", "deleted", "absent"]

_READY = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE",
                    "IMPORT_ROLLBACK_COMPLETE"})
_REGION = r"^[a-z]{2}(-[a-z]+)+-\d$"
_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
_AMI = r"^(ami-[0-9a-f]{8,17}|resolve:ssm:/\S+)$"


class InfrastructureError(RuntimeError):
    """Launch, destroy or status could not do what was asked; the message says why and what to do.
    ``done``: the components launch or destroy had finished before (their results)."""

    def __init__(self, message: str, done: list[ComponentResult] | None = None):
        super().__init__(message)
        self.done = list(done or [])


class DestroyRefused(InfrastructureError):
    """A destroy that would lose data nobody asked to lose (release records): pass force to go ahead."""


class InfrastructureConfigError(PipelineConfigError):
    """``include/infrastructure.yaml`` is unreadable or invalid; the message names file, field and problem."""


# ---------------------------------------------------------------------------------------- settings


def _cidr(value: str) -> str:
    try:
        ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IPv4 CIDR block: {exc}") from exc
    return value


Cidr = Annotated[str, AfterValidator(_cidr)]


class NetworkSettings(_Strict):
    vpc_cidr: Cidr = "10.40.0.0/16"
    # strict=False: YAML gives a list for the pair.
    public_subnet_cidrs: tuple[Cidr, Cidr] = Field(default=("10.40.0.0/24", "10.40.1.0/24"), strict=False)
    private_subnet_cidrs: tuple[Cidr, Cidr] = Field(default=("10.40.10.0/24", "10.40.11.0/24"), strict=False)
    nat_gateway: bool = Field(
        default=False, description="one NAT gateway for the private subnets (billed by the hour; moto: poorly)")

    @model_validator(mode="after")
    def _subnets_inside(self) -> NetworkSettings:
        vpc = ipaddress.IPv4Network(self.vpc_cidr)
        if not 16 <= vpc.prefixlen <= 28:
            raise ValueError(f"vpc_cidr: a VPC is /16 to /28 (got {self.vpc_cidr!r})")
        subnets = [*self.public_subnet_cidrs, *self.private_subnet_cidrs]
        for cidr in subnets:
            if not ipaddress.IPv4Network(cidr).subnet_of(vpc):
                raise ValueError(f"subnet {cidr} is not inside vpc_cidr {self.vpc_cidr}")
        for i, one in enumerate(subnets):
            for other in subnets[i + 1:]:
                if ipaddress.IPv4Network(one).overlaps(ipaddress.IPv4Network(other)):
                    raise ValueError(f"subnets {one} and {other} overlap")
        return self


class ArtifactStoreSettings(_Strict):
    bucket: str = Field(default="deployline-artifacts", pattern=_BUCKET,
                        description="the pipelines' aws.artifact_bucket")
    noncurrent_version_days: Annotated[int, Field(ge=1, le=3650)] = 90


class NotificationSettings(_Strict):
    topic_name: str = Field(default="deployline-notifications", pattern=r"^[A-Za-z0-9_-]{1,256}$")


class CiSettings(_Strict):
    instance_type: str = Field(default="t3.medium", pattern=r"^[a-z0-9-]+\.[a-z0-9]+$")
    image_id: str = Field(
        default="resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        pattern=_AMI,
        description="an Amazon Linux 2023 AMI id, or resolve:ssm:<parameter> naming one (resolved at each "
        "launch: a newer AMI replaces the instance; pin an id to keep it)",
    )
    root_volume_gb: Annotated[int, Field(ge=16, le=1024)] = 30
    repository_url: str = Field(default="", description="git URL of this project; required to launch it")
    branch: str = Field(default="main", min_length=1)
    compose_file: str = Field(default="docker-compose.yaml", pattern=r"^[A-Za-z0-9._/-]+$",
                              description="relative to the repository root; publishes the UI on ui_port")
    compose_version: str = Field(default="v2.29.7", pattern=r"^v\d+\.\d+\.\d+$",
                                 description="release of the docker compose CLI plugin")
    ui_port: Annotated[int, Field(ge=1, le=65535)] = 8080
    ui_cidr: Cidr = Field(default="10.0.0.0/8", description="who may reach the Airflow UI")

    @model_validator(mode="after")
    def _not_the_world(self) -> CiSettings:
        if ipaddress.IPv4Network(self.ui_cidr).prefixlen == 0:
            raise ValueError(f"ui_cidr: the Airflow UI is never open to the world (got {self.ui_cidr!r})")
        return self


class InfrastructureConfig(_Strict):
    stack_prefix: str = Field(default="deployline", pattern=r"^[A-Za-z][A-Za-z0-9-]{0,60}$",
                              description="stacks are <stack_prefix>-<component>")
    region: str = Field(default="us-east-1", pattern=_REGION)
    conn_id: str = Field(default="aws_default", min_length=1, description="Airflow connection (DAG use)")
    ssm_prefix: str = Field(default="/deployline", pattern=r"^(/[A-Za-z0-9_.-]+)+$")
    template_dir: str = Field(default="include/cloudformation", description="relative to the project, or absolute")
    service_role_arn: ServiceRoleArn = Field(
        default=None,
        description="CloudFormation service role for the support stacks (RoleARN); none: CloudFormation "
        "uses the caller's own credentials",
    )
    network: NetworkSettings = NetworkSettings()
    artifact_store: ArtifactStoreSettings = ArtifactStoreSettings()
    notifications: NotificationSettings = NotificationSettings()
    ci: CiSettings = CiSettings()
    source_file: str = Field(default="", exclude=True)

    def stack_name(self, component: str) -> str:
        return f"{self.stack_prefix}-{component.replace('_', '-')}"

    def template_path(self, component: str) -> Path:
        return Path(PROJECT_ROOT, self.template_dir, _SPECS[component].template)

    def parameter_names(self, component: str) -> dict[str, str]:
        """Output key -> the SSM parameter it is published as."""
        spec = _SPECS[component]
        return {key: f"{self.ssm_prefix}/{spec.ssm_group}/{leaf}" for key, leaf in spec.published.items()}


def _read_yaml(path: Path) -> Any:
    # The same checks and messages as config.load_pipeline_config's reading.
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InfrastructureConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InfrastructureConfigError(
            f"{path}: malformed YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_infrastructure_config(path: str | os.PathLike | None = None, environ=None) -> InfrastructureConfig:
    """``include/infrastructure.yaml`` (or ``$DEPLOYLINE_INFRASTRUCTURE_CONFIG``), with ``${VAR:-default}``
    expanded; errors name the file and the field."""
    path = Path(path) if path else default_config_path()
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InfrastructureConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = InfrastructureConfig.model_validate(expand_vars(raw, "", environ))
    except PipelineConfigError as exc:  # an unset ${VAR} without default
        raise InfrastructureConfigError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        raise InfrastructureConfigError(f"{path}: " + "; ".join(_describe_error(e) for e in exc.errors())) from exc
    return config.model_copy(update={"source_file": str(path)})


# ---------------------------------------------------------------------------------------- components


@dataclasses.dataclass(frozen=True)
class _Component:
    template: str
    ssm_group: str
    published: dict[str, str]  # output key -> SSM parameter leaf name
    capabilities: tuple[str, ...] = ()


_SPECS = {
    "network": _Component("network.yaml", "network", {
        "VpcId": "vpc-id", "VpcCidr": "vpc-cidr",
        "PublicSubnetIds": "public-subnet-ids", "PrivateSubnetIds": "private-subnet-ids",
    }),
    "artifact_store": _Component("artifact-store.yaml", "artifact-store", {
        "BucketName": "bucket", "BucketArn": "bucket-arn",
    }),
    "notifications": _Component("notifications.yaml", "notifications", {"TopicArn": "topic-arn"}),
    "ci_environment": _Component("ci-environment.yaml", "ci", {
        "InstanceId": "instance-id", "Url": "url", "PrivateUrl": "private-url", "SecurityGroupId": "security-group-id",
    }, capabilities=("CAPABILITY_IAM",)),
}


@dataclasses.dataclass(frozen=True)
class Clients:
    cfn: Any
    ssm: Any
    s3: Any


def clients_from_airflow(config: InfrastructureConfig) -> Clients:
    """Clients through the amazon provider's hooks and the config's Airflow connection (for DAGs)."""
    from airflow.providers.amazon.aws.hooks.cloud_formation import CloudFormationHook
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.providers.amazon.aws.hooks.ssm import SsmHook

    args = {"aws_conn_id": config.conn_id, "region_name": config.region}
    return Clients(cfn=CloudFormationHook(**args).get_conn(), ssm=SsmHook(**args).conn, s3=S3Hook(**args).get_conn())


def clients_from_boto3(region: str, endpoint_url: str | None = None) -> Clients:
    """Plain boto3 clients (the command line, before any Airflow exists); ``endpoint_url`` (or
    ``$AWS_ENDPOINT_URL``, which boto3 reads itself) points them at moto server."""
    import boto3

    session = boto3.session.Session(region_name=region)
    names = ("cloudformation", "ssm", "s3")
    return Clients(*(session.client(name, endpoint_url=endpoint_url or None) for name in names))


@dataclasses.dataclass
class ComponentResult:
    component: str
    stack: str
    action: Action
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    # SSM parameters this call wrote (launch) or deleted (destroy); empty when nothing changed.
    parameters: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what else happened, for people

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        outputs = " ".join(f"{k}={v}" for k, v in self.outputs.items())
        ssm = f"ssm: {len(self.parameters)} {'deleted' if self.action == 'deleted' else 'written'}" \
            if self.parameters else "ssm: unchanged" if self.action not in ("deleted", "absent") else ""
        extra = "; ".join(part for part in (ssm, *self.notes) if part)
        return f"{self.action:9} {self.component:15} {self.stack:28} {outputs}" + (f"  ({extra})" if extra else "")


@dataclasses.dataclass
class ComponentStatus:
    component: str
    stack: str
    status: str  # the stack's status, or "absent"
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    parameters: dict[str, str | None] = dataclasses.field(default_factory=dict)  # published value, None: missing
    stale: list[str] = dataclasses.field(default_factory=list)  # parameters that differ from the outputs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        outputs = " ".join(f"{k}={v}" for k, v in self.outputs.items())
        stale = f"  (ssm out of date: {', '.join(self.stale)}; run infra up)" if self.stale else ""
        return f"{self.status:24} {self.component:15} {self.stack:28} {outputs}{stale}"


def resolve_components(components: str | Iterable[str]) -> list[str]:
    """``"all"``, one name or several (``artifact-store`` = ``artifact_store``), in dependency order."""
    if isinstance(components, str):
        components = [components]
    wanted = []
    for name in components:
        name = name.strip().replace("-", "_")
        if name == "all":
            wanted.extend(COMPONENTS)
        elif name in COMPONENTS:
            wanted.append(name)
        else:
            raise ValueError(f"unknown component {name!r}; valid: {', '.join(COMPONENTS)} or 'all'")
    if not wanted:
        raise ValueError(f"no component given; valid: {', '.join(COMPONENTS)} or 'all'")
    return [c for c in _dependency_order() if c in wanted]


def _dependency_order() -> list[str]:
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"dependency cycle: {' -> '.join((*path, name))}")
        if name not in ordered:
            for needed in DEPENDENCIES.get(name, ()):
                visit(needed, (*path, name))
            ordered.append(name)

    for component in COMPONENTS:
        visit(component, ())
    return ordered


# ---------------------------------------------------------------------------------------- launch


def launch(clients: Clients, config: InfrastructureConfig, components: str | Iterable[str] = "all") -> list[
        ComponentResult]:
    """Create or update the components' stacks (dependencies first) and publish their outputs in SSM."""
    return _run(clients, launch_step, config, components)


def new_state() -> dict:
    """Where a launch or destroy is (JSON: a deferred task carries it from one wait to the next)."""
    return {"started": False, "done": [], "current": None}


def results(state: dict) -> list[ComponentResult]:
    return [ComponentResult(**done) for done in state["done"]]


def _run(clients: Clients, step, config: InfrastructureConfig, components, **options) -> list[ComponentResult]:
    """Blocking: ``step`` until it is done, waiting here for each stack it starts."""
    state = new_state()
    try:
        while (pending := step(clients, config, components, state, **options)) is not None:
            _settle(clients, pending.stack)
    except InfrastructureError as exc:
        exc.done = results(state)  # what was finished before it failed
        raise
    return results(state)


def launch_step(clients: Clients, config: InfrastructureConfig, components: str | Iterable[str], state: dict) -> (
        StackOperation | None):
    """One step of :func:`launch`: finish what the last step started, start the next stack operation and return
    it (what to wait for before the next step), or None when every component is done. ``state``: new_state(),
    then as the previous step left it. Raises InfrastructureError (``state["done"]``: the finished ones)."""
    names = resolve_components(components)
    if not state["started"]:
        for name in names:  # what the config must say, before anything changes
            if name == "ci_environment" and not config.ci.repository_url.strip():
                where = config.source_file or "the infrastructure config"
                raise InfrastructureError(
                    f"ci_environment: ci.repository_url is empty in {where}; "
                    "set it (or DEPLOYLINE_CI_REPOSITORY_URL) to the git URL of this project")
        state["started"] = True
    finished = {done["component"] for done in state["done"]}
    for name in (n for n in names if n not in finished):
        current = state["current"] or {"component": name, "then": "start", "notes": []}
        state["current"] = current
        if current["then"] in ("created", "updated"):  # the create or update we waited for has ended
            stack = _expect(clients, config.stack_name(name), _ENDS[current["then"]],
                            f"{name}: {current['then'][:-1]} of stack {config.stack_name(name)}")
            result = _finish_launch(clients, config, name, current["then"], stack, current["notes"])
        else:
            pending = _begin_launch(clients, config, name, current)
            if isinstance(pending, StackOperation):
                return pending
            result = pending
        state["done"].append(result.to_dict())
        state["current"] = None
    return None


_ENDS = {"created": "CREATE_COMPLETE", "updated": "UPDATE_COMPLETE"}


def _stack_parameters(clients: Clients, config: InfrastructureConfig, component: str) -> dict[str, str]:
    # Every parameter is passed, defaults too: an update then compares like with like.
    if component == "network":
        net = config.network
        return {
            "VpcCidr": net.vpc_cidr,
            "PublicSubnetACidr": net.public_subnet_cidrs[0],
            "PublicSubnetBCidr": net.public_subnet_cidrs[1],
            "PrivateSubnetACidr": net.private_subnet_cidrs[0],
            "PrivateSubnetBCidr": net.private_subnet_cidrs[1],
            "EnableNatGateway": "true" if net.nat_gateway else "false",
        }
    if component == "artifact_store":
        store = config.artifact_store
        return {"BucketName": store.bucket, "NoncurrentVersionDays": str(store.noncurrent_version_days)}
    if component == "notifications":
        return {"TopicName": config.notifications.topic_name}
    if component == "ci_environment":
        ci = config.ci
        network = _network_outputs(clients, config)
        return {
            "VpcId": network["VpcId"],
            "SubnetId": network["PublicSubnetIds"].split(",")[0].strip(),
            "ImageId": _image_id(clients, ci.image_id),
            "InstanceType": ci.instance_type,
            "RootVolumeSize": str(ci.root_volume_gb),
            "UiPort": str(ci.ui_port),
            "UiIngressCidr": ci.ui_cidr,
            "RepositoryUrl": ci.repository_url.strip(),
            "RepositoryBranch": ci.branch,
            "ComposeFile": ci.compose_file,
            "ComposeVersion": ci.compose_version,
        }
    raise ValueError(f"unknown component {component!r}")


def _network_outputs(clients: Clients, config: InfrastructureConfig) -> dict[str, str]:
    name = config.stack_name("network")
    stack = _describe(clients, name)
    if stack is None or stack["StackStatus"] not in _READY:
        state = "does not exist" if stack is None else f"is {stack['StackStatus']}"
        raise InfrastructureError(
            f"ci_environment needs network: stack {name} {state}; launch network first "
            "(python -m deployline infra up network, or both at once)")
    outputs = _outputs(stack)
    if not outputs.get("VpcId") or not outputs.get("PublicSubnetIds"):
        raise InfrastructureError(f"ci_environment needs network: stack {name} has no VpcId/PublicSubnetIds outputs")
    return outputs


def _image_id(clients: Clients, image: str) -> str:
    if not image.startswith("resolve:ssm:"):
        return image
    name = image.removeprefix("resolve:ssm:")
    try:
        return clients.ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as exc:
        raise InfrastructureError(f"ci_environment: ci.image_id: cannot resolve SSM parameter {name}: {exc}") from exc


def _begin_launch(clients: Clients, config: InfrastructureConfig, component: str, current: dict) -> (
        StackOperation | ComponentResult):
    """Start what the component's stack needs (``current["then"]``: what it will have been) and return the
    operation to wait for, or the component's result when nothing is to be done."""
    name = config.stack_name(component)
    stack = _describe(clients, name)
    status = stack["StackStatus"] if stack else None
    if stack is not None and _in_progress(status):
        current["then"] = "start"  # someone else's operation: look again once it has ended
        return StackOperation(name, "settle")
    if status == "ROLLBACK_COMPLETE":
        # Its first create failed: such a stack can only be deleted, then created afresh.
        current["notes"].append("replaced a stack whose first create had failed (ROLLBACK_COMPLETE)")
        try:
            clients.cfn.delete_stack(StackName=name, **role_argument(config.service_role_arn))
        except ClientError as exc:
            raise InfrastructureError(f"delete of stack {name} failed: {_message(exc)}") from exc
        current["then"], current["replacing"] = "start", True
        return StackOperation(name, "delete")
    if current.get("replacing") and stack is not None:  # the replacement's delete has ended, not deleted
        reasons = _failure_reasons(clients, name)
        raise InfrastructureError(f"delete of stack {name} ended {status}" + (f": {reasons}" if reasons else ""))

    request = _stack_request(clients, config, component)
    if stack is None:
        try:
            clients.cfn.create_stack(**request)
        except ClientError as exc:
            raise InfrastructureError(f"{component}: create of stack {name} failed: {_message(exc)}") from exc
        current["then"] = "created"
        return StackOperation(name, "create")
    if status in _READY and _as_deployed(clients, stack, request):
        return _finish_launch(clients, config, component, "unchanged", stack, current["notes"])
    if status in _READY:
        try:
            clients.cfn.update_stack(**request)
        except ClientError as exc:
            if "No updates are to be performed" not in str(exc):
                raise InfrastructureError(f"{component}: update of stack {name} failed: {_message(exc)}") from exc
            return _finish_launch(clients, config, component, "unchanged", stack, current["notes"])
        current["then"] = "updated"
        return StackOperation(name, "update")
    raise InfrastructureError(
        f"{component}: stack {name} is {status}; it cannot be updated from there: fix or delete it "
        "in the CloudFormation console and launch again")


def _stack_request(clients: Clients, config: InfrastructureConfig, component: str) -> dict:
    name = config.stack_name(component)
    try:
        template = config.template_path(component).read_text(encoding="utf-8")
    except OSError as exc:
        raise InfrastructureError(f"{component}: cannot read template {config.template_path(component)} "
                                  f"(template_dir {config.template_dir!r}): {exc.strerror}") from exc
    parameters = _stack_parameters(clients, config, component)
    return {
        "StackName": name,
        "TemplateBody": template,
        "Parameters": [{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        "Tags": [{"Key": COMPONENT_TAG, "Value": component}, {"Key": INFRASTRUCTURE_TAG, "Value": config.stack_prefix}],
        "Capabilities": list(_SPECS[component].capabilities),
        **role_argument(config.service_role_arn),
    }


def _finish_launch(clients: Clients, config: InfrastructureConfig, component: str, action: Action, stack: dict,
                   notes: list[str]) -> ComponentResult:
    outputs = _outputs(stack)
    written, publish_notes = _publish(clients, config, component, config.stack_name(component), outputs)
    return ComponentResult(component, config.stack_name(component), action, outputs, written,
                           list(notes) + publish_notes)


def _as_deployed(clients: Clients, stack: dict, request: dict) -> bool:
    """Whether the stack already has the template, parameters and tags of ``request``.

    CloudFormation answers such an update with "No updates are to be performed" anyway; asking
    first saves the call, and moto (5.2) compares Number parameters as numbers with the strings
    it is sent, so without this it would update every stack with a Number parameter every time.
    """
    deployed = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
    if deployed != {p["ParameterKey"]: p["ParameterValue"] for p in request["Parameters"]}:
        return False
    if {t["Key"]: t["Value"] for t in stack.get("Tags", [])} != {t["Key"]: t["Value"] for t in request["Tags"]}:
        return False
    try:
        body = clients.cfn.get_template(StackName=request["StackName"], TemplateStage="Original")["TemplateBody"]
    except ClientError:
        return False
    return isinstance(body, str) and body == request["TemplateBody"]


def _publish(clients: Clients, config: InfrastructureConfig, component: str, stack: str,
             outputs: dict[str, str]) -> tuple[list[str], list[str]]:
    """Write the outputs' SSM parameters whose value differs; return the names written, and notes."""
    wanted, notes = {}, []
    for key, parameter in config.parameter_names(component).items():
        value = outputs.get(key)
        if not value:
            notes.append(f"no output {key}: {parameter} not published")
        elif "${" in value:
            # Real CloudFormation resolves every ${...} of a !Sub; moto leaves the ones whose
            # attribute it does not know (an instance's PublicDnsName, for one).
            notes.append(f"output {key} unresolved ({value}): {parameter} not published")
        else:
            wanted[parameter] = value
    current = _get_parameters(clients, list(wanted))
    written = []
    for parameter, value in wanted.items():
        if current.get(parameter) == ("String", value):
            continue
        clients.ssm.put_parameter(
            Name=parameter, Value=value, Type="String", Overwrite=True,
            Description=f"Deployline support infrastructure: {component}, stack {stack}"[:1024],
        )
        written.append(parameter)
    return written, notes


def _get_parameters(clients: Clients, names: list[str]) -> dict[str, tuple[str, str]]:
    found = {}
    for i in range(0, len(names), 10):  # GetParameters takes ten names at most
        response = clients.ssm.get_parameters(Names=names[i:i + 10])
        found.update({p["Name"]: (p["Type"], p["Value"]) for p in response["Parameters"]})
    return found


# ---------------------------------------------------------------------------------------- destroy


def destroy(clients: Clients, config: InfrastructureConfig, components: str | Iterable[str] = "all",
            force: bool = False) -> list[ComponentResult]:
    """Delete the components' stacks (dependents first) and their SSM parameters.

    Nothing is deleted when any check fails: the artifact store's bucket holds release
    records (unless ``force``), or the network would go while the CI environment stays in it.
    """
    return _run(clients, destroy_step, config, components, force=force)


def destroy_step(clients: Clients, config: InfrastructureConfig, components: str | Iterable[str], state: dict,
                 force: bool = False) -> StackOperation | None:
    """One step of :func:`destroy`, as :func:`launch_step` is of launch: the checks once every stack has
    settled, then one delete after the other."""
    names = list(reversed(resolve_components(components)))
    if not state["started"]:
        for name in names:
            stack = _describe(clients, config.stack_name(name))
            if stack is not None and _in_progress(stack["StackStatus"]):
                return StackOperation(config.stack_name(name), "settle")
        _check_destroy(clients, config, names, force)
        state["started"] = True
    finished = {done["component"] for done in state["done"]}
    for name in (n for n in names if n not in finished):
        stack_name = config.stack_name(name)
        current = state["current"]
        if current is None:
            stack = _describe(clients, stack_name)
            if stack is not None and _in_progress(stack["StackStatus"]):
                return StackOperation(stack_name, "settle")
            if stack is None:  # its SSM parameters, if any, are not ours to remove
                state["done"].append(ComponentResult(name, stack_name, "absent").to_dict())
                continue
            current = state["current"] = {"component": name, "outputs": _outputs(stack), "notes": []}
            if name == "artifact_store":
                bucket = current["outputs"].get("BucketName") or config.artifact_store.bucket
                removed = _empty_bucket(clients, bucket)
                current["notes"].append(
                    f"emptied bucket {bucket}: {removed} object version(s) and delete marker(s) removed")
            try:
                clients.cfn.delete_stack(StackName=stack_name, **role_argument(config.service_role_arn))
            except ClientError as exc:
                raise InfrastructureError(f"{name}: delete of stack {stack_name} failed: {_message(exc)}") from exc
            return StackOperation(stack_name, "delete")
        stack = _describe(clients, stack_name)  # the delete we waited for has ended
        if stack is not None:
            reasons = _failure_reasons(clients, stack_name)
            raise InfrastructureError(f"{name}: delete of stack {stack_name} ended {stack['StackStatus']}"
                                      + (f": {reasons}" if reasons else ""))
        deleted = _delete_parameters(clients, list(config.parameter_names(name).values()))
        state["done"].append(ComponentResult(name, stack_name, "deleted", current["outputs"], deleted,
                                             current["notes"]).to_dict())
        state["current"] = None
    return None


def _check_destroy(clients: Clients, config: InfrastructureConfig, names: list[str], force: bool) -> None:
    for name in names:
        dependents = [d for d, needs in DEPENDENCIES.items() if name in needs and d not in names]
        for dependent in dependents:
            if _describe(clients, config.stack_name(dependent)) is not None:
                raise DestroyRefused(
                    f"{name}: {dependent} (stack {config.stack_name(dependent)}) still runs in it; "
                    f"destroy {dependent} first, or both together")
    store = _describe(clients, config.stack_name("artifact_store")) if "artifact_store" in names else None
    if store is not None:
        bucket = _outputs(store).get("BucketName") or config.artifact_store.bucket
        releases, example = _count_releases(clients, bucket)
        if releases and not force:
            raise DestroyRefused(
                f"artifact_store: bucket {bucket} holds {releases} release record(s) (objects under "
                f"*/releases/, e.g. {example}): the pipelines' release registry. Nothing was destroyed; "
                "pass --force (force=True) to delete them with the bucket")


def _count_releases(clients: Clients, bucket: str) -> tuple[int, str | None]:
    """Current objects under ``<anything>/releases/`` in the bucket (0 when it is gone)."""
    count, example = 0, None
    try:
        for page in clients.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                head, sep, tail = item["Key"].partition("/releases/")
                if sep and head and tail:
                    count += 1
                    example = example or f"s3://{bucket}/{item['Key']}"
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchBucket", "404"):
            return 0, None
        raise
    return count, example


def _empty_bucket(clients: Clients, bucket: str) -> int:
    """Delete every object version and delete marker; the number removed."""
    removed = 0
    for _ in range(10):  # again, for what was written meanwhile
        batch = []
        try:
            for page in clients.s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
                for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                    batch.append({"Key": item["Key"], "VersionId": item["VersionId"]})
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchBucket", "404"):
                return removed
            raise
        if not batch:
            return removed
        for i in range(0, len(batch), 1000):  # DeleteObjects takes a thousand at most
            response = clients.s3.delete_objects(Bucket=bucket, Delete={"Objects": batch[i:i + 1000], "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise InfrastructureError(
                    f"artifact_store: cannot empty bucket {bucket}: {len(response['Errors'])} object(s) not deleted, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}")
            removed += len(batch[i:i + 1000])
    raise InfrastructureError(f"artifact_store: bucket {bucket} keeps receiving objects; stop the writers first")


def _delete_parameters(clients: Clients, names: list[str]) -> list[str]:
    deleted = []
    for i in range(0, len(names), 10):  # DeleteParameters takes ten names at most
        deleted += clients.ssm.delete_parameters(Names=names[i:i + 10]).get("DeletedParameters", [])
    return sorted(deleted, key=names.index)


# ---------------------------------------------------------------------------------------- status


def status(clients: Clients, config: InfrastructureConfig, components: str | Iterable[str] = "all") -> list[
        ComponentStatus]:
    """Each component's stack status, outputs and published SSM parameters (changes nothing)."""
    found = []
    for name in resolve_components(components):
        stack_name = config.stack_name(name)
        stack = _describe(clients, stack_name)
        names = config.parameter_names(name)
        current = _get_parameters(clients, list(names.values()))
        parameters = {p: current[p][1] if p in current else None for p in names.values()}
        if stack is None:
            found.append(ComponentStatus(name, stack_name, "absent", parameters=parameters))
            continue
        outputs = _outputs(stack)
        stale = [p for key, p in names.items()
                 if outputs.get(key) and "${" not in outputs[key] and parameters[p] != outputs[key]]
        found.append(ComponentStatus(name, stack_name, stack["StackStatus"], outputs, parameters, stale))
    return found


# ---------------------------------------------------------------------------------------- stacks


def _describe(clients: Clients, name: str) -> dict | None:
    return describe_stack(clients.cfn, name)


def _outputs(stack: dict) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", []) if o.get("OutputValue") is not None}


def _in_progress(status: str) -> bool:
    # REVIEW_IN_PROGRESS: a change set nobody executed; it stays like that, waiting is pointless.
    return status.endswith("_IN_PROGRESS") and status != "REVIEW_IN_PROGRESS"


def _settle(clients: Clients, name: str) -> dict | None:
    """The stack once no operation is in progress on it (None: it does not exist)."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        stack = _describe(clients, name)
        if stack is None or not _in_progress(stack["StackStatus"]):
            return stack
        if time.monotonic() >= deadline:
            raise InfrastructureError(f"stack {name} still {stack['StackStatus']} after {WAIT_TIMEOUT:g}s")
        time.sleep(POLL_INTERVAL)


def _expect(clients: Clients, name: str, wanted: str, what: str) -> dict:
    stack = _settle(clients, name)
    if stack is None:
        raise InfrastructureError(f"{what}: the stack disappeared")
    if stack["StackStatus"] != wanted:
        reasons = _failure_reasons(clients, name)
        raise InfrastructureError(f"{what} ended {stack['StackStatus']}" + (f": {reasons}" if reasons else ""))
    return stack


def _failure_reasons(clients: Clients, name: str) -> str:
    """The reasons CloudFormation gives in the stack's failed events (newest first)."""
    try:
        return failure_reasons(clients.cfn.describe_stack_events(StackName=name)["StackEvents"])
    except ClientError:
        return ""


def _message(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')}: {error.get('Message', exc)}"
