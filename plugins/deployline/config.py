"""Pipeline configuration: ``include/pipelines/<app>.yaml`` validated into typed settings.

Errors name the file, the field and the problem, so that a broken file shows up
in the Airflow UI as an import error a person can act on.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Where the pipeline configs live; tests and other deployments point elsewhere.
PIPELINES_DIR_ENV = "DEPLOYLINE_PIPELINES_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PIPELINES_DIR = PROJECT_ROOT / "include" / "pipelines"

# libyaml's loader reads a config about ten times faster than PyYAML's pure-Python one, and every
# parse of the DAG files reads every config; the pure-Python loader only explains a broken file.
_FAST_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = r"^[a-z][a-z0-9_]{0,62}$"
# arn:<partition>:iam::<account>:role/<path/><name>: IAM's own limits on path and name characters.
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/(?:[A-Za-z0-9+=,.@_-]+/)*[A-Za-z0-9+=,.@_-]{1,64}$")


class PipelineConfigError(ValueError):
    """A pipeline config file is unreadable or invalid; the message names file, field and problem."""


def _valid_glob(pattern: str) -> str:
    import pathspec

    if not pattern.strip():
        raise ValueError("empty glob")
    try:
        pathspec.PathSpec.from_lines("gitignore", [pattern])
    except Exception as exc:
        raise ValueError(f"bad glob {pattern!r}: {exc}") from exc
    return pattern


def _blank_is_none(value):
    # "${VAR:-}" expands to "": the setting is off, as if it were absent.
    return None if isinstance(value, str) and not value.strip() else value


def _role_arn(value: str | None) -> str | None:
    if value is not None and not _ROLE_ARN.match(value):
        raise ValueError("not an IAM role ARN (arn:<partition>:iam::<12-digit account>:role/<path/name>)")
    return value


# A CloudFormation service role: passed as RoleARN, CloudFormation then acts with its permissions
# instead of the caller's (include/iam/README.md).
ServiceRoleArn = Annotated[str | None, BeforeValidator(_blank_is_none), AfterValidator(_role_arn)]


class _Strict(BaseModel):
    # strict: no coercion (``timeout: true`` is not 1 s, ``"5"`` is not 5); no .inf or .nan, which
    # would make a threshold that can never fail.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Repository(_Strict):
    url: str = Field(min_length=1, description="Any git URL: local path, file://, https://, ssh://")
    branch: str = Field(default="main", min_length=1)

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        # A URL shows in logs, the DAG docs and rendered fields; a token in it would too.
        parts = urlsplit(value) if "://" in value else None
        if parts and (parts.password or (parts.username and parts.scheme in ("http", "https"))):
            raise ValueError("credentials in the URL: put the login and token in the Airflow connection named by "
                             "repository.conn_id, and the URL without them")
        return value
    conn_id: str | None = Field(
        default=None, description="Airflow connection holding login/password (token) for https"
    )


class Polling(_Strict):
    schedule: str | None = Field(
        default="*/5 * * * *", description="cron for <app>_commit_poll; null: no polling, runs are triggered by hand")
    poke_interval: Annotated[int, Field(ge=1, le=3600)] = 30
    # How long one poll run keeps looking for a new commit before it ends as skipped.
    timeout: Annotated[int, Field(ge=0, le=86400)] = 240

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a valid cron expression: {value!r}")
        return value


class Step(_Strict):
    command: str = Field(min_length=1)
    timeout: Annotated[int, Field(gt=0, le=24 * 3600)] = 900


class CommitStage(_Strict):
    workdir: str = Field(default=".", description="folder inside the checkout where commands run")
    build: Step
    unit_test: Step
    static_analysis: Step
    artifact: str = Field(min_length=1, description="glob, relative to workdir, matching one file")
    env: dict[str, str] = Field(default_factory=dict)
    aws_role_arn: ServiceRoleArn = Field(
        default=None, description="a role the build, unit tests and static analysis get short-lived credentials "
        "of (15 minutes, AssumeRole with the pipeline's connection); none: the commands get no AWS credentials")

    @field_validator("workdir", "artifact")
    @classmethod
    def _relative(cls, value: str) -> str:
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"must be a path inside the checkout, got {value!r}")
        return value


class Baking(_Strict):
    base_image: str = Field(
        default="resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        pattern=r"^(ami-[0-9a-f]{8,17}|resolve:ssm:/\S+)$",
        description="an AMI id, or resolve:ssm:<parameter> naming an SSM parameter that holds one",
    )
    instance_type: str = "t3.micro"
    provision_script: str = Field(default="infrastructure/provision.sh", description="path in the repository")
    provision_timeout: Annotated[int, Field(gt=0, le=6 * 3600)] = 1800
    image_timeout: Annotated[int, Field(gt=0, le=24 * 3600)] = 3600
    subnet_id: str | None = None
    instance_profile: str | None = Field(default=None, description="instance profile with SSM access")


class Sizes(_Strict):
    """Workers (local driver) or instances (cloudformation) per stage; pre-production = production."""

    self_service: Annotated[int, Field(ge=1, le=20)] = 1
    acceptance: Annotated[int, Field(ge=1, le=20)] = 1
    capacity: Annotated[int, Field(ge=1, le=50)] = 2
    production: Annotated[int, Field(ge=1, le=100)] = 3

    @property
    def preproduction(self) -> int:
        return self.production

    def for_stage(self, stage: str) -> int:
        return self.production if stage == "preproduction" else getattr(self, stage)


class LocalDriverSettings(_Strict):
    start_command: str = Field(
        default="sh run.sh --host 127.0.0.1 --port {port}",
        description="run in the unpacked artifact; {port} is the worker's port",
    )
    env: dict[str, str] = Field(default_factory=dict)
    production_port: Annotated[int, Field(ge=1024, le=65535)] | None = Field(
        default=None, description="port of the stable production address; default: a free port, kept")
    queue: str = Field(
        default="deployline_local_environments", pattern=r"^[A-Za-z0-9_.-]{1,100}$",
        description="Celery queue of the one host the local environments live on: every task that starts, "
                    "changes, checks, tests or stops one runs there (docs/DEPLOYMENT.md)")


class CloudFormationSettings(_Strict):
    template: str = Field(default="include/cloudformation/environment.yaml", description="relative to the project")
    instance_type: str = "t3.micro"
    app_port: Annotated[int, Field(ge=1, le=65535)] = 8080
    network_parameter_prefix: str = "/deployline/network"
    service_role_arn: ServiceRoleArn = Field(
        default=None,
        description="CloudFormation service role for the environment and router stacks (RoleARN); "
        "none: CloudFormation uses the pipeline's own credentials",
    )


class Environments(_Strict):
    driver: Literal["local", "cloudformation"] = "local"
    sizes: Sizes = Sizes()
    health_path: str = "/health"
    health_timeout: Annotated[int, Field(gt=0, le=3600)] = 120
    local: LocalDriverSettings = LocalDriverSettings()
    cloudformation: CloudFormationSettings = CloudFormationSettings()

    def host_queue(self) -> dict[str, str]:
        """Operator arguments of a task that acts on an environment or calls its address. The
        local driver's environments are processes on one host's loopback, so those tasks go to
        that host's queue; the cloudformation driver's are reachable from any worker."""
        return {"queue": self.local.queue} if self.driver == "local" else {}


class RepositoryTest(_Strict):
    """A test command from the repository, run at the commit against a live environment."""

    command: str = Field(min_length=1, description="run in the checkout; {base_url} is the environment's URL")
    timeout: Annotated[int, Field(gt=0, le=6 * 3600)] = 900


class Thresholds(_Strict):
    """What a load profile must achieve; any one missed fails ``6-capacity``."""

    p95_ms: Annotated[float, Field(gt=0)] = 500
    p99_ms: Annotated[float, Field(gt=0)] = 1000
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    min_rps: Annotated[float, Field(ge=0)] = 0


class LoadProfile(_Strict):
    users: Annotated[int, Field(ge=1, le=100_000)]
    spawn_rate: Annotated[float, Field(gt=0)]
    duration_seconds: Annotated[int, Field(ge=1, le=6 * 3600)]
    thresholds: Thresholds = Thresholds()


class Capacity(_Strict):
    locustfile: str = Field(default="tests/load/locustfile.py", description="Locust file, path in the repository")
    expected: LoadProfile = LoadProfile(users=10, spawn_rate=10, duration_seconds=30)
    peak: LoadProfile = LoadProfile(users=40, spawn_rate=20, duration_seconds=30)
    # Locust processes: 1 runs in-process; more start a master and N-1 workers (one core each).
    processes: Annotated[int, Field(ge=1, le=64)] = 1

    def profiles(self) -> dict[str, LoadProfile]:
        return {"expected": self.expected, "peak": self.peak}


class Production(_Strict):
    drain_seconds: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=30, description="the old version keeps running this long after the switch, for requests in flight")
    verify_seconds: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=60, description="health is watched this long after the switch; a failure rolls back")
    check_interval: Annotated[float, Field(gt=0, le=60)] = 1.0


class SelfService(_Strict):
    default_ttl_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 8
    max_ttl_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 72
    max_size: Annotated[int, Field(ge=1, le=20)] = 3
    max_per_owner: Annotated[int, Field(ge=1, le=50)] = Field(
        default=3, description="self-service environments one owner may have running at once")
    admins: list[str] = Field(
        default_factory=list, description="Airflow users who may launch or destroy for someone else (the owner "
        "of any other request is the user who triggered it)")


class Gate(_Strict):
    mode: Literal["hitl", "sensor"] = Field(
        default="hitl",
        description="hitl: Airflow's ApprovalOperator (Approve/Reject buttons); sensor: a sensor that waits "
        "until a person marks it; either way marking the task success approves and failed rejects",
    )
    timeout_hours: Annotated[float, Field(gt=0, le=24 * 90)] = 168


class Approvals(_Strict):
    approver_role: str = "ReleaseApprover"
    exploratory: Gate = Gate()
    production: Gate = Gate()
    separate_duties: bool = Field(
        default=False, description="refuse an approval given by the commit's author (git name or e-mail)")


class Aws(_Strict):
    conn_id: str = "aws_default"
    region: str = Field(default="us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    artifact_bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class PipelineConfig(_Strict):
    application: str = Field(pattern=_NAME, description="lower-case name, used in DAG ids")
    description: str = ""
    repository: Repository
    polling: Polling = Polling()
    infrastructure_paths: list[Annotated[str, AfterValidator(_valid_glob)]] = Field(
        default_factory=lambda: ["infrastructure/**"],
        description="gitignore-style globs; a change there is an infrastructure change",
    )
    commit_stage: CommitStage
    baking: Baking = Baking()
    environments: Environments = Environments()
    acceptance: RepositoryTest | None = None
    capacity: Capacity = Capacity()
    smoke_test: RepositoryTest | None = Field(
        default=None, description="quick checks against pre-production and the new production version")
    production: Production = Production()
    self_service: SelfService = SelfService()
    approvals: Approvals = Approvals()
    notification_topic_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}$",
        description="SNS topic for approvals and failures; default: the topic deployline-<application>",
    )
    aws: Aws
    source_file: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _self_service_limits(self) -> PipelineConfig:
        limits = self.self_service
        if limits.default_ttl_hours > limits.max_ttl_hours:
            raise ValueError(f"self_service.default_ttl_hours ({limits.default_ttl_hours:g}) is above "
                             f"self_service.max_ttl_hours ({limits.max_ttl_hours:g})")
        if self.environments.sizes.self_service > limits.max_size:
            raise ValueError(f"environments.sizes.self_service ({self.environments.sizes.self_service}) is above "
                             f"self_service.max_size ({limits.max_size})")
        return self

    @property
    def poll_dag_id(self) -> str:
        return f"{self.application}_commit_poll"

    @property
    def pipeline_dag_id(self) -> str:
        return f"{self.application}_pipeline"

    @property
    def production_pool(self) -> str:
        """One slot: two production deploys of this application never overlap."""
        return f"deployline_{self.application}_production"

    @property
    def preproduction_pool(self) -> str:
        return f"deployline_{self.application}_preproduction"

    def step_timeout(self, step: str) -> timedelta:
        return timedelta(seconds=getattr(self.commit_stage, step).timeout)


def expand_vars(value, where: str, environ=None):
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    environ = os.environ if environ is None else environ
    if isinstance(value, dict):
        return {k: expand_vars(v, f"{where}.{k}" if where else str(k), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, f"{where}[{i}]", environ) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise PipelineConfigError(f"{where}: environment variable ${{{name}}} is not set")

    return _VAR.sub(substitute, value)


def _describe(error: dict) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "(top level)"
    problem = error["msg"]
    if error["type"] not in ("missing", "extra_forbidden") and "input" in error:
        problem += f" (got {error['input']!r})"
    if error["type"] == "extra_forbidden":
        problem = "unknown field"
    return f"{field}: {problem}"


# A pipeline config is a page of settings; a bigger file is a mistake (or an attack on every parse).
MAX_CONFIG_BYTES = 256 * 1024


def _parse_yaml(text: str):
    # Aliases (*name) are refused: a few nested ones expand to billions of nodes (an "alias bomb").
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=_FAST_YAML_LOADER)):
            raise ValueError("YAML aliases (*name) are not allowed: write the values out")
    except yaml.YAMLError:
        pass  # explained by the load below, with line and column
    try:
        return yaml.load(text, Loader=_FAST_YAML_LOADER)  # a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError:
        # Errors as PyYAML words them, with line and column, the same whichever loader is installed.
        return yaml.safe_load(text)


class _WrittenOut(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True


def dump_config(data: dict) -> str:
    """YAML of a pipeline config with every value written out: the loader refuses aliases, which
    PyYAML writes for a dict used twice."""
    return yaml.dump(data, Dumper=_WrittenOut)


def load_pipeline_config(path: str | os.PathLike, environ=None) -> PipelineConfig:
    path = Path(path)
    try:
        size = path.stat().st_size
        text = path.read_text(encoding="utf-8") if size <= MAX_CONFIG_BYTES else None
    except OSError as exc:
        raise PipelineConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    if text is None:
        raise PipelineConfigError(f"{path}: {size} bytes, more than a pipeline config may have ({MAX_CONFIG_BYTES})")
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PipelineConfigError(f"{path}: malformed YAML{where}: {problem}") from exc
    except ValueError as exc:  # aliases
        raise PipelineConfigError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        expanded = expand_vars(raw, "", environ)
        config = PipelineConfig.model_validate(expanded)
    except PipelineConfigError as exc:
        raise PipelineConfigError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise PipelineConfigError(f"{path}: {problems}") from exc
    if config.application != path.stem:
        raise PipelineConfigError(
            f"{path}: application: must match the file name {path.stem!r} (got {config.application!r})"
        )
    return config.model_copy(update={"source_file": str(path)})


def pipelines_dir() -> Path:
    return Path(os.environ.get(PIPELINES_DIR_ENV) or DEFAULT_PIPELINES_DIR)


def config_files(directory: Path | None = None) -> list[Path]:
    directory = directory or pipelines_dir()
    return sorted(p for p in directory.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def load_all(directory: Path | None = None) -> tuple[list[PipelineConfig], list[PipelineConfigError]]:
    """Every valid config, and an error per broken one (a broken file never hides the others)."""
    configs, errors = [], []
    for path in config_files(directory):
        try:
            configs.append(load_pipeline_config(path))
        except PipelineConfigError as exc:
            errors.append(exc)
    return configs, errors

