"""One fresh interpreter's measurement for parse_time.py; prints JSON on its last stdout line.

``per-file FILE...``: as the DAG processor parses. Time ``import airflow.sdk`` (the bare
import), import the processor's parsing code and freeze the garbage collector's view of it (as
``DagFileProcessorManager.before_run`` does), then per DAG file pre-import its own ``airflow.*``
imports (as ``DagFileProcessorProcess.start`` does) and fork a child that parses and serializes
it. A last child builds trivial tasks (Airflow's @task, and the PythonOperator that
deployline.python_tasks builds): Airflow's own cost per task, for reference.

``one-process DAGS_FOLDER``: as ``airflow dags report`` parses. Time ``import airflow.sdk``,
then ``DagBag(DAGS_FOLDER)`` with every file in this one process.

Every time is a pair: wall clock and this process's CPU time. The wall clock is what Airflow
reports; CPU time is steadier on a machine shared with other work.
"""

import json
import os
import sys
import time
import traceback


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(then: tuple[float, float]) -> dict:
    now = clock()
    return {"wall": now[0] - then[0], "cpu": now[1] - then[1]}


def in_child(measure, *args) -> dict:
    """``measure(*args)`` (a dict) in a child forked from this process; its output goes nowhere."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.write(write, json.dumps(measure(*args)).encode())
        except BaseException:
            os.write(write, json.dumps({"failed": traceback.format_exc()}).encode())
        finally:
            os._exit(0)  # never go on with the parent's code in the child
    os.close(write)
    with os.fdopen(read) as pipe:
        result = json.loads(pipe.read())
    os.waitpid(pid, 0)
    if "failed" in result:
        sys.exit(f"{measure.__name__}{args} failed in the child:\n{result['failed']}")
    return result


def parse_file(path: str) -> dict:
    import logging
    from pathlib import Path

    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.dag_processing.processor import _serialize_dags
    from airflow.utils.dag_version_inflation_checker import check_dag_file_stability

    started = clock()
    check_dag_file_stability(path)
    bag = BundleDagBag(dag_folder=path, bundle_path=Path(path).parent, bundle_name="dags", load_op_links=False)
    parse = since(started)
    started = clock()
    serialized, errors = _serialize_dags(bag, logging.getLogger("parse_time"))
    return {"parse": parse, "serialize": since(started), "dags": len(serialized),
            "tasks": sum(len(d.tasks) for d in bag.dags.values()), "import_errors": len(bag.import_errors | errors)}


def bare_tasks(count: int = 100) -> dict:
    """Seconds per trivial task, each given the previous one's output (as most of ours are):
    built with Airflow's ``@task`` (``decorated``) and as the ``PythonOperator`` deployline's
    ``python_tasks.task`` builds (``operator``)."""
    from datetime import datetime

    from airflow.sdk import DAG, task
    from deployline.python_tasks import task as operator_task

    result = {}
    for name, decorator in (("decorated", task), ("operator", operator_task)):
        with DAG(f"bare_{name}", schedule=None, start_date=datetime(2024, 1, 1)):
            started = clock()
            previous = None
            for n in range(count):
                @decorator(task_id=f"t{n}")
                def step(previous: dict | None) -> dict:
                    return {}

                previous = step(previous)
            built = since(started)
        result[name] = {kind: seconds / count for kind, seconds in built.items()}
    return result


def per_file(paths: list[str]) -> dict:
    started = clock()
    import airflow.sdk  # noqa: F401

    bare = since(started)
    import gc

    import structlog

    started = clock()
    import airflow.dag_processing.dagbag  # noqa: F401
    from airflow.dag_processing.processor import _pre_import_airflow_modules

    parent_imports = since(started)
    gc.freeze()
    pre_imports = {"wall": 0.0, "cpu": 0.0}
    files = {}
    for path in paths:
        started = clock()
        _pre_import_airflow_modules(path, structlog.get_logger())
        pre_imports = {kind: seconds + since(started)[kind] for kind, seconds in pre_imports.items()}
        files[os.path.basename(path)] = in_child(parse_file, path)
    return {"bare_import": bare, "parent_imports": parent_imports, "parent_pre_imports": pre_imports,
            "files": files, "bare_task": in_child(bare_tasks)}


def one_process(dags_folder: str) -> dict:
    started = clock()
    import airflow.sdk  # noqa: F401

    bare = since(started)
    started = clock()
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=dags_folder)
    return {"bare_import": bare, "beyond_import": since(started), "dags": len(bag.dags),
            "import_errors": len(bag.import_errors)}


if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    result = per_file(arguments) if mode == "per-file" else one_process(arguments[0])
    print(json.dumps(result))
