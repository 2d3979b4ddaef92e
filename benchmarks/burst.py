"""A burst: commits to N applications arrive at once (issue 16, item 5).

Starts the embedded default (PostgreSQL, LocalExecutor) with N pipeline configs, each the
sample service in a repository of its own, all DAGs paused. Once every DAG is parsed, one commit
is pushed to each repository at the same moment, every pipeline and poll is unpaused and each
poll is triggered (what a push webhook does). Then it follows every run until it is a release
candidate (``3-acceptance.record_candidate``) or has failed, and reports: no component died
(the stack's supervisor saw no exit), every run progressed, the time until all were candidates,
and each application's time. Load tests are kept tiny: this measures orchestration, not Locust.

Prints one JSON line (``make bench`` reads the last line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchstack import DEMO_CONFIG, embedded_stack, loadavg  # noqa: E402
from deployline import embedded  # noqa: E402
from deployline.config import dump_config  # noqa: E402
from deployline.sensors import pipeline_run_id  # noqa: E402

CANDIDATE = "3-acceptance.record_candidate"
ENDED = ("success", "failed", "upstream_failed", "skipped")


def write_pipelines(root: Path, count: int) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """``count`` configs (app_01 ...), each with its own seeded bare repository and clone."""
    folder = root / "burst-pipelines"
    folder.mkdir(parents=True)
    repos = {}
    base = yaml.safe_load(DEMO_CONFIG.read_text())
    tiny = {"p95_ms": 5000, "p99_ms": 10000, "max_error_rate": 0.05, "min_rps": 0}
    for n in range(1, count + 1):
        app = f"burst_{n:02d}"
        bare, clone = root / "repos" / f"{app}.git", root / "clones" / app
        embedded.seed_repository(bare, clone)
        config = dict(base, application=app, repository={"url": str(bare), "branch": "main"},
                      polling={"schedule": "* * * * *", "poke_interval": 5, "timeout": 50})
        config["capacity"] = dict(base["capacity"],
                                  expected={"users": 1, "spawn_rate": 1, "duration_seconds": 2, "thresholds": tiny},
                                  peak={"users": 1, "spawn_rate": 1, "duration_seconds": 2, "thresholds": tiny})
        (folder / f"{app}.yaml").write_text(dump_config(config))
        repos[app] = (bare, clone)
    return folder, repos


def push_all_at_once(repos: dict[str, tuple[Path, Path]]) -> dict[str, str]:
    """Commit in every clone, then push them all from threads released together; app -> sha."""
    shas = {}
    for app, (_, clone) in repos.items():
        (clone / "BURST.md").write_text(f"burst commit of {app}\n")
        embedded.git("add", "-A", cwd=clone)
        embedded.git("commit", "--quiet", "-m", f"Burst change of {app}", cwd=clone)
        shas[app] = embedded.git("rev-parse", "HEAD", cwd=clone)
    go = threading.Barrier(len(repos))

    def push(clone: Path):
        go.wait()
        embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=clone)

    threads = [threading.Thread(target=push, args=(clone,)) for _, clone in repos.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return shas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--applications", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for every candidate")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deployline-burst-") as tmp:
        pipelines, repos = write_pipelines(Path(tmp), args.applications)
        overrides = {"AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True"}
        with embedded_stack("deployline-burst", overrides=overrides, pipelines_dir=pipelines) as bench:
            api = bench.api
            wanted = {f"{app}_{kind}" for app in repos for kind in ("pipeline", "commit_poll")}
            embedded.wait_until(lambda: wanted <= set(api.dag_ids()), 600, f"{len(wanted)} DAGs to be parsed", 3)
            load_before = loadavg()
            shas = push_all_at_once(repos)
            t0 = time.time()
            for dag_id in sorted(wanted):
                api.set_paused(dag_id, False)
            for app, sha in shas.items():
                api.trigger(f"{app}_commit_poll", run_id=f"push__{sha[:10]}")
            print(f"{len(shas)} commits pushed at once; unpausing took {time.time() - t0:.1f}s", file=sys.stderr)
            done: dict[str, dict] = {}
            progressed: set[str] = set()
            deadline = t0 + args.timeout
            while len(done) < len(shas) and time.time() < deadline:
                embedded.raise_if_a_stack_failed()
                for app, sha in shas.items():
                    if app in done:
                        continue
                    dag_id, run_id = f"{app}_pipeline", pipeline_run_id(sha)
                    try:
                        tis = api.task_instances(dag_id, run_id)
                    except Exception:  # the poll has not created the run yet
                        continue
                    if any(ti["state"] == "success" for ti in tis.values()):
                        progressed.add(app)
                    state = (tis.get(CANDIDATE) or {}).get("state")
                    failed = [t for t, ti in tis.items() if ti["state"] == "failed"]
                    if state in ENDED or failed:
                        done[app] = {"candidate": state == "success", "seconds": round(time.time() - t0, 1),
                                     "failed_tasks": failed}
                        print(f"{app}: {done[app]}", file=sys.stderr, flush=True)
                time.sleep(5)
            components_alive = sorted(bench.components())
            restarts = list(bench.stack.events)
    seconds = [d["seconds"] for d in done.values() if d["candidate"]]
    result = {
        "applications": len(shas),
        "candidates": len(seconds),
        "not_candidates": {app: d for app, d in done.items() if not d["candidate"]},
        "unfinished": sorted(set(shas) - set(done)),
        "every_run_progressed": progressed == set(shas),
        "components_alive_at_end": components_alive,
        "component_exits": restarts,
        "all_candidates_s": max(seconds) if len(seconds) == len(shas) else None,
        "first_candidate_s": min(seconds, default=None),
        "median_candidate_s": statistics.median(seconds) if seconds else None,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    print(json.dumps(result))
    return 0 if result["candidates"] == len(shas) and not restarts else 1


if __name__ == "__main__":
    sys.exit(main())
