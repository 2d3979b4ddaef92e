"""``make bench``: every benchmark, results printed and kept in benchmarks/results/latest.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "parse_time": ["parse_time.py", "--counts", "1,10,50,200", "--repeat", "5", "--report-count", "50"],
    "commit_to_artifact": ["commit_to_artifact.py", "--commits", "3"],
    "ami_sensor_latency": ["ami_sensor_latency.py", "--samples", "5"],
    "capacity_and_switch": ["capacity_and_switch.py"],
    "orchestration": ["orchestration.py", "--releases", "3"],
    "orchestration_airflow_defaults": ["orchestration.py", "--releases", "3", "--airflow-defaults"],
    "waiting_cost": ["waiting_cost.py", "--runs", "20"],
    "polling": ["polling.py", "--pokes", "50", "--pushes", "6"],
}


def main() -> int:
    results = {}
    for name, argv in BENCHMARKS.items():
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], capture_output=True, text=True)
        sys.stderr.write(done.stderr[-2000:])
        if done.returncode != 0:
            print(f"{name} failed with exit code {done.returncode}", file=sys.stderr)
            return done.returncode
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])  # logs may come before it
        print(json.dumps(results[name], indent=2))
    out = HERE / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
