"""Polling (issue 9, item 4): the cost of one poll with no new commit, and push -> pipeline run.

(a) ``--pokes N``: against a local bare repository (seeded as ``make demo`` seeds it), N pokes of
    the poll's ``GitCommitSensor`` when the head commit already has its pipeline run (the
    answer "no new commit"), and N bare ``GitSource.head()`` calls. Each is timed; git's own
    trace (``GIT_TRACE2_EVENT``) records every git process the poke started, so the result says
    what ran against the remote: the expected one ``ls-remote`` (whose ``upload-pack`` on the
    repository's side lists the refs), no ``fetch`` or ``clone``.
(b) ``--pushes N``: on the embedded default at the demo config's polling settings (a poll run
    every minute, a look every 10 s for up to 50 s), N commits pushed at random moments:
    push -> pipeline run created and -> run started. Each run is marked failed once it has
    started (its building is not what is measured here).

The JSON is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchstack import PIPELINE, embedded, embedded_stack, loadavg, summary, ts

BUCKET = "deployline-bench"


class _TaskInstance:
    """What the sensor asks of its task instance: whether the commit has a pipeline run."""

    def __init__(self, existing: int):
        self.existing = existing

    def get_dr_count(self, dag_id, run_ids=None, **_):
        return self.existing


def trace_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def git_processes(events: list[dict]) -> list[list[str]]:
    """argv of every git process in a trace2 event log (children of git, such as upload-pack, too)."""
    return [e["argv"] for e in events if e.get("event") == "start"]


def classify(processes: list[list[str]]) -> dict[str, int]:
    """How many git processes of each command: ls-remote, upload-pack (the remote side), fetch, clone..."""
    counts: dict[str, int] = {}
    for argv in processes:
        name = os.path.basename(argv[0])
        command = name[4:] if name.startswith("git-") else (argv[1] if len(argv) > 1 else name)
        counts[command] = counts.get(command, 0) + 1
    return dict(sorted(counts.items()))


def measure_pokes(pokes: int, workdir: Path) -> dict:
    """Time the poll sensor's poke and ``GitSource.head()`` against a local bare repository."""
    from deployline.sensors import GitCommitSensor, pipeline_run_id
    from deployline.sources import GitSource

    bare, clone = workdir / "repo.git", workdir / "clone"
    head = embedded.seed_repository(bare, clone)
    sensor = GitCommitSensor(task_id="wait_for_commit", url=str(bare), branch="main",
                             pipeline_dag_id=PIPELINE, poke_interval=10, timeout=50)
    context = {"ti": _TaskInstance(existing=1)}  # the head already has its run: nothing new
    results = {}
    for name, call in (("poke", lambda: sensor.poke(context)), ("head", lambda: GitSource(str(bare), "main").head())):
        call()  # warm: the first call imports and fills the page cache
        durations, per_call = [], []
        for n in range(pokes):
            trace = workdir / f"trace-{name}-{n}.json"
            os.environ["GIT_TRACE2_EVENT"] = str(trace)
            try:
                started = time.perf_counter()
                answer = call()
                durations.append(time.perf_counter() - started)
            finally:
                del os.environ["GIT_TRACE2_EVENT"]
            per_call.append(classify(git_processes(trace_events(trace))))
        assert answer in (False, head), answer  # poke: no new commit; head: the seeded sha
        kinds = {json.dumps(c, sort_keys=True) for c in per_call}
        results[name] = {
            "calls": pokes,
            "median_s": round(statistics.median(durations), 4),
            "p90_s": round(sorted(durations)[int(0.9 * (len(durations) - 1))], 4),
            "max_s": round(max(durations), 4),
            # The same git processes on every call (else each different set is listed).
            "git_processes_per_call": per_call[0] if len(kinds) == 1 else sorted(kinds),
        }
    results["run_id_checked"] = pipeline_run_id(head)
    return results


def measure_pushes(pushes: int, seed: int = 9) -> dict:
    """push -> pipeline run created / started, at the demo config's polling schedule."""
    rng = random.Random(seed)
    samples = []
    with embedded_stack(BUCKET) as bench:
        api = bench.api

        def fail_once_started(run_id: str) -> dict:
            run = embedded.wait_until(lambda: (r := api.run(PIPELINE, run_id))["start_date"] and r, 120,
                                      f"{run_id} to start", 0.5)
            api.request("PATCH", f"/dags/{PIPELINE}/dagRuns/{run_id}", json={"state": "failed"})
            return run

        # The seeded commit's run is started by the first poll; it is not built either.
        fail_once_started(bench.wait_for_polled_run(bench.seed)["dag_run_id"])
        for n in range(pushes):
            time.sleep(rng.uniform(0, 60))  # a random moment of the poll's one-minute cycle
            sha, pushed_at = bench.push_commit(f"poll sample {n}")
            run = fail_once_started(bench.wait_for_polled_run(sha, 240)["dag_run_id"])
            sample = {"push_to_run_created_s": round(ts(run["queued_at"]) - pushed_at, 2),
                      "push_to_run_started_s": round(ts(run["start_date"]) - pushed_at, 2),
                      "pushed_at_second": round(pushed_at % 60, 1), "loadavg": loadavg()}
            print(f"push {n}: {sample}", file=sys.stderr, flush=True)
            samples.append(sample)
    return {
        "samples": samples,
        "push_to_run_created_s": summary([s["push_to_run_created_s"] for s in samples]),
        "push_to_run_started_s": summary([s["push_to_run_started_s"] for s in samples]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pokes", type=int, default=50)
    parser.add_argument("--pushes", type=int, default=0, help="push samples on the embedded stack (0: none)")
    args = parser.parse_args()
    result = {"loadavg_before": loadavg()}
    with tempfile.TemporaryDirectory(prefix="deployline-poll-") as tmp:
        result["no_new_commit"] = measure_pokes(args.pokes, Path(tmp))
    if args.pushes:
        result["push_to_run"] = measure_pushes(args.pushes)
    result["loadavg_after"] = loadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
