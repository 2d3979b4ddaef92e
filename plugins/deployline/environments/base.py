"""One interface for environments, whatever runs them (see ``local`` and ``cloudformation``)."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

STAGES = ("acceptance", "capacity", "self_service", "preproduction", "production")


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

    def endpoint(self, name: str) -> str:
        info = self.get(name)
        if info is None:
            raise EnvironmentFailed(f"environment {name} does not exist")
        return info.endpoint
