"""Stage 7, ``7-pre-production``: the long-lived environment at production size, on this version."""

from __future__ import annotations

import logging
from datetime import timedelta

from airflow.sdk import TaskGroup, TriggerRule, chain, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from deployline import aws
from deployline.airflow_api import api_from_connection
from deployline.approvals import verify_approval
from deployline.config import PipelineConfig
from deployline.environment_tasks import existing_environment, run_repository_test, stack_task
from deployline.environments.base import EnvironmentSpec, environment_name
from deployline.pools import pool_problems
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow

log = logging.getLogger(__name__)

DOC = """\
### 7-pre-production: production size, this version

Starts only when `5-exploratory` (approved) and `6-capacity` (thresholds met) both
succeeded in this run, so both judged this very version; `check_release_ready` confirms it
from the release record. `check_pools` checks the application's one-slot pools
(`{pre_pool}`, `{prod_pool}`), made when the deployment starts
(`python -m deployline pools`); they count deferred tasks, so a deploy that waits in the
triggerer keeps its slot. `update_environment` brings the
application's long-lived pre-production environment (`{env}`) to production size ({size})
and this version, new workers up before the old ones stop; `smoke_test` runs the
repository's smoke tests against it and checks the version it reports. Both hold the pool
`{pre_pool}`, so two runs never update it at the same time.
"""


def preproduction_name(config: PipelineConfig) -> str:
    return environment_name(config.application, "preproduction", config.application)


def release_ready(record: dict, profiles: list[str], run_id: str) -> list[str]:
    """What keeps this version from pre-production in its load tests, from its release record (empty:
    ready); the approval is checked by ``verify_approval``."""
    problems = []
    tests = record.get("load_tests") or {}
    for name in profiles:
        result = tests.get(name) or {}
        if result.get("run_id") != run_id:
            problems.append(f"load profile {name} did not run in {run_id}")
        elif not result.get("passed"):
            problems.append(f"load profile {name} failed")
    return problems


def preproduction_stage(config: PipelineConfig, commit, candidate) -> TaskGroup:
    sizes = config.environments.sizes
    with TaskGroup("7-pre-production", tooltip="production-size environment, smoke tests") as group:
        group.doc_md = DOC.format(env=preproduction_name(config), size=sizes.preproduction,
                                  pre_pool=config.preproduction_pool, prod_pool=config.production_pool)

        # Retries: the gate's record_decision may still be writing the approval (ApprovalNotRecorded).
        # The fan-in waits for both branches: ALL_SUCCESS would skip this stage (and end the run as a
        # success) as soon as 6-capacity is skipped because exploratory was rejected, before that
        # rejection fails its own branch. A skipped load test is caught below (release_ready).
        @task(task_id="check_release_ready", retries=4, retry_delay=timedelta(seconds=15),
              trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
        def check_release_ready(commit: dict) -> None:
            ctx = get_current_context()
            verify_approval(config, "exploratory", commit, ctx["ti"], ctx["run_id"])
            record = ReleaseRegistry.for_config(config).get(commit["version"]) or {}
            problems = release_ready(record, list(config.capacity.profiles()), ctx["run_id"])
            if problems:
                raise AirflowFailException(f"{commit['version']} is not ready for pre-production: "
                                           f"{'; '.join(problems)}")
            log.info("%s: exploratory approval and every load profile passed in this run", commit["version"])

        @task(task_id="check_pools", retries=2)
        def check_pools() -> None:
            # Made when the deployment starts (python -m deployline pools); read here with the read-only
            # account, so that a missing pool is an error that says what to do, not a task never scheduled.
            api = api_from_connection()
            if api is None:
                log.warning("no deployline_api connection: cannot check the pools %s and %s; create them with "
                            "`python -m deployline pools`", config.preproduction_pool, config.production_pool)
                return
            existing = {p["name"]: p for p in api.get("/pools", limit=1000)["pools"]}
            problems = pool_problems(existing, config)
            if problems:
                raise AirflowFailException(f"{'; '.join(problems)}: run `python -m deployline pools` where Airflow's "
                                           "settings are (make demo and the Compose init do), then clear this task")
            log.info("pools %s and %s: 1 slot each, counting deferred tasks", config.preproduction_pool,
                     config.production_pool)

        def start_update(candidate: dict, commit: dict):
            spec = EnvironmentSpec(
                application=config.application, stage="preproduction", name=preproduction_name(config),
                size=sizes.preproduction, version=commit["version"], artifact=candidate["artifact"],
                image_id=candidate.get("application_image"), labels={"run_id": get_current_context()["run_id"]})
            driver = aws.environment_driver(config)
            before = driver.get(spec.name)
            log.info("pre-production %s runs %s; wanted: %s at size %d", spec.name,
                     before.version if before else "nothing yet", spec.version, spec.size)
            return driver.start_update(spec)

        def updated_endpoint(candidate: dict, commit: dict) -> str:
            driver = aws.environment_driver(config)
            name = preproduction_name(config)
            existing_environment(driver, name)
            # The load balancer's health checks: a short wait after the stack's, kept in the task.
            info = driver.wait_until_healthy(name, config.environments.health_path, config.environments.health_timeout)
            log.info("pre-production %s: %s, %d at %s", info.name, info.version, info.size, info.endpoint)
            return info.endpoint

        @task(task_id="smoke_test", pool=config.preproduction_pool, **config.environments.host_queue())
        def smoke_test(endpoint: str, candidate: dict, commit: dict) -> list[str]:
            ctx = get_current_context()
            output = run_repository_test(config, config.smoke_test, "smoke_test", commit, endpoint,
                                         candidate["artifact_version"], f"{ctx['run_id']}-preproduction")
            ReleaseRegistry.for_config(config).update(
                commit["version"], preproduction={"environment": preproduction_name(config), "endpoint": endpoint,
                                                  "smoke_output": output[-10:], "at": utcnow()},
                stages={"7-pre-production": {"result": "success", "finished_at": utcnow(), "run_id": ctx["run_id"]}})
            return output

        ready = check_release_ready(commit)
        endpoint = stack_task(
            config, "update_environment", start_update, updated_endpoint,
            "Brings the long-lived pre-production environment to this version at production size (new "
            "instances up before old ones stop); the stack update is waited for in the triggerer, then health.",
            op_kwargs={"candidate": candidate, "commit": commit}, pool=config.preproduction_pool, retries=1,
            **config.environments.host_queue())
        chain(ready, check_pools(), endpoint, smoke_test(endpoint, candidate, commit))
    return group
