"""Orchestration overhead (issue 9, items 2 and 5): commit to production on the embedded default.

Starts moto, PostgreSQL and Airflow as ``make demo`` does (the demo pipeline config, its
polling schedule). An auto-approver thread marks each approval gate's ``decision`` success
through the REST API, as user ``approver``, as soon as it waits. The seeded first release
(it bakes: every stage runs) and then --releases pushed application commits go to
production one after the other. Per release, from the REST API's task instances:

* push -> production (end of ``8-production.deploy``), push -> run created, run start ->
  deploy end;
* the critical path to the deploy (orchestration_analysis), the sum of its tasks'
  durations, with and without the sensors' waiting;
* the gaps (a task's start - its latest upstream's end): median and worst, over all tasks
  and on the critical path;
* per stage: wall time, split into gaps, sensor waiting and work (start-up included).

``--airflow-defaults`` drops Deployline's scheduler/DAG-processor/parallelism settings from
``airflow_env``; ``--set KEY=VALUE`` adds an Airflow setting (to try a tuning). The JSON is
the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from benchstack import APP, PIPELINE, AirflowApi, embedded, embedded_stack, loadavg, summary, ts, tuning_of
from orchestration_analysis import analyse_run, sensor_ids

BUCKET = "deployline-bench"
DEPLOY = "8-production.deploy"
GATES = ("exploratory", "production")
WAITING = ("deferred", "awaiting_input", "up_for_reschedule")  # a gate's decision that waits for a person
FINISHED = ("success", "failed")
RAW = None  # a folder for each release's run, tasks and task instances as the REST API gave them (--raw)


class AutoApprover:
    """Marks every waiting ``decision`` of the gates success, as ``approver``, from a thread."""

    def __init__(self, api: AirflowApi, interval: float = 0.5):
        self.api, self.interval = api, interval
        self.marked: dict[tuple[str, str], dict] = {}  # (gate, run id) -> when it was seen and marked
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for gate in GATES:
                try:
                    self._look(gate)
                except Exception as exc:  # the API may be busy: look again
                    self.errors.append(f"{gate}: {exc}"[:300])
            self._stop.wait(self.interval)

    def _look(self, gate: str):
        gate_dag = f"{APP}_approve_{gate}"
        for run in self.api.get(f"/dags/{gate_dag}/dagRuns", state="running", limit=100)["dag_runs"]:
            key = (gate, run["dag_run_id"])
            if key in self.marked:
                continue
            ti = self.api.get(f"/dags/{gate_dag}/dagRuns/{run['dag_run_id']}/taskInstances/decision")
            if ti.get("state") in WAITING:
                seen = time.time()
                self.api.set_task_state(gate_dag, run["dag_run_id"], "decision", "success",
                                        note="approved by benchmarks/orchestration.py")
                self.marked[key] = {"decision_start": ts(ti.get("start_date")), "seen": seen, "marked": time.time()}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def task_logs(api: AirflowApi, run_id: str, task_instances: list[dict], sensors: set[str]) -> dict[str, list]:
    """task id -> the events of its last try's log, for the tasks that ran (sensors left out)."""
    logs = {}
    for ti in task_instances:
        if ti["task_id"] in sensors or ti.get("state") != "success" or not ti.get("try_number"):
            continue
        path = f"/dags/{PIPELINE}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}"
        try:
            logs[ti["task_id"]] = api.request("GET", path, params={"full_content": True},
                                              headers={"Accept": "application/json"})["content"]
        except Exception as exc:  # a missing log only leaves that task's start-up unmeasured
            print(f"no log of {ti['task_id']}: {exc}", file=sys.stderr)
    return logs


def release(bench, approver: AutoApprover, sha: str, pushed_at: float | None, tasks: dict,
            timeout: float = 1500) -> dict:
    """Follow the polled run of ``sha`` to its end; the figures of that release."""
    api = bench.api
    created = bench.wait_for_polled_run(sha)
    run_id = created["dag_run_id"]
    run = embedded.wait_until(lambda: (r := api.run(PIPELINE, run_id))["state"] in FINISHED and r, timeout,
                              f"{run_id} to finish", 2)
    tis = api.get(f"/dags/{PIPELINE}/dagRuns/{run_id}/taskInstances", limit=1000)
    logs = task_logs(api, run_id, tis["task_instances"], sensor_ids(tasks))
    if RAW:
        RAW.mkdir(parents=True, exist_ok=True)
        (RAW / f"{run_id}.json").write_text(json.dumps({"run": run, "tasks": tasks, "task_instances": tis,
                                                         "logs": logs}))
    by_id = {ti["task_id"]: ti for ti in tis["task_instances"]}
    if run["state"] != "success" or (by_id.get(DEPLOY) or {}).get("state") != "success":
        states = {t: ti["state"] for t, ti in sorted(by_id.items())}
        raise embedded.StackError(f"{run_id} ended {run['state']}: {states}")
    analysis = analyse_run(run, tasks, tis, target=DEPLOY, logs=logs)
    deploy_end = ts(by_id[DEPLOY]["end_date"])
    approvals = {}
    for gate, stage in zip(GATES, ("5-exploratory", "8-production"), strict=True):
        mark = approver.marked.get((gate, run_id)) or {}
        wait = by_id.get(f"{stage}.await_approval") or {}
        approvals[gate] = {
            # The gate's decision started waiting -> the approver marked it (this script's latency).
            "asked_to_marked_s": round(mark["marked"] - mark["decision_start"], 2) if mark.get("decision_start")
            else None,
            # Marked -> the pipeline's await_approval ended (the trigger's poke, the task's resumption).
            "marked_to_resumed_s": round(ts(wait["end_date"]) - mark["marked"], 2)
            if mark and wait.get("end_date") else None,
            "await_approval_s": round(ts(wait["end_date"]) - ts(wait["start_date"]), 2)
            if wait.get("end_date") and wait.get("start_date") else None,
        }
    result = {
        "run_id": run_id,
        "sha": sha,
        "loadavg": loadavg(),
        "push_to_production_s": round(deploy_end - pushed_at, 2) if pushed_at else None,
        "push_to_run_created_s": round(ts(run["queued_at"]) - pushed_at, 2) if pushed_at else None,
        "run_created_to_start_s": round(ts(run["start_date"]) - ts(run["queued_at"]), 2),
        "approvals": approvals,
        **analysis,
    }
    return result


def idle_cpu(bench, seconds: float) -> dict:
    """Share of one core each component uses while no pipeline runs (the poll still runs each minute)."""
    import psutil

    def cpu() -> dict[str, float]:
        found = {}
        for name, pid in bench.components().items():
            try:
                times = psutil.Process(pid).cpu_times()
                found[name] = times.user + times.system
            except psutil.Error:
                continue
        return found

    before, started = cpu(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = cpu(), time.monotonic() - started
    shares = {f"{name}_core_share": round((after[name] - before[name]) / elapsed, 3)
              for name in after if name in before}
    return {"seconds": round(elapsed, 1), "loadavg": loadavg(), **shares}


def report(samples: list[dict]) -> dict:
    """Medians and worst over the releases; gaps pooled over every task of them."""
    def pick(key):
        return [s[key] for s in samples if s.get(key) is not None]

    stages: dict[str, dict[str, list]] = {}
    for s in samples:
        for name, st in s["stages"].items():
            for key in ("wall_s", "gaps_s", "waiting_s", "work_s", "startup_s", "entry_gap_s"):
                stages.setdefault(name, {}).setdefault(key, []).append(st[key])
            stages[name].setdefault("dominated_by", []).append(st["dominated_by"])
    return {
        "releases": len(samples),
        **{key: summary(pick(key)) for key in (
            "push_to_production_s", "push_to_run_created_s", "run_created_to_start_s", "run_start_to_target_end_s",
            "critical_path_sum_s", "critical_path_sensor_s", "critical_path_gaps_s", "overhead_ratio",
            "startup_estimate_s")},
        "startup_measured_median_s": summary(
            [s["startup_measured"]["startup_s"]["median"] for s in samples if s.get("startup_measured")]),
        "parse_measured_median_s": summary(
            [s["startup_measured"]["parse_s"]["median"] for s in samples if s.get("startup_measured")]),
        "wrapup_measured_median_s": summary(
            [s["startup_measured"]["wrapup_s"]["median"] for s in samples if s.get("startup_measured")]),
        "critical_path_startup_s": summary(
            [s["startup_measured"]["critical_path_startup_s"] for s in samples if s.get("startup_measured")]),
        "critical_path_wrapup_s": summary(
            [s["startup_measured"]["critical_path_wrapup_s"] for s in samples if s.get("startup_measured")]),
        "gap_medians_all": summary([s["gaps_all"]["median"] for s in samples]),
        "gap_worst_all": summary([s["gaps_all"]["max"] for s in samples]),
        "gap_medians_critical_path": summary([s["gaps_critical_path"]["median"] for s in samples]),
        "gap_worst_critical_path": summary([s["gaps_critical_path"]["max"] for s in samples]),
        "approval_marked_to_resumed_s": summary(
            [a["marked_to_resumed_s"] for s in samples for a in s["approvals"].values()]),
        "stages": {name: {k: (summary(v) if k != "dominated_by" else sorted(set(v))) for k, v in d.items()}
                   for name, d in stages.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", type=int, default=3, help="pushed application commits taken to production")
    parser.add_argument("--airflow-defaults", action="store_true",
                        help="without Deployline's scheduler, DAG processor and parallelism settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an Airflow setting for this run (empty VALUE removes it)")
    parser.add_argument("--idle-seconds", type=float, default=30,
                        help="after the releases, measure the components' CPU use this long (0: not at all)")
    parser.add_argument("--raw", type=Path, help="keep each release's REST API answers in this folder")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres",
                        help="Airflow's metadata database (sqlite: the old embedded default, to compare)")
    parser.add_argument("--celery", action="store_true",
                        help="the Celery cluster of make test-distributed (two workers) instead of the LocalExecutor")
    args = parser.parse_args()
    global RAW
    RAW = args.raw
    overrides = dict(item.split("=", 1) for item in args.set)
    load_before = loadavg()
    with embedded_stack(BUCKET, args.airflow_defaults, overrides, database=args.database,
                        celery=args.celery) as bench:
        tasks = embedded.wait_until(lambda: bench.api.get(f"/dags/{PIPELINE}/tasks"), 120, "the pipeline's tasks")
        with AutoApprover(bench.approver()) as approver:
            first = release(bench, approver, bench.seed, None, tasks)
            first["start_to_production_s"] = round(
                first["run_start_to_target_end_s"] + ts(bench.api.run(PIPELINE, first["run_id"])["start_date"])
                - bench.started_at, 2)
            print(f"seeded release: {_short(first)}", file=sys.stderr, flush=True)
            samples = []
            for n in range(args.releases):
                sha, pushed_at = bench.push_commit(f"bench release {n}")
                sample = release(bench, approver, sha, pushed_at, tasks)
                print(f"release {n}: {_short(sample)}", file=sys.stderr, flush=True)
                samples.append(sample)
        idle = idle_cpu(bench, args.idle_seconds) if args.idle_seconds else None
        settings = tuning_of(bench.env)
        healthy = bench.healthy_s
        database = bench.database
    result = {
        "airflow_defaults": args.airflow_defaults,
        "database": database,
        "settings": settings,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "healthy_s": round(healthy, 1),
        "summary": report(samples) if samples else None,
        "seeded_release": first,
        "releases": samples,
        "idle_cpu": idle,
        "approver_errors": approver.errors[:5],
    }
    print(json.dumps(result))
    return 0


def _short(sample: dict) -> dict:
    keys = ("push_to_production_s", "push_to_run_created_s", "run_start_to_target_end_s", "critical_path_sum_s",
            "critical_path_sensor_s", "critical_path_gaps_s", "gaps_all", "gaps_critical_path", "startup_estimate_s",
            "startup_measured", "approvals", "loadavg")
    return {k: sample.get(k) for k in keys} | {
        "stages": {n: (s["wall_s"], s["gaps_s"], s["waiting_s"], s["work_s"]) for n, s in sample["stages"].items()}}


if __name__ == "__main__":
    sys.exit(main())
