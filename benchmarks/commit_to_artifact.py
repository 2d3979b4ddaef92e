"""End-to-end commit-to-artifact wall time on the embedded default, and each stage's wall time.

Starts moto, PostgreSQL and Airflow exactly as ``make demo`` does (the demo pipeline
config, its polling schedule), lets the seeded commit build, then pushes --commits
application commits one after the other and measures for each: push -> pipeline run
created (polling latency), run start -> run end (the pipeline itself) and push -> artifact
in S3 (the whole path), and per stage (task group) its wall time from its first task's
start to its last task's end.  The seeded commit bakes and builds (every stage runs);
the pushed commits are application commits (no baking).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchstack import APP, AirflowApi, embedded, embedded_stack, loadavg, pipeline_run_id, ts

BUCKET = "deployline-bench"


def follow(api: AirflowApi, sha: str, pushed_at: float) -> dict:
    dag_id, run_id = f"{APP}_pipeline", pipeline_run_id(sha)
    embedded.wait_until(lambda: any(r["dag_run_id"] == run_id for r in api.runs(dag_id)), 300, run_id, 0.5)
    # The run goes on to wait for exploratory approval: measure up to the release candidate.
    def candidate_recorded():
        state = api.task_instances(dag_id, run_id)["3-acceptance.record_candidate"]["state"]
        assert state not in ("failed", "upstream_failed", "skipped"), f"{run_id}: record_candidate {state}"
        return state == "success"

    embedded.wait_until(candidate_recorded, 900, f"{run_id} to record its candidate", 0.5)
    run = api.run(dag_id, run_id)
    stages: dict[str, list[float]] = {}
    tis = api.task_instances(dag_id, run_id)
    for task_id, ti in tis.items():
        if ti["state"] == "success" and "." in task_id:
            span = stages.setdefault(task_id.split(".")[0], [float("inf"), 0.0])
            span[0], span[1] = min(span[0], ts(ti["start_date"])), max(span[1], ts(ti["end_date"]))
    return {
        **{f"stage_{name}_s": round(end - start, 1) for name, (start, end) in sorted(stages.items())},
        "push_to_run_created_s": round(ts(run["queued_at"]) - pushed_at, 1),
        "run_to_candidate_s": round(ts(tis["3-acceptance.record_candidate"]["end_date"]) - ts(run["start_date"]), 1),
        "push_to_artifact_s": round(ts(tis["2-commit.publish_artifact"]["end_date"]) - pushed_at, 1),
        "push_to_candidate_s": round(ts(tis["3-acceptance.record_candidate"]["end_date"]) - pushed_at, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=3)
    args = parser.parse_args()
    with embedded_stack(BUCKET) as bench:
        api = bench.api
        first = follow(api, bench.seed, bench.started_at)
        print(f"seeded commit: {first}", file=sys.stderr)
        samples = []
        for n in range(args.commits):
            sha, pushed_at = bench.push_commit(f"bench {n}")
            sample = follow(api, sha, pushed_at)
            print(f"commit {n}: {sample}", file=sys.stderr)
            samples.append(sample)
    summary = {key: {"median": statistics.median(s[key] for s in samples), "max": max(s[key] for s in samples)}
               for key in samples[0]}
    print(json.dumps({"seeded_commit": first, "commits": len(samples), "samples": samples, "summary": summary,
                      "healthy_s": round(bench.healthy_s, 1), "loadavg": loadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
