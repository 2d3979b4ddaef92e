"""Stage 6, ``6-capacity``: the candidate under load, at the expected and the peak profile."""

from __future__ import annotations

import logging
import math
import shutil

from airflow.sdk import TaskGroup, chain, get_current_context
from airflow.sdk.exceptions import AirflowSkipException

from deployline import aws
from deployline.approvals import REJECTED, TIMED_OUT
from deployline.commands import CommandStopped
from deployline.config import PipelineConfig
from deployline.environment_tasks import run_environment
from deployline.load_tests import LoadTestFailed, failure_message, run_load_test, summary_table
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry, utcnow
from deployline.sources import GitSource
from deployline.workdirs import remove_workspace, workspace

log = logging.getLogger(__name__)

DOC = """\
### 6-capacity: does it hold the load?

Runs next to `5-exploratory`, on the release candidate. `provision_environment` (setup)
starts an environment of the capacity size ({size}); `load_test_expected` and then
`load_test_peak` run the repository's Locust file (`{locustfile}`) headless against it:

| profile | users | spawn rate | duration | p95 | p99 | error rate | throughput |
|---|---|---|---|---|---|---|---|
{rows}

A profile that misses a threshold fails the stage with the numbers, and the release goes
no further. Each profile's summary is in its task log and the release record; Locust's CSV
and HTML reports are in `s3://{bucket}/{app}/load-tests/<version>/`.
`teardown_environment` removes the environment on every path.
"""


def _row(name, profile) -> str:
    t = profile.thresholds
    return (f"| {name} | {profile.users} | {profile.spawn_rate:g}/s | {profile.duration_seconds} s | "
            f"<= {t.p95_ms:g} ms | <= {t.p99_ms:g} ms | <= {t.max_error_rate:.2%} | >= {t.min_rps:g} req/s |")


def _json_safe(value):
    """NaN (no request completed) is not JSON: it becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def capacity_stage(config: PipelineConfig, commit, candidate) -> TaskGroup:
    capacity = config.capacity
    with TaskGroup("6-capacity", tooltip="load tests at the expected and peak profiles") as group:
        group.doc_md = DOC.format(
            size=config.environments.sizes.capacity, locustfile=capacity.locustfile, bucket=config.aws.artifact_bucket,
            app=config.application, rows="\n".join(_row(n, p) for n, p in capacity.profiles().items()))

        environment, endpoint, teardown = run_environment(
            config, "capacity", config.environments.sizes.capacity, candidate, commit,
            image_of=lambda c: c.get("application_image"))

        def load_test_task(name: str, profile):
            @task(task_id=f"load_test_{name}", **config.environments.host_queue())
            def load_test(endpoint: str, commit: dict) -> dict:
                run_id = get_current_context()["run_id"]
                registry = ReleaseRegistry.for_config(config)

                def withdrawn() -> str | None:
                    return exploratory_ended(registry.get(commit["version"]) or {}, run_id)

                if reason := withdrawn():
                    _skip_withdrawn(registry, commit, run_id, reason)
                key = f"{run_id}-capacity-{name}"
                checkout = GitSource.from_repository(config.repository).checkout(
                    commit["sha"], workspace(config.application, key))
                reports = workspace(config.application, f"{key}-reports")
                try:
                    result = run_load_test(name, profile, capacity.locustfile, endpoint,
                                           checkout / config.commit_stage.workdir, reports, capacity.processes,
                                           env=config.commit_stage.env, logger=log, stop_when=withdrawn)
                    result.reports = _upload_reports(config, commit["version"], name, result.reports)
                except CommandStopped as stopped:
                    _skip_withdrawn(registry, commit, run_id, stopped.reason.removeprefix("was stopped: "))
                finally:
                    remove_workspace(config.application, key)
                    shutil.rmtree(reports, ignore_errors=True)
                log.info("load test %s against %s:\n%s", name, endpoint, summary_table([result]))
                summary = _json_safe(result.to_dict() | {"run_id": run_id, "finished_at": utcnow()})
                ReleaseRegistry.for_config(config).update(commit["version"], load_tests={name: summary})
                if not result.passed:
                    raise LoadTestFailed(failure_message(result))
                return summary

            return load_test

        expected = load_test_task("expected", capacity.expected)(endpoint, commit)
        peak = load_test_task("peak", capacity.peak)(endpoint, commit)

        @task(task_id="record_capacity")
        def record_capacity(commit: dict, expected: dict, peak: dict) -> dict:
            ctx = get_current_context()
            ReleaseRegistry.for_config(config).update(commit["version"], stages={"6-capacity": {
                "result": "success", "finished_at": utcnow(), "run_id": ctx["run_id"],
                "throughput_rps": {"expected": expected["throughput_rps"], "peak": peak["throughput_rps"]},
            }})
            return {"expected": expected["passed"], "peak": peak["passed"]}

        recorded = record_capacity(commit, expected, peak)
        chain(expected, peak)
        peak >> teardown.as_teardown(setups=environment)
        chain(peak, recorded)
    return group


def exploratory_ended(record: dict, run_id: str) -> str | None:
    """The exploratory decision of this run (the gate run has its id) that makes the load tests
    pointless (rejected, or none in time); a decision of an earlier run of the version is not."""
    decided = (record.get("approvals") or {}).get("exploratory") or {}
    if decided.get("run_id") == run_id and decided.get("decision") in (REJECTED, TIMED_OUT):
        by = f" by {decided['by']}" if decided.get("by") not in (None, "", "unknown") else ""
        return f"exploratory approval {decided['decision'].replace('_', ' ')}{by}: the release cannot go on"
    return None


def _skip_withdrawn(registry: ReleaseRegistry, commit: dict, run_id: str, reason: str):
    """End this branch of the fan-in at once, with the reason (the teardown still runs)."""
    registry.stage_skipped(commit["version"], "6-capacity", run_id, f"load tests stopped: {reason}")
    raise AirflowSkipException(f"load tests stopped: {reason}")


def _upload_reports(config: PipelineConfig, version: str, profile: str, files: dict[str, str]) -> dict[str, str]:
    s3, uris = aws.s3(config), {}
    for name, path in files.items():
        key = f"{config.application}/load-tests/{version}/{profile}/{name}"
        content_type = "text/html" if name.endswith(".html") else "text/csv"
        s3.upload_file(path, config.aws.artifact_bucket, key, ExtraArgs={"ContentType": content_type})
        uris[name] = f"s3://{config.aws.artifact_bucket}/{key}"
    return uris
