"""Stage 4, self-service environments: anyone launches a release candidate, the reaper removes it.

``<app>_self_service`` is triggered from its form (or the REST API): ``launch`` starts an
environment of a release candidate for an owner, or reuses the one that owner already has for
that version; ``destroy`` removes it.  Every environment carries an expiry (``expires_at``
label, UTC); ``self_service_reaper`` removes the expired ones every hour.

The request logic is in plain functions (``resolve_request``, ``expiry_of``, ``is_expired``,
``destroy_environments``, ``reap_expired``...) so that it can be tested without Airflow.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from airflow.sdk import DAG, Param, chain, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from deployline import aws
from deployline.config import PipelineConfig
from deployline.dag_defaults import START_DATE, default_args, with_trigger_form
from deployline.environment_tasks import stack_task
from deployline.environments.base import EnvironmentFailed, EnvironmentSpec, StackOperation, environment_name
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, stopped_because

log = logging.getLogger(__name__)

STAGE = "self_service"
ACTIONS = ("launch", "destroy")
REAPER_DAG_ID = "self_service_reaper"
OWNER_PATTERN = r"^[A-Za-z0-9._@+-]{1,64}$"
VERSION_PATTERN = r"^(r\d+-[0-9a-f]{7,40})?$"
MIN_TTL_HOURS = 0.005  # 18 seconds: short enough for tests, the form refuses less
LISTED_CANDIDATES = 5  # how many candidates an "unknown version" error lists
SMOKE_TIMEOUT = 60.0  # seconds the smoke test keeps trying an endpoint that does not answer yet

_OWNER = re.compile(OWNER_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)


class RequestError(ValueError):
    """A self-service request that cannot be served; the message says what to change."""


def self_service_dag_id(config: PipelineConfig) -> str:
    return f"{config.application}_self_service"


def default_size(config: PipelineConfig) -> int:
    """The form's default size: the configured self-service size, never above the maximum."""
    return min(config.environments.sizes.self_service, config.self_service.max_size)


def default_ttl_hours(config: PipelineConfig) -> float:
    return min(config.self_service.default_ttl_hours, config.self_service.max_ttl_hours)


# ---------------------------------------------------------------------- time


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def parse_time(value) -> datetime | None:
    """An ISO time (naive means UTC), or None when missing or unreadable."""
    if not value or not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def expiry_of(labels: Mapping | None, entry: Mapping | None = None) -> datetime | None:
    """When an environment expires: its ``expires_at`` label, or the registry's when it has none.

    ``entry`` is the environment's entry in the release record's ``self_service``; it counts only
    while it says ``running``.  When both are there the later one wins: launching again extends
    an environment in the registry, while the driver keeps the labels of the first launch.
    None: no readable expiry anywhere (such an environment is never removed by the reaper).
    """
    found = [parse_time((labels or {}).get("expires_at"))]
    if entry and entry.get("state") == "running":
        found.append(parse_time(entry.get("expires_at")))
    found = [moment for moment in found if moment is not None]
    return max(found) if found else None


def is_expired(labels: Mapping | None, now: datetime, entry: Mapping | None = None) -> bool:
    expires = expiry_of(labels, entry)
    return expires is not None and expires <= now


# ---------------------------------------------------------------------- the request


def candidates(registry: ReleaseRegistry, limit: int | None = None) -> list[dict]:
    """Release records with a candidate that may still go to production, newest first
    (a rejected, failed or rolled-back version is not offered: ``stopped_because``)."""
    found = []
    for version in reversed(registry.versions()):
        record = registry.get(version)
        if record and record.get("candidate") and stopped_because(record) is None:
            found.append(record)
            if limit is not None and len(found) >= limit:
                break
    return found


def _number(value, integer: bool):
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float) or value != value:  # NaN
        return None
    if integer:
        return int(value) if float(value).is_integer() else None
    return float(value)


def resolve_request(registry: ReleaseRegistry, params: Mapping, config: PipelineConfig, now: datetime, *,
                    user: str | None) -> dict:
    """Check a request (the form's fields) and work out what to do; raises RequestError.

    ``user`` is who triggered the run (Airflow records it): the owner, unless the form names
    someone else, which only ``self_service.admins`` may do (launch or destroy for them).
    Everything is checked again here, whatever the form or the REST API let through. For
    ``launch`` the version must be a release candidate ("" means the newest one); the result
    holds the environment name (one per owner and version: launching again reuses it), the
    expiry, the size and what to run.  For ``destroy`` the version names the environment; ""
    means every self-service environment of the owner.
    """
    limits = config.self_service
    problems = []

    action = params.get("action") or "launch"
    if action not in ACTIONS:
        problems.append(f"action: must be one of {', '.join(ACTIONS)} (got {action!r})")

    user = (user or "").strip().lower()
    owner = params.get("owner")
    owner = (owner.strip() if isinstance(owner, str) else "") or user
    if not owner:
        problems.append("owner: the run has no triggering user to own the environment: trigger it from the UI or "
                        "the REST API as yourself")
    elif not _OWNER.match(owner):
        problems.append(f"owner: up to 64 letters, digits and . _ @ + - (got {owner!r})")
    owner = owner.lower()  # one person, one owner, however it is typed
    if owner and owner != user and user not in {a.strip().lower() for a in limits.admins}:
        problems.append(f"owner: {owner} is not you ({user or 'nobody'}): only self_service.admins may launch or "
                        "destroy an environment for someone else")

    version = params.get("version")
    version = version.strip().lower() if isinstance(version, str) else version
    if version is None:
        version = ""
    if not isinstance(version, str) or not _VERSION.match(version):
        problems.append(f"version: a release version like r12-3f9c2a1b7d, or empty for the newest (got {version!r})")

    raw_size = params.get("size", default_size(config))
    size = _number(raw_size, integer=True)
    if size is None or not 1 <= size <= limits.max_size:
        problems.append(f"size: a whole number from 1 to {limits.max_size} (got {raw_size!r})")

    raw_ttl = params.get("ttl_hours", default_ttl_hours(config))
    ttl = _number(raw_ttl, integer=False)
    if ttl is None or not MIN_TTL_HOURS <= ttl <= limits.max_ttl_hours:
        problems.append(f"ttl_hours: hours from {MIN_TTL_HOURS:g} to {limits.max_ttl_hours:g} (got {raw_ttl!r})")

    if problems:
        raise RequestError("invalid self-service request: " + "; ".join(problems))

    request = {
        "action": action, "owner": owner, "requested_version": version, "version": version or None,
        "size": size, "ttl_hours": ttl, "requested_at": iso(now), "name": None,
    }
    if action == "destroy":
        if version:
            request["name"] = environment_name(config.application, STAGE, f"{owner}:{version}")
        return request

    if version:
        record = registry.get(version)
        stopped = stopped_because(record) if record else None
        if not record or not record.get("candidate") or stopped:
            listed = ", ".join(r["version"] for r in candidates(registry, LISTED_CANDIDATES)) or "none yet"
            what = ("has no release record" if not record
                    else "is not a release candidate (it did not pass acceptance)" if not record.get("candidate")
                    else f"is no longer a release candidate ({stopped})")
            raise RequestError(
                f"version {version} of {config.application} {what}; "
                f"the newest release candidates are: {listed}")
    else:
        newest = candidates(registry, 1)
        if not newest:
            raise RequestError(
                f"{config.application} has no release candidate yet: a commit becomes one when it passes "
                f"{config.pipeline_dag_id} up to 3-acceptance")
        record = newest[0]
        version = record["version"]
    candidate = record["candidate"]
    if not candidate.get("artifact"):
        raise RequestError(f"release candidate {version} of {config.application} has no artifact recorded")
    return request | {
        "version": version,
        "name": environment_name(config.application, STAGE, f"{owner}:{version}"),
        "expires_at": iso(now + timedelta(hours=ttl)),
        "artifact": candidate["artifact"],
        "image_id": candidate.get("application_image"),
        # What the service answers on /version: the artifact's version (an infrastructure-only
        # candidate runs the artifact of an earlier version).
        "expected_version": candidate.get("artifact_version") or record.get("artifact_version") or version,
    }


# ---------------------------------------------------------------------- launching


def quota_problem(owned: list[str], request: dict, limit: int) -> str | None:
    """Why ``request`` would take its owner over ``limit`` environments (``owned``: their names), or None."""
    if request["action"] != "launch" or request["name"] in owned or len(owned) < limit:
        return None
    return (f"{request['owner']} has {len(owned)} self-service environment(s) running (at most {limit}): "
            f"{', '.join(sorted(owned))}; destroy one first (action destroy)")


def launch_spec(config: PipelineConfig, request: dict, run_id: str) -> EnvironmentSpec:
    return EnvironmentSpec(
        application=config.application, stage=STAGE, name=request["name"], size=request["size"],
        version=request["version"], artifact=request["artifact"], image_id=request.get("image_id"),
        labels={"owner": request["owner"], "expires_at": request["expires_at"], "run_id": run_id},
    )


def start_launch(driver, config: PipelineConfig, request: dict, run_id: str) -> StackOperation | None:
    """Start the environment (or find the one of the same owner and version) and bring it to the
    requested size; the stack operation to wait for, or None when it is there (call again after it)."""
    pending = driver.start_provision(launch_spec(config, request, run_id))
    if pending:
        return pending
    info = driver.get(request["name"])
    if info is not None and info.size != request["size"]:
        return driver.start_resize(request["name"], request["size"])
    return None


def launched(driver, request: dict, run_id: str, existed: bool) -> dict:
    """What ``start_launch`` made or reused; ``existed``: whether it was there before the launch."""
    info = driver.get(request["name"])
    if info is None:
        raise EnvironmentFailed(f"self-service environment {request['name']} is gone after its stack settled")
    # The driver keeps the labels of the launch that created it: that launch's run id says
    # whether this run made it (a retry of this task too), else whether it existed before.
    created = info.labels["run_id"] == run_id if "run_id" in info.labels else not existed
    return {"name": info.name, "endpoint": info.endpoint, "size": info.size, "created": created,
            "created_at": info.created_at, "labels": dict(info.labels)}


def provision(driver, config: PipelineConfig, request: dict, run_id: str) -> dict:
    """Start the environment, or reuse (and resize) the one of the same owner and version (waiting here)."""
    existed = driver.get(request["name"]) is not None
    _complete(driver, lambda: start_launch(driver, config, request, run_id))
    return launched(driver, request, run_id, existed)


def _complete(driver, start) -> None:
    """Blocking: ``start()`` and wait for what it started until nothing is left (what StackOperator defers)."""
    for _ in range(10):
        pending = start()
        if pending is None:
            return
        driver.wait_for(pending)
    raise EnvironmentFailed("still not done after 10 stack operations")


def smoke_test(endpoint: str, health_path: str, expected_version: str, timeout: float = SMOKE_TIMEOUT) -> dict:
    """GET ``health_path`` and ``/version``; the version must be ``expected_version``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment

    def fetch(path: str) -> dict:
        url = endpoint.rstrip("/") + path
        deadline = time.monotonic() + timeout
        while True:
            try:
                with opener.open(url, timeout=10) as response:
                    body = response.read()
                try:
                    data = json.loads(body)
                except ValueError:
                    data = body[:200].decode("utf-8", "replace")
                return data if isinstance(data, dict) else {"body": data}
            except (OSError, urllib.error.URLError) as exc:  # HTTPError (not 2xx) included
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"smoke test: GET {url} failed after {timeout:g}s: {exc}") from exc
            time.sleep(1)

    health = fetch(health_path)
    answer = fetch("/version")
    if answer.get("version") != expected_version:
        raise RuntimeError(f"smoke test: {endpoint}/version answers {answer.get('version')!r}, "
                           f"expected {expected_version!r}: {answer}")
    return {"health": health, "version": answer}


def environment_entry(registry: ReleaseRegistry, version: str, name: str) -> dict | None:
    record = registry.get(version) or {}
    return (record.get("self_service") or {}).get(name)


def update_entry(registry: ReleaseRegistry, version: str, name: str, create: bool = False, **fields) -> dict | None:
    """Merge ``fields`` into the record's ``self_service.<name>``; never creates a record for a
    version that has none (a typo in a destroy request must not make one)."""
    record = registry.get(version)
    if record is None and not create:
        return None
    entry = {**((record or {}).get("self_service") or {}).get(name, {}), **fields}
    registry.update(version, self_service={name: entry})
    return entry


def record_launch(registry: ReleaseRegistry, request: dict, environment: dict, run_id: str,
                  triggered_by: str | None, now: datetime) -> dict:
    """Write the running environment to the release record; returns its entry.

    The expiry is the latest of this request's, the environment's label (from the launch that
    created it) and the registry's: launching again extends an environment, never shortens it.
    """
    previous = environment_entry(registry, request["version"], request["name"]) or {}
    asked = parse_time(request["expires_at"])
    expires = max(moment for moment in (asked, expiry_of(environment["labels"], previous)) if moment)
    entry = {
        "owner": request["owner"], "url": environment["endpoint"], "size": environment["size"],
        "expires_at": iso(expires), "launched_at": iso(now), "created_at": environment["created_at"],
        "run_id": run_id, "state": "running", "reused": not environment["created"], "triggered_by": triggered_by,
        "destroyed_at": None, "removed_at": None,
    }
    return update_entry(registry, request["version"], request["name"], create=True, **entry)


# ---------------------------------------------------------------------- removing


def owned_environments(driver, application: str, owner: str) -> list:
    return [e for e in driver.list(application) if e.stage == STAGE and e.labels.get("owner") == owner]


def destroy_targets(driver, application: str, request: dict) -> list[dict]:
    """What a destroy request removes: the environment it names (or all of the owner's), each with
    whether it exists now."""
    if request["name"]:
        targets = [(request["name"], request["version"])]
    else:
        targets = [(e.name, e.version) for e in owned_environments(driver, application, request["owner"])]
    return [{"name": name, "version": version, "existed": driver.get(name) is not None} for name, version in targets]


def start_destroying(driver, targets: list[dict]) -> StackOperation | None:
    """Start removing the next target still there; the stack operation to wait for, or None when all are gone."""
    for target in targets:
        pending = driver.start_teardown(target["name"])
        if pending:
            return pending
    return None


def record_destroyed(driver, registry: ReleaseRegistry, application: str, request: dict, targets: list[dict],
                     run_id: str, now: datetime) -> dict:
    """The registry's entries of removed ``targets`` marked destroyed; what was removed and what was not there."""
    result = {"destroyed": [], "not_found": []}
    for target in targets:
        name, version, removed = target["name"], target["version"], target["existed"]
        entry = environment_entry(registry, version, name)
        if removed or (entry and entry.get("state") == "running"):
            update_entry(registry, version, name, state="destroyed", destroyed_at=iso(now), destroyed_by=run_id)
        result["destroyed" if removed else "not_found"].append({"name": name, "version": version})
        if removed:
            log.info("destroyed self-service environment %s (%s of %s)", name, version, request["owner"])
    if not result["destroyed"]:
        what = f"version {request['version']}" if request["name"] else "any version"
        others = owned_environments(driver, application, request["owner"]) if request["name"] else []
        log.info("nothing to destroy: %s has no self-service environment of %s for %s%s", request["owner"],
                 application, what,
                 "; running: " + ", ".join(f"{e.version} ({e.name})" for e in others) if others else "")
    return result


def destroy_environments(driver, registry: ReleaseRegistry, application: str, request: dict, run_id: str,
                         now: datetime) -> dict:
    """Tear down the environment the request names (or all of the owner's), waiting here; nothing there is fine."""
    targets = destroy_targets(driver, application, request)
    _complete(driver, lambda: start_destroying(driver, targets))
    return record_destroyed(driver, registry, application, request, targets, run_id, now)


def expired_environments(driver, registry: ReleaseRegistry, application: str, now: datetime) -> dict:
    """The self-service environments of ``application`` whose expiry has passed (``expired``), and the
    names of those kept (``kept``, ``no_expiry``)."""
    plan = {"expired": [], "kept": [], "no_expiry": []}
    records: dict[str, dict] = {}
    for env in driver.list(application):
        if env.stage != STAGE:
            continue
        if env.version not in records:
            try:
                records[env.version] = registry.get(env.version) or {}
            except ValueError:  # not a Deployline version: no record to read
                records[env.version] = {}
        entry = (records[env.version].get("self_service") or {}).get(env.name)
        expires = expiry_of(env.labels, entry)
        owner = env.labels.get("owner") or (entry or {}).get("owner") or "?"
        if expires is None:
            log.warning("kept %s (%s of %s): no expiry in its labels nor in the registry", env.name, env.version,
                        owner)
            plan["no_expiry"].append(env.name)
        elif expires > now:
            log.info("kept %s (%s of %s): expires %s", env.name, env.version, owner, iso(expires))
            plan["kept"].append(env.name)
        else:
            plan["expired"].append({"name": env.name, "version": env.version, "owner": owner,
                                    "endpoint": env.endpoint, "expires_at": iso(expires),
                                    "recorded": bool(records[env.version])})
    return plan


def record_reaped(registry: ReleaseRegistry, plan: dict, now: datetime) -> dict:
    """The removed environments of ``plan`` marked expired in the registry; the reaper's result."""
    for env in plan["expired"]:
        log.info("removed %s (%s of %s, %s): expired %s", env["name"], env["version"], env["owner"], env["endpoint"],
                 env["expires_at"])
        if env["recorded"]:
            update_entry(registry, env["version"], env["name"], state="expired", removed_at=iso(now),
                         expires_at=env["expires_at"])
    return {"removed": [e["name"] for e in plan["expired"]], "kept": plan["kept"], "no_expiry": plan["no_expiry"]}


def reap_expired(driver, registry: ReleaseRegistry, application: str, now: datetime) -> dict:
    """Tear down the self-service environments of ``application`` whose expiry has passed (waiting here)."""
    plan = expired_environments(driver, registry, application, now)
    _complete(driver, lambda: start_destroying(driver, plan["expired"]))
    return record_reaped(registry, plan, now)


# ---------------------------------------------------------------------- the DAGs

DOC = """\
## {app}: self-service environments

Start your own environment of a release candidate of `{app}`, for exploratory testing or a
demo, with **Trigger**; this form is all there is to fill in:

| field | meaning |
|---|---|
| `action` | `launch` an environment, or `destroy` it |
| `version` | a release candidate, e.g. `r12-3f9c2a1b7d`; empty: the newest candidate (for `destroy`: all of yours) |
| `owner` | empty: you, who trigger the run (only `self_service.admins` name others); at most {max_per_owner} each |
| `size` | workers (local driver) or instances (cloudformation), 1 to {max_size} |
| `ttl_hours` | hours until it is removed by `{reaper}`, up to {max_ttl:g} |

* `validate_request` checks the request again (the REST API can send anything): the version
  must be a release candidate in the registry (an unknown one fails, naming the newest
  candidates); nothing is provisioned on a bad request.
* `choose_action` follows `launch` or `destroy`.
* launch: `provision_environment` ({driver} driver) starts the candidate's artifact (and its
  application image) at the chosen size, or **reuses** the environment the same owner already
  has for that version (resized if the size changed; its expiry is extended, never shortened);
  `wait_until_healthy` waits for `{health}`; `smoke_test` checks `{health}` and that `/version`
  answers the candidate's version; `record_environment` writes it to the release record
  (`self_service.<environment>`: owner, URL, size, expiry, state) and prints the URL in its log
  and as its XCom.  `provision_environment` is a setup task and `remove_failed_launch` its
  teardown, which removes the environment only when the launch failed and this run created
  it: a failed launch leaves nothing (a failed provisioning is cleaned up by the driver), an
  environment from an earlier, successful launch is kept, and a successful launch stays up.
* destroy: `destroy_environment` tears the environment down (saying so when there is none) and
  records `destroyed`.

A successful launch stays up until you destroy it or it expires; `{reaper}` runs every hour.
"""

REAPER_DOC = """\
## Self-service reaper

Every hour, for every application ({apps}), one `reap_<app>` task lists the environments of
the self-service stage and tears down those whose expiry has passed: the `expires_at` label set
at launch, or the later expiry the release registry holds when the environment was launched
again (the registry alone when the labels have none). Each removal is logged and recorded in
the release record (`state: expired`, `removed_at`). An environment without any readable expiry,
or not expired, is never removed.
"""


def build_self_service_dag(config: PipelineConfig) -> DAG:
    app, limits, envs = config.application, config.self_service, config.environments
    form = {
        "action": Param(
            "launch", type="string", enum=list(ACTIONS), title="Action",
            description="launch: start (or reuse) your environment of the version; destroy: remove it.",
            values_display={"launch": "launch (or reuse)", "destroy": "destroy"},
        ),
        "version": Param(
            "", type="string", pattern=VERSION_PATTERN, title="Version",
            description="A release candidate, e.g. r12-3f9c2a1b7d. Empty: the newest release candidate "
                        "(with destroy: every environment of yours).",
        ),
        "owner": Param(
            "", type="string", maxLength=64, pattern=f"^$|{OWNER_PATTERN}", title="Owner",
            description="Empty: you (the user who triggers the run). Someone else only for "
                        "self_service.admins. One environment per owner and version: launching again reuses it.",
        ),
        "size": Param(
            default_size(config), type="integer", minimum=1, maximum=limits.max_size, title="Size",
            description=f"Workers ({envs.driver} driver: "
                        f"{'processes' if envs.driver == 'local' else 'instances'}), 1 to {limits.max_size}.",
        ),
        "ttl_hours": Param(
            default_ttl_hours(config), type="number", minimum=MIN_TTL_HOURS, maximum=limits.max_ttl_hours,
            title="Time to live (hours)",
            description=f"Removed by {REAPER_DAG_ID} after this many hours (at most {limits.max_ttl_hours:g}). "
                        "Launching again extends it.",
        ),
    }
    with DAG(
        dag_id=self_service_dag_id(config),
        description=f"Self-service environments of {app} release candidates",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=8,
        default_args=default_args(),
        tags=["deployline", app],
        doc_md=DOC.format(app=app, max_size=limits.max_size, max_ttl=limits.max_ttl_hours, reaper=REAPER_DAG_ID,
                          max_per_owner=limits.max_per_owner,
                          driver=envs.driver, health=envs.health_path),
    ) as dag:

        @task(task_id="validate_request", retries=2)
        def validate_request() -> dict:
            ctx = get_current_context()
            user = getattr(ctx["dag_run"], "triggering_user_name", None)  # who triggered it, as Airflow records
            try:
                request = resolve_request(ReleaseRegistry.for_config(config), dict(ctx["params"]), config,
                                          datetime.now(UTC), user=user)
                owned = [e.name for e in owned_environments(aws.environment_driver(config), app, request["owner"])]
                problem = quota_problem(owned, request, limits.max_per_owner)
                if problem:
                    raise RequestError(problem)
            except RequestError as exc:
                raise AirflowFailException(str(exc)) from exc  # no retry: the request itself must change
            if request["action"] == "launch":
                log.info("launch %s of %s for %s: environment %s, size %d, expires %s (%g h)", request["version"],
                         app, request["owner"], request["name"], request["size"], request["expires_at"],
                         request["ttl_hours"])
            else:
                log.info("destroy %s of %s for %s", request["name"] or "every environment", app, request["owner"])
            return request

        @task.branch(task_id="choose_action")
        def choose_action(request: dict) -> str:
            return "provision_environment" if request["action"] == "launch" else "destroy_environment"

        def run_id() -> str:
            return get_current_context()["run_id"]

        def plan_launch(request: dict) -> dict:
            return {"existed": aws.environment_driver(config).get(request["name"]) is not None}

        def start_launching(request: dict, plan: dict):
            return start_launch(aws.environment_driver(config), config, request, run_id())

        def launch_result(request: dict, plan: dict) -> dict:
            environment = launched(aws.environment_driver(config), request, run_id(), plan["existed"])
            log.info("%s environment %s at %s (size %d)", "new" if environment["created"] else "reusing",
                     environment["name"], environment["endpoint"], environment["size"])
            return environment

        @task(task_id="wait_until_healthy", **envs.host_queue())
        def wait_until_healthy(environment: dict) -> str:
            info = aws.environment_driver(config).wait_until_healthy(
                environment["name"], envs.health_path, envs.health_timeout)
            log.info("environment %s is healthy at %s", info.name, info.endpoint)
            return info.endpoint

        # It waits for the endpoint itself; a wrong version stays wrong.
        @task(task_id="smoke_test", **envs.host_queue())
        def smoke(endpoint: str, request: dict) -> dict:
            result = smoke_test(endpoint, envs.health_path, request["expected_version"])
            log.info("%s%s: %s; /version: %s", endpoint, envs.health_path, result["health"], result["version"])
            return result

        @task(task_id="record_environment", retries=2)
        def record_environment(environment: dict, request: dict, _smoke: dict) -> dict:
            ctx = get_current_context()
            entry = record_launch(ReleaseRegistry.for_config(config), request, environment, ctx["run_id"],
                                  getattr(ctx["dag_run"], "triggering_user_name", None), datetime.now(UTC))
            bar = "=" * 78
            log.info("\n%s\n  %s %s of %s for %s\n\n      %s\n\n  size %d, expires %s; destroy it with action=destroy"
                     "\n%s", bar, "REUSED" if entry["reused"] else "NEW", request["name"], request["version"],
                     request["owner"], entry["url"], entry["size"], entry["expires_at"], bar)
            return {"name": request["name"], **entry}

        def plan_removal(environment: dict, request: dict) -> dict:
            # A teardown: it runs once the launch is over, whatever happened, and removes only what a
            # failed launch made. A launch is complete when record_environment returned.
            if get_current_context()["ti"].xcom_pull(task_ids="record_environment"):
                return {"remove": False,
                        "why": "the launch succeeded: it stays up until it is destroyed or expires"}
            if not environment["created"]:
                maker = environment["labels"].get("run_id")
                return {"remove": False, "why": f"an earlier, successful launch ({maker}) made it"}
            return {"remove": True, "why": "this launch failed"}

        def start_removal(environment: dict, request: dict, plan: dict):
            return aws.environment_driver(config).start_teardown(environment["name"]) if plan["remove"] else None

        def removal_result(environment: dict, request: dict, plan: dict) -> None:
            if plan["remove"]:
                update_entry(ReleaseRegistry.for_config(config), request["version"], environment["name"],
                             state="failed", removed_at=iso(datetime.now(UTC)), run_id=run_id())
            log.info("environment %s %s: %s", environment["name"], "removed" if plan["remove"] else "kept", plan["why"])

        def plan_destroy(request: dict) -> list[dict]:
            return destroy_targets(aws.environment_driver(config), app, request)

        def start_destroy(request: dict, plan: list[dict]):
            return start_destroying(aws.environment_driver(config), plan)

        def destroy_result(request: dict, plan: list[dict]) -> dict:
            return record_destroyed(aws.environment_driver(config), ReleaseRegistry.for_config(config), app, request,
                                    plan, run_id(), datetime.now(UTC))

        request = validate_request()
        branch = choose_action(request)
        environment = stack_task(
            config, "provision_environment", start_launching, launch_result,
            "Starts the environment (or reuses the owner's one of this version) at the requested size; its "
            "stack is waited for in the triggerer.", op_kwargs={"request": request}, plan=plan_launch, retries=1,
            **envs.host_queue())
        endpoint = wait_until_healthy(environment)
        checked = smoke(endpoint, request)
        recorded = record_environment(environment, request, checked)
        destroyed = stack_task(
            config, "destroy_environment", start_destroy, destroy_result,
            "Removes the named environment (or all of the owner's); stack deletes are waited for in the "
            "triggerer.", op_kwargs={"request": request}, plan=plan_destroy, retries=1, **envs.host_queue())
        chain(branch, [environment, destroyed])
        removal = stack_task(
            config, "remove_failed_launch", start_removal, removal_result,
            "Teardown: removes what a failed launch made (nothing when it succeeded or reused an environment).",
            op_kwargs={"environment": environment, "request": request}, plan=plan_removal, **envs.host_queue())
        recorded >> removal.operator.as_teardown(setups=environment.operator)
    return with_trigger_form(dag, form)


def build_reaper_dag(configs: list[PipelineConfig]) -> DAG:
    with DAG(
        dag_id=REAPER_DAG_ID,
        description="Removes expired self-service environments",
        schedule="@hourly",
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=default_args(retries=1),
        tags=["deployline", "self_service"],
        doc_md=REAPER_DOC.format(apps=", ".join(f"`{c.application}`" for c in configs) or "none configured"),
    ) as dag:
        for config in configs:
            _reap_task(config)
    return dag


def _reap_task(config: PipelineConfig):
    def plan(application: str) -> dict:
        return expired_environments(aws.environment_driver(config), ReleaseRegistry.for_config(config), application,
                                    datetime.now(UTC))

    def start(application: str, plan: dict):
        return start_destroying(aws.environment_driver(config), plan["expired"])

    def finish(application: str, plan: dict) -> dict:
        result = record_reaped(ReleaseRegistry.for_config(config), plan, datetime.now(UTC))
        log.info("%s: removed %d, kept %d, without expiry %d", application, len(result["removed"]),
                 len(result["kept"]), len(result["no_expiry"]))
        return result

    return stack_task(config, f"reap_{config.application}", start, finish,
                      f"Removes the expired self-service environments of {config.application}; stack deletes are "
                      "waited for in the triggerer.", op_kwargs={"application": config.application}, plan=plan,
                      **config.environments.host_queue())
