"""Parse time of dags/ with N pipeline configs, against a bare ``import airflow.sdk``.

Each measurement runs in a fresh interpreter, as the DAG processor parses a file in a
fresh process: (a) ``import airflow.sdk`` alone, (b) the same import and then
``DagBag`` over dags/ with N generated configs (5 DAGs each, plus the reaper).
Reported: medians over --repeat runs and the cost beyond the import ((b) - (a)).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (ROOT / "include" / "pipelines" / "sample_service.yaml").read_text()

BARE = "import time; t=time.perf_counter(); import airflow.sdk; print(time.perf_counter()-t)"
PARSE = f"""
import time, sys
t = time.perf_counter()
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(ROOT / 'dags')!r})
assert not bag.import_errors, bag.import_errors
print(time.perf_counter() - t, len(bag.dags))
"""


def write_configs(folder: Path, count: int) -> None:
    for n in range(count):
        app = f"app_{n:03d}"
        (folder / f"{app}.yaml").write_text(TEMPLATE.replace("application: sample_service", f"application: {app}"))


def timed(code: str, env: dict) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]


def measure(counts: list[int], repeat: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base_env = os.environ | {
            "AIRFLOW_HOME": str(Path(tmp) / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": str(ROOT / "plugins"),
        }
        timed(BARE, base_env)  # warm the file cache once
        bare = statistics.median(timed(BARE, base_env)[0] for _ in range(repeat))
        for count in counts:
            folder = Path(tmp) / f"pipelines-{count}"
            folder.mkdir()
            write_configs(folder, count)
            env = base_env | {"DEPLOYLINE_PIPELINES_DIR": str(folder)}
            runs = [timed(PARSE, env) for _ in range(repeat)]
            dags = int(runs[0][1])
            assert dags > count, runs  # every pipeline config gave its DAGs
            total = statistics.median(r[0] for r in runs)
            results.append({"pipelines": count, "dags": dags, "bare_import_s": round(bare, 3),
                            "import_and_parse_s": round(total, 3), "beyond_import_s": round(total - bare, 3),
                            "per_pipeline_ms": round(1000 * (total - bare) / count, 1)})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1,50")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = measure([int(c) for c in args.counts.split(",")], args.repeat)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
