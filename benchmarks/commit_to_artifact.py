"""End-to-end commit-to-artifact wall time on the embedded default.

Starts moto and ``airflow standalone`` exactly as ``make demo`` does (the demo pipeline
config, its polling schedule), lets the seeded commit build, then pushes --commits
application commits one after the other and measures for each: push -> pipeline run
created (polling latency), run start -> run end (the pipeline itself) and push -> artifact
in S3 (the whole path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from deployline import embedded  # noqa: E402
from deployline.airflow_api import AirflowApi  # noqa: E402
from deployline.sensors import pipeline_run_id  # noqa: E402

APP, BUCKET = "sample_service", "deployline-bench"


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def follow(api: AirflowApi, sha: str, pushed_at: float) -> dict:
    dag_id, run_id = f"{APP}_pipeline", pipeline_run_id(sha)
    embedded.wait_until(lambda: any(r["dag_run_id"] == run_id for r in api.runs(dag_id)), 300, run_id, 0.5)
    run = api.wait_for_run(dag_id, run_id, timeout=900, interval=0.5)
    assert run["state"] == "success", run
    return {
        "push_to_run_created_s": round(ts(run["queued_at"]) - pushed_at, 1),
        "run_duration_s": round(ts(run["end_date"]) - ts(run["start_date"]), 1),
        "push_to_artifact_s": round(ts(run["end_date"]) - pushed_at, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=3)
    args = parser.parse_args()
    stack = embedded.Stack()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            moto = embedded.start_moto(stack, embedded.free_port(), root / "moto.log")
            embedded.ensure_bucket(moto, BUCKET)
            bare, clone = root / "repo.git", root / "clone"
            seed = embedded.seed_repository(bare, clone)
            env = embedded.airflow_env(root / "airflow", embedded.free_port(), moto, {
                "DEPLOYLINE_DEMO_REPO": str(bare), "DEPLOYLINE_ARTIFACT_BUCKET": BUCKET})
            started = time.time()
            base = embedded.start_airflow(stack, env, root / "airflow.log")
            print(f"airflow standalone healthy in {time.time() - started:.1f}s", file=sys.stderr)
            api = AirflowApi(base, "admin", embedded.admin_password(root / "airflow"))
            first = follow(api, seed, started)
            print(f"seeded commit: {first}", file=sys.stderr)
            samples = []
            for n in range(args.commits):
                (clone / "NOTES.md").write_text(f"change {n}\n")
                embedded.git("add", "-A", cwd=clone)
                embedded.git("commit", "--quiet", "-m", f"bench {n}", cwd=clone)
                sha = embedded.git("rev-parse", "HEAD", cwd=clone)
                pushed_at = time.time()
                embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=clone)
                sample = follow(api, sha, pushed_at)
                print(f"commit {n}: {sample}", file=sys.stderr)
                samples.append(sample)
        finally:
            stack.stop()
    summary = {key: {"median": statistics.median(s[key] for s in samples), "max": max(s[key] for s in samples)}
               for key in samples[0]}
    print(json.dumps({"commits": len(samples), "samples": samples, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
