"""One interface for environments, whatever runs them (see ``local`` and ``cloudformation``)."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Literal

STAGES = ("acceptance", "capacity", "self_service", "preproduction", "production")
LONG_LIVED = ("preproduction", "production")  # kept between runs; the others are torn down by their stage


class EnvironmentFailed(RuntimeError):
    """Provisioning, health or teardown failed; the message names the environment."""


def environment_name(application: str, stage: str, key: str) -> str:
    """A deterministic name: a retry of the same run finds its own environment.

    ``key`` is what makes it unique within the stage (the run id, an owner and version...).
    The result is short and safe for CloudFormation stack names, file names and tags.
    """
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    base = re.sub(r"[^a-z0-9-]+", "-", f"{application}-{stage}".lower().replace("_", "-")).strip("-")
    return f"dl-{base[:100]}-{digest}"


# What a task waits on after a driver started a stack operation (stack_readiness.StackSettledTrigger):
# create, update or delete completing, or "settle": any operation in progress ending, however it ends.
StackAction = Literal["create", "update", "delete", "settle"]


@dataclass(frozen=True)
class StackOperation:
    """A CloudFormation stack operation a driver started and did not wait for."""

    stack: str
    operation: StackAction

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EnvironmentSpec:
    application: str
    stage: str  # one of STAGES
    name: str  # from environment_name()
    size: int  # workers (local) or instances (cloudformation)
    version: str
    artifact: dict  # release record's artifact: bucket, key, sha256, uri
    image_id: str | None = None  # AMI to run (cloudformation); recorded by the local driver
    labels: dict[str, str] = field(default_factory=dict)  # owner, run id, expiry... kept as tags/state


@dataclass
class EnvironmentInfo:
    name: str
    application: str
    stage: str
    version: str
    size: int
    endpoint: str  # base URL, e.g. http://127.0.0.1:41234
    driver: str
    created_at: str
    labels: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # driver specific: pids and ports, or stack outputs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RouterInfo:
    """The stable production address of one application and where its traffic goes."""

    application: str
    name: str
    endpoint: str  # production URL: it never changes while the router exists
    live: str | None  # the environment that receives production traffic, None before the first release
    driver: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class EnvironmentDriver(ABC):
    """Every method is idempotent: calling it again after a retry does no harm."""

    name: str

    @abstractmethod
    def provision(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        """Create the environment at ``spec.size`` (or return the one that exists already)."""

    @abstractmethod
    def wait_until_healthy(self, name: str, health_path: str, timeout: float) -> EnvironmentInfo:
        """Block until every worker/instance answers ``health_path`` with 2xx; raise EnvironmentFailed if not."""

    @abstractmethod
    def get(self, name: str) -> EnvironmentInfo | None:
        """The environment, or None when it does not exist."""

    @abstractmethod
    def resize(self, name: str, size: int) -> EnvironmentInfo:
        """Change the number of workers/instances."""

    @abstractmethod
    def teardown(self, name: str) -> bool:
        """Remove the environment; True when something was removed, False when it was already gone."""

    @abstractmethod
    def list(self, application: str | None = None) -> list[EnvironmentInfo]:
        """Every environment this driver runs (of one application)."""

    @abstractmethod
    def update(self, spec: EnvironmentSpec) -> EnvironmentInfo:
        """Run ``spec.version`` at ``spec.size`` in environment ``spec.name``, creating it when missing.

        For long-lived environments (pre-production): the new version is up before the old one stops.
        """

    @abstractmethod
    def health_problem(self, name: str, health_path: str) -> str | None:
        """One look: what keeps the environment from being healthy, or None when it is."""

    # ------------------------------------------------------------------ production traffic (blue/green)

    @abstractmethod
    def ensure_router(self, application: str) -> RouterInfo:
        """The application's production address, created on first use (idempotent)."""

    @abstractmethod
    def router(self, application: str) -> RouterInfo | None:
        """The application's router, or None when there is none yet."""

    @abstractmethod
    def green_spec(self, router: RouterInfo, spec: EnvironmentSpec) -> EnvironmentSpec:
        """``spec`` placed where the router can send traffic to it (the idle slot), not yet live."""

    @abstractmethod
    def test_endpoint(self, router: RouterInfo, name: str) -> str:
        """A URL that reaches environment ``name`` before it takes production traffic."""

    @abstractmethod
    def switch(self, application: str, name: str | None) -> RouterInfo:
        """Send production traffic to environment ``name`` (None: nowhere); returns when it is in effect.

        Requests already sent to the previous environment still complete there.
        """

    @abstractmethod
    def remove_router(self, application: str) -> bool:
        """Remove the production address (not the environments); False when there was none."""

    # ------------------------------------------------------------------ without waiting (deferrable tasks)
    # Each starts what its blocking namesake does and returns the stack operation to wait for, or
    # None when nothing is (left) to wait for. Call it again after the wait: it goes on from where
    # the resources are, as every method here is idempotent, until it returns None. A driver that
    # never waits on AWS (local) does the work at once and returns None.

    def start_provision(self, spec: EnvironmentSpec) -> StackOperation | None:
        self.provision(spec)
        return None

    def start_update(self, spec: EnvironmentSpec) -> StackOperation | None:
        self.update(spec)
        return None

    def start_resize(self, name: str, size: int) -> StackOperation | None:
        self.resize(name, size)
        return None

    def start_teardown(self, name: str) -> StackOperation | None:
        self.teardown(name)
        return None

    def start_ensure_router(self, application: str) -> StackOperation | None:
        self.ensure_router(application)
        return None

    def wait_for(self, operation: StackOperation) -> None:
        """Blocking: until ``operation`` (from a ``start_*``) has ended; EnvironmentFailed if it failed."""
        raise EnvironmentFailed(f"the {self.name} driver started no stack operation to wait for: {operation}")

    def endpoint(self, name: str) -> str:
        info = self.get(name)
        if info is None:
            raise EnvironmentFailed(f"environment {name} does not exist")
        return info.endpoint
