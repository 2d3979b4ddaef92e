"""The cost of waiting (issue 9, item 3): many pipeline runs waiting at an approval at once.

On the embedded default (demo config, with light load tests so that the runs reach their
approval sooner, and no polling schedule: the runs are started here), the seeded commit is
built first (it bakes; its exploratory approval is then rejected), then --runs application
commits are pushed and a pipeline run is triggered for each at once. When every run waits
at its exploratory approval (``5-exploratory.await_approval`` deferred, each gate's
``decision`` waiting for a person, nothing else of the runs queued or running), this
measures, several times over --settle seconds:

* worker slots in use: ``GET /pools`` (occupied, running, queued, deferred slots) and the
  task instances ``running`` in any DAG (target: 0, the waiting is deferred);
* RSS (psutil) of the scheduler (with its executor's worker processes), the triggerer,
  the DAG processor and the API server: before the runs, while they all wait, and after
  they were rejected.

Then every decision is marked failed (rejected), one run after the other, and the runs end, so
nothing is left. (Rejecting all 20 within seconds once stopped the triggerer: SQLite's lock,
see docs/PERFORMANCE.md; --reject-at-once does that.)
The JSON is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchstack import APP, PIPELINE, embedded, embedded_stack, loadavg, summary

BUCKET = "deployline-bench"
WAIT = "5-exploratory.await_approval"
GATE = f"{APP}_approve_exploratory"
ACTIVE = ("scheduled", "queued", "running", "up_for_retry", "restarting")
LIGHT_LOAD = {"p95_ms": 2000, "p99_ms": 5000, "max_error_rate": 0.01, "min_rps": 5}
CONFIG_CHANGES = {
    "polling": {"schedule": None},
    "capacity": {"locustfile": "tests/load/locustfile.py",
                 "expected": {"users": 2, "spawn_rate": 2, "duration_seconds": 3, "thresholds": LIGHT_LOAD},
                 "peak": {"users": 4, "spawn_rate": 4, "duration_seconds": 3, "thresholds": LIGHT_LOAD}},
}


def memory(bench) -> dict[str, float]:
    """RSS in MiB of each component, alone and with its child processes (the scheduler's are the
    LocalExecutor's workers and the task processes they run; the triggerer's, its trigger runner)."""
    import psutil

    found = {}
    for name, pid in bench.components().items():
        try:
            proc = psutil.Process(pid)
            children = proc.children(recursive=True)
            found[name] = round(_rss(proc) / 2**20, 1)
            found[f"{name}_with_children"] = round((_rss(proc) + sum(_rss(c) for c in children)) / 2**20, 1)
            found[f"{name}_children"] = len(children)
        except psutil.Error:
            continue
    return found


def _rss(proc) -> int:
    try:
        return proc.memory_info().rss
    except Exception:  # gone meanwhile
        return 0


def slots(api) -> dict:
    """Worker slots: the pools' counts, and task instances running or deferred in any DAG."""
    pools = {p["name"]: {k: p.get(k) for k in ("slots", "occupied_slots", "running_slots", "queued_slots",
                                                 "scheduled_slots", "deferred_slots", "open_slots")}
             for p in api.get("/pools", limit=100)["pools"]}
    counts = {}
    for state in ("running", "queued", "deferred", "awaiting_input", "up_for_reschedule"):
        counts[state] = api.get("/dags/~/dagRuns/~/taskInstances", state=state, limit=1)["total_entries"]
    return {"pools": pools, "task_instances": counts}


def states_of(api, run_id: str) -> dict[str, str | None]:
    return {t: ti["state"] for t, ti in api.task_instances(PIPELINE, run_id).items()}


def all_waiting(api, run_ids: list[str]) -> tuple[int, int]:
    """(runs waiting at the approval with nothing else active, runs ended or failed before it)."""
    waiting = ended = 0
    for run_id in run_ids:
        states = states_of(api, run_id)
        if states.get(WAIT) in ("failed", "upstream_failed", "skipped"):
            ended += 1
        elif states.get(WAIT) == "deferred" and not any(s in ACTIVE for s in states.values()):
            waiting += 1
    return waiting, ended


def decide(api, run_id: str, state: str, note: str) -> None:
    """Mark the gate's decision of ``run_id`` (once it waits)."""
    def waits():
        ti = api.get(f"/dags/{GATE}/dagRuns/{run_id}/taskInstances/decision")
        return ti.get("state") in ("deferred", "awaiting_input", "up_for_reschedule")

    embedded.wait_until(waits, 300, f"the decision of {run_id}", 1)
    api.set_task_state(GATE, run_id, "decision", state, note=note)


def reject_all(bench, api, approver, run_ids: list[str], at_once: bool) -> dict:
    """Reject every waiting run so nothing is left: one at a time, each run ended before the next
    (``at_once``: every decision first, then wait). Stops early when the triggerer is gone."""
    found = {"rejected": 0, "seconds_to_end": [], "left_running": [], "triggerer_alive": True}

    def ended(run_id: str) -> bool:
        return api.run(PIPELINE, run_id)["state"] in ("success", "failed")

    waiting = [r for r in run_ids if states_of(api, r).get(WAIT) == "deferred"]
    for run_id in waiting:
        decide(approver, run_id, "failed", "benchmark: rejected")
        found["rejected"] += 1
        if not at_once:
            started = time.time()
            try:
                embedded.wait_until(lambda r=run_id: ended(r), 180, f"{run_id} to end", 2)
                found["seconds_to_end"].append(round(time.time() - started, 1))
            except embedded.StackError:
                pass
        if "triggerer" not in bench.components():
            found["triggerer_alive"] = False
            break
    deadline = time.time() + 300
    while time.time() < deadline and found["triggerer_alive"]:
        if all(ended(r) for r in run_ids):
            break
        found["triggerer_alive"] = "triggerer" in bench.components()
        time.sleep(5)
    found["left_running"] = [r for r in run_ids if not ended(r)]
    found["seconds_to_end"] = summary(found["seconds_to_end"])
    if not found["triggerer_alive"]:
        print("the triggerer has exited: see triggerer.log (DEPLOYLINE_BENCH_KEEP_LOGS keeps it)", file=sys.stderr)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--settle", type=float, default=30, help="seconds of samples while all of them wait")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds for the runs to reach the approval")
    parser.add_argument("--reject-at-once", action="store_true",
                        help="reject every run at once at the end (else one after the other)")
    args = parser.parse_args()
    result: dict = {"runs": args.runs, "loadavg_before": loadavg()}
    with embedded_stack(BUCKET, config_changes=CONFIG_CHANGES) as bench:
        api, approver = bench.api, bench.approver()
        embedded.wait_until(lambda: api.get(f"/dags/{PIPELINE}/tasks"), 120, "the pipeline's tasks")
        pipeline = api.get(f"/dags/{PIPELINE}")
        result["max_active_runs"] = pipeline.get("max_active_runs")
        time.sleep(10)  # the components settle after start-up
        result["memory_before_mib"] = memory(bench)
        result["slots_before"] = slots(api)

        # The seeded commit first: it bakes the base image the application commits then reuse.
        seed_run = api.trigger(PIPELINE, conf={"commit": bench.seed}, run_id="bench__seed")["dag_run_id"]
        embedded.wait_until(lambda: all_waiting(api, [seed_run]) != (0, 0), 900, "the seeded run's approval", 3)
        decide(approver, seed_run, "failed", "benchmark: not this one")
        api.wait_for_run(PIPELINE, seed_run, timeout=600)

        shas = []
        for n in range(args.runs):
            (bench.clone / "NOTES.md").write_text(f"waiting sample {n}\n")
            embedded.git("add", "-A", cwd=bench.clone)
            embedded.git("commit", "--quiet", "-m", f"waiting sample {n}", cwd=bench.clone)
            shas.append(embedded.git("rev-parse", "HEAD", cwd=bench.clone))
        embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=bench.clone)
        started = time.time()
        run_ids = [api.trigger(PIPELINE, conf={"commit": sha}, run_id=f"bench__wait_{n:02d}")["dag_run_id"]
                   for n, sha in enumerate(shas)]
        peak_running = 0

        def reached():
            nonlocal peak_running
            peak_running = max(peak_running, slots(api)["task_instances"]["running"])
            waiting, ended = all_waiting(api, run_ids)
            print(f"{time.time() - started:6.0f}s: {waiting} waiting, {ended} ended (load {loadavg()})",
                  file=sys.stderr, flush=True)
            return waiting + ended == len(run_ids) and (waiting, ended)

        waiting, ended = embedded.wait_until(reached, args.timeout, f"{args.runs} runs to wait at the approval", 10)
        result["seconds_to_all_waiting"] = round(time.time() - started, 1)
        result["waiting_runs"], result["ended_before_approval"] = waiting, ended
        result["peak_running_task_instances_while_reaching"] = peak_running
        samples = []
        deadline = time.time() + args.settle
        while True:
            samples.append({"slots": slots(api), "memory_mib": memory(bench), "loadavg": loadavg()})
            if time.time() >= deadline:
                break
            time.sleep(5)
        result["while_waiting"] = {
            "samples": len(samples),
            "running_task_instances": summary([s["slots"]["task_instances"]["running"] for s in samples]),
            "queued_task_instances": summary([s["slots"]["task_instances"]["queued"] for s in samples]),
            "deferred_task_instances": summary([s["slots"]["task_instances"]["deferred"] for s in samples]),
            "awaiting_input_task_instances": summary(
                [s["slots"]["task_instances"]["awaiting_input"] for s in samples]),
            "default_pool_occupied": summary([s["slots"]["pools"]["default_pool"]["occupied_slots"]
                                              for s in samples]),
            "last": samples[-1],
        }
        result["memory_while_waiting_mib"] = samples[-1]["memory_mib"]
        print(f"while waiting: {json.dumps(result)}", file=sys.stderr, flush=True)  # kept if the rest fails
        result["cleanup"] = reject_all(bench, api, approver, run_ids, args.reject_at_once)
        time.sleep(10)
        result["memory_after_mib"] = memory(bench)
        result["slots_after"] = slots(api)
    result["loadavg_after"] = loadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
