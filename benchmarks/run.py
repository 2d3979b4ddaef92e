"""``make bench``: every benchmark, results printed and kept in benchmarks/results/latest.json.

``benchmarks/run.py NAME...`` runs only those and updates their entries in the file.  Each
result is written as soon as its benchmark ends, and a failed benchmark does not stop the
others: it is recorded with its error, and the exit code is 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "latest.json"
BENCHMARKS = {
    "parse_time": ["parse_time.py", "--counts", "1,10,50,200", "--repeat", "5", "--report-count", "50"],
    "commit_to_artifact": ["commit_to_artifact.py", "--commits", "3"],
    "ami_sensor_latency": ["ami_sensor_latency.py", "--samples", "5"],
    "capacity_and_switch": ["capacity_and_switch.py"],
    "orchestration": ["orchestration.py", "--releases", "3"],
    "orchestration_airflow_defaults": ["orchestration.py", "--releases", "3", "--airflow-defaults"],
    # The embedded default's database against the old one, and the Celery cluster (issue 16).
    "orchestration_sqlite": ["orchestration.py", "--releases", "3", "--database", "sqlite"],
    "orchestration_celery": ["orchestration.py", "--releases", "3", "--celery"],
    "burst": ["burst.py", "--applications", "20"],
    "aws_wait_slots": ["aws_wait_slots.py", "--hold", "20"],
    "waiting_cost": ["waiting_cost.py", "--runs", "20"],
    "polling": ["polling.py", "--pokes", "50", "--pushes", "6"],
}


def run(name: str) -> dict:
    argv = BENCHMARKS[name]
    done = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], capture_output=True, text=True)
    sys.stderr.write(done.stderr[-2000:])
    if done.returncode != 0:
        return {"failed": f"exit code {done.returncode}", "stderr": done.stderr[-2000:]}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])  # logs may come before it
    except (IndexError, json.JSONDecodeError) as exc:
        return {"failed": f"the last line of its output is not its JSON result ({exc})", "stdout": done.stdout[-500:]}


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    results = json.loads(OUT.read_text()) if names and OUT.exists() else {}
    failed = []
    for name in names or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        results[name] = run(name)
        print(json.dumps(results[name], indent=2), flush=True)
        if "failed" in results[name]:
            failed.append(name)
            print(f"{name} failed: {results[name]['failed']}", file=sys.stderr)
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {OUT}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
