"""Stage 8, ``8-production``: production approval, then a blue/green deploy with rollback."""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta

from airflow.sdk import TaskGroup, chain, get_current_context
from airflow.sdk.exceptions import AirflowSkipException

from deployline import aws, notifications
from deployline.approvals import approval_tasks, verify_approval
from deployline.blue_green_operator import BlueGreenDeployOperator
from deployline.config import PipelineConfig
from deployline.deployments import BlueGreen, Deployed, RolledBack, start_removing_idle, superseded_by
from deployline.environment_tasks import STACK_POLL_INTERVAL, STACK_TIMEOUT, run_repository_test, stack_task
from deployline.environments.base import EnvironmentFailed, EnvironmentSpec, environment_name
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow
from deployline.stack_readiness import StackOperator

log = logging.getLogger(__name__)

DOC = """\
### 8-production: approval, then blue/green

`request_approval` asks `{app}_approve_production`; `await_approval` waits (deferred) for
a person with the `{role}` role. `verify_approval` (and `deploy` again) checks Airflow's record
of the gate's `decision` for this run and the approver the release record names: marking
`await_approval` success by hand approves nothing. `ensure_production_address` (setup) makes sure the
application's stable production address exists. Then `deploy`, which holds the one-slot
pool `{pool}` so two production deploys never overlap:

1. A version older than the live one is **skipped as superseded** (the log says which).
2. The new version (green) starts at production size ({size}) next to the live one (blue),
   must answer `{health}` and pass the smoke tests at its own address.
3. The production address switches to green; the smoke tests run again through it and
   green's health is watched for {verify:g} s.
4. Blue keeps running {drain:g} s for requests in flight, then it is removed.

`deploy` holds no worker slot while it waits: for green's stack, green's health behind its
load balancer, the drain and blue's removal it defers to the triggerer (the Graph shows it
*deferred*), and the pool counts it still, so the next deploy waits.

The switch is written to `production.json` before it happens (`pending`: switching, verifying,
verified). A retry of `deploy` (or a rerun of the stage) after a try killed during the
verification verifies again, or switches back; after the verification it finds this version
live, deploys nothing again and writes the deploy to the release record once. While a live
version is unverified, `clean_up_environments` keeps the one to roll back to, and a deploy
of another version is refused.

If green fails in step 2 or 3, traffic stays on or returns to blue, green is removed, the
run fails and the release record gets a `rollback` entry. `clean_up_environments`
(teardown, same pool) removes any production environment that takes no traffic, even
after a killed deploy.
"""


def record_deployment(registry: ReleaseRegistry, version: str, deployed: Deployed, run_id: str,
                      started_at: str) -> dict:
    """Write a deploy that went live: the production pointer, one ``deployments`` entry, the record's
    ``production`` and the stage's result; returns the details.

    A retry after the switch (or the stage cleared and rerun) finds the version live already
    (``already_live``): it writes what a try killed between the switch and these writes left out,
    nothing twice, and keeps what the deploy itself recorded.
    """
    details = deployed.to_dict() | {"run_id": run_id, "at": utcnow()}
    fields: dict = {"production": details}
    previous, switch_seconds = deployed.previous_version, deployed.switch_seconds
    pointer_missing = entry_missing = True
    if deployed.result == "already_live":
        pointer, record = registry.production() or {}, registry.get(version) or {}
        pointer_missing = pointer.get("version") != version
        previous = pointer.get("version") if pointer_missing else pointer.get("previous_version")
        switch_seconds = None  # not measured: the switch happened in the try that was killed
        entry_missing = not any(a.get("result") == "deployed" for a in record.get("deployments") or [])
        if (record.get("production") or {}).get("result") in ("deployed", "already_live"):
            fields = {}
    if pointer_missing:
        registry.set_production(version, environment=deployed.environment, endpoint=deployed.endpoint,
                                run_id=run_id, previous_version=previous)
    if entry_missing:
        registry.add_deployment(version, {
            "result": "deployed", "started_at": started_at, "at": details["at"], "run_id": run_id,
            "previous_version": previous, "switch_seconds": switch_seconds})
    registry.update(version, **fields, stages={"8-production": {
        "result": "success", "finished_at": utcnow(), "run_id": run_id}})
    return details


def production_stage(config: PipelineConfig, commit, candidate, after) -> TaskGroup:
    envs = config.environments
    with TaskGroup("8-production", tooltip="production approval, blue/green deploy, rollback") as group:
        group.doc_md = DOC.format(app=config.application, role=config.approvals.approver_role,
                                  pool=config.production_pool, size=envs.sizes.production, health=envs.health_path,
                                  verify=config.production.verify_seconds, drain=config.production.drain_seconds)
        _, _, approved = approval_tasks(config, "production", commit, after=after)

        # Retries: the gate's record_decision may still be writing the approval (ApprovalNotRecorded).
        @task(task_id="verify_approval", retries=4, retry_delay=timedelta(seconds=15))
        def verify(commit: dict) -> dict:
            ctx = get_current_context()
            return verify_approval(config, "production", commit, ctx["ti"], ctx["run_id"])

        def prepare(candidate: dict, commit: dict) -> BlueGreen:
            ctx = get_current_context()
            run_id, version = ctx["run_id"], commit["version"]
            # Again here: this task is what changes production; clearing it alone must not skip the gate.
            verify_approval(config, "production", commit, ctx["ti"], run_id)
            driver = aws.environment_driver(config)
            newer = superseded_by(driver, config.application, version)
            if newer:
                ReleaseRegistry.for_config(config).update(
                    version, production={"result": "superseded", "live_version": newer, "at": utcnow(),
                                         "run_id": run_id},
                    stages={"8-production": {"result": "superseded", "finished_at": utcnow(), "run_id": run_id}})
                reason = f"superseded: production runs {newer}, newer than {version}; {version} is not deployed"
                log.info("%s", reason)  # Airflow logs a skip without its reason
                raise AirflowSkipException(reason)
            spec = EnvironmentSpec(
                application=config.application, stage="production",
                name=environment_name(config.application, "production", version), size=envs.sizes.production,
                version=version, artifact=candidate["artifact"], image_id=candidate.get("application_image"),
                labels={"run_id": run_id})
            attempt = itertools.count(1)

            def smoke(url: str) -> list[str]:
                return run_repository_test(config, config.smoke_test, "smoke_test", commit, url,
                                           candidate["artifact_version"], f"{run_id}-production-{next(attempt)}")

            registry = ReleaseRegistry.for_config(config)

            def journal(status: str, details: dict) -> None:
                registry.note_production_change(version, status, run_id=run_id, **details)

            return BlueGreen(driver, spec, config.production, health_path=envs.health_path,
                             health_timeout=envs.health_timeout, smoke=smoke, logger=log, journal=journal,
                             pending=(registry.production() or {}).get("pending"))

        def deployed(deployed: Deployed, state: dict, candidate: dict, commit: dict) -> dict:
            version = commit["version"]
            details = record_deployment(ReleaseRegistry.for_config(config), version, deployed,
                                        get_current_context()["run_id"], state["started_at"])
            notifications.publish(config, f"{config.application} {version} is live",
                                  f"{version} serves {deployed.endpoint} (previous: {deployed.previous_version}).")
            log.info("%s is live at %s (switch %.2fs, previous %s)", version, deployed.endpoint,
                     deployed.switch_seconds, deployed.previous_version)
            return details

        def rolled_back(error: RolledBack, state: dict, candidate: dict, commit: dict) -> None:
            version, rollback = commit["version"], error.to_dict()
            ReleaseRegistry.for_config(config).add_deployment(
                version, {"result": "rolled_back", "started_at": state["started_at"], "at": rollback["at"],
                          "run_id": get_current_context()["run_id"], "phase": rollback["phase"],
                          "restored_version": rollback["restored_version"],
                          **{k: rollback[k] for k in ("switched_at", "restored_at") if rollback.get(k)}},
                rollback=rollback, production={"result": "rolled_back", "at": rollback["at"],
                                               "run_id": get_current_context()["run_id"]})
            notifications.publish(config, f"{config.application} {version}: rolled back", str(error))

        def start_router():
            return aws.environment_driver(config).start_ensure_router(config.application)

        def production_address() -> dict:
            router = aws.environment_driver(config).router(config.application)
            if router is None:
                raise EnvironmentFailed(f"the production address of {config.application} is gone after its stack "
                                        "settled")
            log.info("production address of %s: %s (live: %s)", config.application, router.endpoint,
                     router.live or "nothing yet")
            return router.to_dict()

        def start_clean_up():
            # Never the version to roll back to while the live one is unverified (a killed deploy's).
            pending = (ReleaseRegistry.for_config(config).production() or {}).get("pending")
            return start_removing_idle(aws.environment_driver(config), config.application, logger=log, pending=pending)

        def environments_left() -> list[str]:
            left = [e.name for e in aws.environment_driver(config).list(config.application) if e.stage == "production"]
            log.info("production environments of %s now: %s", config.application, ", ".join(left) or "none")
            return left

        # The address is the setup: the clean-up (teardown) runs even when the deploy fails or is killed.
        address = stack_task(
            config, "ensure_production_address", start_router, production_address,
            "The application's stable production address (router), created on first use; its stack is waited "
            "for in the triggerer.", pool=config.production_pool, retries=2, **config.environments.host_queue())
        deploy = BlueGreenDeployOperator(
            task_id="deploy", deploy=prepare, on_deployed=deployed, on_rolled_back=rolled_back,
            op_kwargs={"candidate": candidate, "commit": commit}, aws_conn_id=config.aws.conn_id,
            region_name=config.aws.region, poll_interval=STACK_POLL_INTERVAL, timeout=STACK_TIMEOUT,
            pool=config.production_pool, doc_md="Blue/green: green up, health, smoke tests, switch, health "
            "watched, blue drained and removed; stack and health waits in the triggerer.",
            **config.environments.host_queue())
        clean_up = StackOperator(
            task_id="clean_up_environments", start=start_clean_up, finish=environments_left,
            aws_conn_id=config.aws.conn_id, region_name=config.aws.region, poll_interval=STACK_POLL_INTERVAL,
            timeout=STACK_TIMEOUT, pool=config.production_pool,
            doc_md="Removes every production environment that takes no traffic (a killed deploy's green, a blue "
            "not yet retired); stack deletes are waited for in the triggerer.", **config.environments.host_queue())
        chain(approved, verify(commit), address, deploy)
        deploy >> clean_up.as_teardown(setups=address)
    return group
