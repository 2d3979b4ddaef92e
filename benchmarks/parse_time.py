"""Parse time of dags/ with N pipeline configs, against a bare ``import airflow.sdk``.

Measured the two ways Airflow parses:

* **Per file, as the DAG processor does.**  The processor's parent has imported Airflow and
  its parsing code, freezes its objects for the garbage collector (``gc.freeze()``), imports
  the ``airflow.*`` modules a DAG file imports itself (``parsing_pre_import_modules``) and
  forks one child per DAG file; the child runs ``BundleDagBag(file)`` and serializes its DAGs.
  Here a fresh driver interpreter does the same (timing its own ``import airflow.sdk`` first,
  the bare import, and the pre-imports, a one-time cost of the parent), forks once per file of
  dags/ and times the child's parse and serialization.  Each file pays for its other imports:
  the per-file parse times add up to the processor's work for one pass over dags/.
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

# Every time is a pair: wall clock and this process's CPU time. The wall clock is what the DAG
# processor reports; CPU time is steadier on a machine shared with other work.
CLOCK = """
import time
def clock():
    return time.perf_counter(), time.process_time()
def since(then):
    now = clock()
    return {"wall": now[0] - then[0], "cpu": now[1] - then[1]}
"""

# The driver: bare import, then the processor's parent state, then one fork per DAG file.
# Children report on a pipe; their stdout and stderr (Airflow's logs) go to /dev/null.
PER_FILE = CLOCK + r"""
started = clock()
import airflow.sdk
bare = since(started)

import gc, json, logging, os, sys, traceback
from pathlib import Path
started = clock()
import structlog
from airflow.dag_processing.processor import _pre_import_airflow_modules, _serialize_dags
from airflow.dag_processing.dagbag import BundleDagBag
from airflow.utils.dag_version_inflation_checker import check_dag_file_stability
parent_imports = since(started)
gc.freeze()  # as DagFileProcessorManager.before_run does
pre_imports = {"wall": 0.0, "cpu": 0.0}


def parse_in_child(path, out):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    started = clock()
    check_dag_file_stability(path)
    bag = BundleDagBag(dag_folder=path, bundle_path=Path(path).parent, bundle_name="dags", load_op_links=False)
    parse = since(started)
    started = clock()
    serialized, errors = _serialize_dags(bag, logging.getLogger("parse_time"))
    serialize = since(started)
    os.write(out, json.dumps({
        "parse": parse, "serialize": serialize, "dags": len(serialized),
        "tasks": sum(len(d.tasks) for d in bag.dags.values()), "import_errors": len(bag.import_errors | errors),
    }).encode())
    os.close(out)


files = {}
for path in sys.argv[1:]:
    # As DagFileProcessorProcess.start does: the file's own `airflow.*` imports, in the parent.
    started = clock()
    _pre_import_airflow_modules(path, structlog.get_logger())
    pre_imports = {k: v + since(started)[k] for k, v in pre_imports.items()}
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
print(json.dumps({"bare_import": bare, "parent_imports": parent_imports, "parent_pre_imports": pre_imports,
                  "files": files}))
"""

ONE_PROCESS = CLOCK + r"""
started = clock()
import airflow.sdk
bare = since(started)
started = clock()
from airflow.dag_processing.dagbag import DagBag
import json, sys
bag = DagBag(dag_folder=sys.argv[1])
beyond = since(started)
print(json.dumps({"bare_import": bare, "beyond_import": beyond, "dags": len(bag.dags),
                  "import_errors": len(bag.import_errors)}))
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
    return json.loads(python(ONE_PROCESS, [str(DAGS)], env))


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
