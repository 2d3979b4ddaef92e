"""Parse time of dags/ with N pipeline configs, against a bare ``import airflow.sdk``.

Measured the two ways Airflow parses:

* **Per file, as the DAG processor does.**  The processor's parent has imported Airflow and
  its parsing code, freezes its objects for the garbage collector (``gc.freeze()``) and forks
  one child per DAG file; the child runs ``BundleDagBag(file)`` and serializes its DAGs.  Here
  a fresh driver interpreter does the same (timing its own ``import airflow.sdk`` first, the
  bare import), forks once per file of dags/ and times the child's parse and serialization.
  Each file pays for its own imports: the per-file parse times add up to the processor's work
  for one pass over dags/.
* **In one process, as ``airflow dags report`` and the old measurement do**: a fresh
  interpreter imports ``airflow.sdk`` and then runs ``DagBag(dags/)``; "beyond the import" is
  its time minus the bare import.

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

# The driver: bare import, then the processor's parent state, then one fork per DAG file.
# Children report on a pipe; their stdout and stderr (Airflow's logs) go to /dev/null.
PER_FILE = r"""
import time
started = time.perf_counter()
import airflow.sdk
bare = time.perf_counter() - started

import gc, json, logging, os, sys, traceback
from pathlib import Path
started = time.perf_counter()
from airflow.dag_processing.processor import _serialize_dags
from airflow.dag_processing.dagbag import BundleDagBag
from airflow.utils.dag_version_inflation_checker import check_dag_file_stability
parent_imports = time.perf_counter() - started
gc.freeze()  # as DagFileProcessorManager.before_run does


def parse_in_child(path, out):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    started = time.perf_counter()
    check_dag_file_stability(path)
    bag = BundleDagBag(dag_folder=path, bundle_path=Path(path).parent, bundle_name="dags", load_op_links=False)
    parsed = time.perf_counter()
    serialized, errors = _serialize_dags(bag, logging.getLogger("parse_time"))
    done = time.perf_counter()
    os.write(out, json.dumps({
        "parse_s": parsed - started, "serialize_s": done - parsed, "dags": len(serialized),
        "tasks": sum(len(d.tasks) for d in bag.dags.values()), "import_errors": len(bag.import_errors | errors),
    }).encode())
    os.close(out)


files = {}
for path in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            parse_in_child(path, write)
        except BaseException:
            os.write(write, json.dumps({"failed": traceback.format_exc()}).encode())
        finally:
            os._exit(0)  # never run the parent's code in the child
    os.close(write)
    with os.fdopen(read) as pipe:
        result = json.loads(pipe.read())
    os.waitpid(pid, 0)
    if "failed" in result:
        sys.exit(f"parsing {path} failed in the child:\n{result['failed']}")
    files[os.path.basename(path)] = result
print(json.dumps({"bare_import_s": bare, "parent_imports_s": parent_imports, "files": files}))
"""

ONE_PROCESS = r"""
import time
started = time.perf_counter()
import airflow.sdk
imported = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
import sys
bag = DagBag(dag_folder=sys.argv[1])
done = time.perf_counter()
print(f"{imported - started} {done - imported} {len(bag.dags)} {len(bag.import_errors)}")
"""


def write_configs(folder: Path, count: int) -> None:
    for n in range(count):
        app = f"app_{n:03d}"
        (folder / f"{app}.yaml").write_text(TEMPLATE.replace("application: sample_service", f"application: {app}"))


def dag_files() -> list[str]:
    return sorted(str(p) for p in DAGS.glob("*.py"))


def python(code: str, args: list[str], env: dict) -> str:
    """Run ``code`` in a fresh interpreter; its last stdout line (Airflow may log before it)."""
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark interpreter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def per_file_run(env: dict) -> dict:
    return json.loads(python(PER_FILE, dag_files(), env))


def one_process_run(env: dict) -> dict:
    bare, beyond, dags, errors = python(ONE_PROCESS, [str(DAGS)], env).split()
    return {"bare_import_s": float(bare), "beyond_import_s": float(beyond), "dags": int(dags),
            "import_errors": int(errors)}


def base_env(home: Path) -> dict:
    return os.environ | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "PYTHONPATH": str(ROOT / "plugins"),
    }


def median(values) -> float:
    return round(statistics.median(values), 3)


def summarize(count: int, per_file: list[dict], one_process: list[dict]) -> dict:
    """Medians over the runs; totals are medians of each run's sum, not sums of medians.

    The one-process cost beyond the import is paired: each run's ``DagBag`` time after its own
    ``import airflow.sdk``, so that load from elsewhere between two interpreters does not skew it.
    """
    names = sorted(per_file[0]["files"])
    first = per_file[0]["files"]
    errors = {name: first[name]["import_errors"] for name in names if first[name]["import_errors"]}
    if errors or one_process[0]["import_errors"]:
        raise RuntimeError(f"{count} pipelines: import errors {errors or one_process[0]}")
    bare = median([r["bare_import_s"] for r in per_file] + [r["bare_import_s"] for r in one_process])
    files_total = median(sum(f["parse_s"] for f in r["files"].values()) for r in per_file)
    beyond = median(r["beyond_import_s"] for r in one_process)
    return {
        "pipelines": count,
        "dags": sum(first[name]["dags"] for name in names),
        "tasks": sum(first[name]["tasks"] for name in names),
        "bare_import_s": bare,
        "processor_parent_imports_s": median(r["parent_imports_s"] for r in per_file),
        "per_file_parse_s": {name: median(r["files"][name]["parse_s"] for r in per_file) for name in names},
        "per_file_serialize_s": {name: median(r["files"][name]["serialize_s"] for r in per_file) for name in names},
        "files_parse_total_s": files_total,
        "files_serialize_total_s": median(sum(f["serialize_s"] for f in r["files"].values()) for r in per_file),
        "beyond_import_s": beyond,
        "files_parse_total_ratio": round(files_total / bare, 2),
        "beyond_import_ratio": round(beyond / bare, 2),
        "runs": len(per_file),
    }


def add_growth(results: list[dict]) -> None:
    """Milliseconds per further pipeline between consecutive counts, for both measures."""
    for before, after in zip(results, results[1:], strict=False):
        extra = after["pipelines"] - before["pipelines"]
        after["growth_ms_per_pipeline"] = {
            measure: round(1000 * (after[f"{measure}_s"] - before[f"{measure}_s"]) / extra, 1)
            for measure in ("files_parse_total", "beyond_import")}


def measure(counts: list[int], repeat: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = base_env(Path(tmp) / "airflow")
        python("import airflow.sdk; print(0)", [], env)  # warm the file cache once
        for count in counts:
            folder = Path(tmp) / f"pipelines-{count}"
            folder.mkdir()
            write_configs(folder, count)
            counted = env | {"DEPLOYLINE_PIPELINES_DIR": str(folder)}
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
