"""Parse time of dags/ with N pipeline configs, against a bare ``import airflow.sdk``.

Measured the two ways Airflow parses (parse_time_driver.py, one fresh interpreter per run):

* **Per file, as the DAG processor does**: its parent has imported Airflow and its parsing
  code, froze the garbage collector's view of it, imported the ``airflow.*`` modules each DAG
  file imports itself (``parsing_pre_import_modules``, a one-time cost reported apart) and
  forks one child per file, which parses it (``BundleDagBag``) and serializes its DAGs.  Each
  file pays for its other imports: the per-file parse times add up to the processor's work for
  one pass over dags/.
* **In one process, as ``airflow dags report`` and the first measurement do**: ``import
  airflow.sdk``, then ``DagBag(dags/)``; "beyond the import" is the second part.

Reported per pipeline count: medians over --repeat runs, and the growth per further pipeline
between consecutive counts (linear growth shows as a constant).  ``--report-count N`` also runs
``airflow dags report -o json`` for N pipelines (temporary AIRFLOW_HOME and database) as a
cross-check.  The result is the last stdout line, as JSON.  ``--quick`` is the smoke test's
tiny run: it checks that the code works, its timings mean nothing.
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
DAGS = ROOT / "dags"
TEMPLATE = (ROOT / "include" / "pipelines" / "sample_service.yaml").read_text()

DRIVER = Path(__file__).with_name("parse_time_driver.py")  # one fresh interpreter's measurement


def write_configs(folder: Path, count: int) -> None:
    for n in range(count):
        app = f"app_{n:03d}"
        (folder / f"{app}.yaml").write_text(TEMPLATE.replace("application: sample_service", f"application: {app}"))


def dag_files() -> list[str]:
    return sorted(str(p) for p in DAGS.glob("*.py"))


def driver(env: dict, *args: str) -> dict:
    """A fresh interpreter running parse_time_driver.py; its JSON (Airflow may log before it)."""
    done = subprocess.run([sys.executable, str(DRIVER), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark interpreter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_file_run(env: dict) -> dict:
    return driver(env, "per-file", *dag_files())


def one_process_run(env: dict) -> dict:
    return driver(env, "one-process", str(DAGS))


def base_env(home: Path) -> dict:
    """Airflow in a throwaway home; bytecode cached (in the temporary folder, not the checkout),
    as a deployed Airflow has it after its first parse, whatever this shell says."""
    env = os.environ | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "PYTHONPATH": str(ROOT / "plugins"),
        "PYTHONPYCACHEPREFIX": str(home.parent / "pycache"),
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def median(values) -> float:
    return round(statistics.median(values), 3)


def clock_summary(kind: str, per_file: list[dict], one_process: list[dict]) -> dict:
    """Medians of one clock (``wall`` or ``cpu``); totals are medians of each run's sum.

    The one-process cost beyond the import is paired: each run's ``DagBag`` time after its own
    ``import airflow.sdk``, so that load from elsewhere between two interpreters does not skew it.
    """
    names = sorted(per_file[0]["files"])
    bare = median([r["bare_import"][kind] for r in per_file] + [r["bare_import"][kind] for r in one_process])
    files_total = median(sum(f["parse"][kind] for f in r["files"].values()) for r in per_file)
    beyond = median(r["beyond_import"][kind] for r in one_process)
    return {
        "bare_import_s": bare,
        "processor_parent_imports_s": median(r["parent_imports"][kind] for r in per_file),
        "processor_parent_pre_imports_s": median(r["parent_pre_imports"][kind] for r in per_file),
        "airflow_ms_per_bare_task": round(1000 * statistics.median(r["bare_task"]["decorated"][kind]
                                                                   for r in per_file), 3),
        "airflow_ms_per_bare_operator": round(1000 * statistics.median(r["bare_task"]["operator"][kind]
                                                                       for r in per_file), 3),
        "per_file_parse_s": {name: median(r["files"][name]["parse"][kind] for r in per_file) for name in names},
        "per_file_serialize_s": {name: median(r["files"][name]["serialize"][kind] for r in per_file)
                                 for name in names},
        "files_parse_total_s": files_total,
        "files_serialize_total_s": median(sum(f["serialize"][kind] for f in r["files"].values()) for r in per_file),
        "beyond_import_s": beyond,
        "files_parse_total_ratio": round(files_total / bare, 2),
        "beyond_import_ratio": round(beyond / bare, 2),
    }


def summarize(count: int, per_file: list[dict], one_process: list[dict]) -> dict:
    first = per_file[0]["files"]
    errors = {name: f["import_errors"] for name, f in first.items() if f["import_errors"]}
    if errors or one_process[0]["import_errors"]:
        raise RuntimeError(f"{count} pipelines: import errors {errors or one_process[0]}")
    return {
        "pipelines": count,
        "dags": sum(f["dags"] for f in first.values()),
        "tasks": sum(f["tasks"] for f in first.values()),
        "runs": len(per_file),
        "wall": clock_summary("wall", per_file, one_process),
        "cpu": clock_summary("cpu", per_file, one_process),
    }


def add_growth(results: list[dict]) -> None:
    """Milliseconds per further pipeline between consecutive counts, for both measures and clocks."""
    for before, after in zip(results, results[1:], strict=False):
        extra = after["pipelines"] - before["pipelines"]
        for kind in ("wall", "cpu"):
            after[kind]["growth_ms_per_pipeline"] = {
                measure: round(1000 * (after[kind][f"{measure}_s"] - before[kind][f"{measure}_s"]) / extra, 1)
                for measure in ("files_parse_total", "beyond_import")}


def pipelines_env(env: dict, tmp: Path, count: int) -> dict:
    folder = tmp / f"pipelines-{count}"
    folder.mkdir(exist_ok=True)
    write_configs(folder, count)
    return env | {"DEPLOYLINE_PIPELINES_DIR": str(folder)}


def measure(counts: list[int], repeat: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = base_env(Path(tmp) / "airflow")
        per_file_run(pipelines_env(env, Path(tmp), 1))  # warm the file and bytecode caches
        for count in counts:
            counted = pipelines_env(env, Path(tmp), count)
            # Interleaved, so that a burst of load from elsewhere hits both measures alike.
            per_file, one_process = [], []
            for _ in range(repeat):
                per_file.append(per_file_run(counted))
                one_process.append(one_process_run(counted))
            results.append(summarize(count, per_file, one_process))
    add_growth(results)
    return results


def dags_report(count: int) -> dict:
    """``airflow dags report -o json`` for ``count`` pipelines: per-file durations as Airflow prints them.

    It parses every file in one process (the CLI's), after ``airflow db migrate`` of a throwaway
    SQLite database: the command refuses to run without one.
    """
    airflow = Path(sys.executable).with_name("airflow")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipelines"
        folder.mkdir()
        write_configs(folder, count)
        env = base_env(Path(tmp) / "airflow") | {"DEPLOYLINE_PIPELINES_DIR": str(folder)}
        migrated = subprocess.run([str(airflow), "db", "migrate"], env=env, capture_output=True, text=True)
        if migrated.returncode != 0:
            return {"pipelines": count, "skipped": f"airflow db migrate failed: {migrated.stderr[-500:]}"}
        done = subprocess.run([str(airflow), "dags", "report", "-o", "json"], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            return {"pipelines": count, "skipped": f"airflow dags report failed: {done.stderr[-500:]}"}
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {"pipelines": count,
            "per_file_s": {row["file"]: round(duration_seconds(row["duration"]), 3) for row in rows},
            "dags": sum(int(row["dag_num"]) for row in rows), "tasks": sum(int(row["task_num"]) for row in rows)}


def duration_seconds(text: str) -> float:
    """``0:00:01.234567`` (a timedelta as the CLI prints it) in seconds."""
    hours, minutes, seconds = text.split(":")
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,10,50,200")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--report-count", type=int, default=None,
                        help="also run `airflow dags report` with this many pipelines")
    parser.add_argument("--quick", action="store_true", help="2 pipelines, one run, no dags report")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.repeat, args.report_count = "2", 1, None
    results = {"load_average_before": os.getloadavg()[0],
               "parse": measure([int(c) for c in args.counts.split(",")], args.repeat)}
    if args.report_count is not None:
        results["dags_report"] = dags_report(args.report_count)
    results["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
