"""For each DAG file: the Airflow modules its parse imports although the DAG processor could have
imported them once, in its parent process, had the file named them; prints JSON.

As the processor does: Airflow and its parsing code imported, the file's own ``airflow.*`` imports
pre-imported (``_pre_import_airflow_modules``), then the parse, in a child forked per file. What
Airflow's parsing imports for any file (a file without DAGs is parsed first) does not count.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import structlog
from airflow.dag_processing.dagbag import BundleDagBag
from airflow.dag_processing.processor import _pre_import_airflow_modules


def airflow_modules() -> set[str]:
    return {name for name in sys.modules if name.startswith("airflow.")}


def parse(path: str) -> None:
    bag = BundleDagBag(dag_folder=path, bundle_path=Path(path).parent, bundle_name="dags", load_op_links=False)
    if bag.import_errors:
        raise RuntimeError(bag.import_errors)


def parse_a_file_without_dags() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "no_dags.py"
        empty.write_text("# an airflow dag file that defines no DAG\n")
        parse(str(empty))


def imported_by_parse(path: str) -> list[str]:
    parse_a_file_without_dags()
    _pre_import_airflow_modules(path, structlog.get_logger())
    before = airflow_modules()
    parse(path)
    return sorted(airflow_modules() - before)


def in_child(path: str) -> list[str]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, json.dumps(imported_by_parse(path)).encode())
        finally:
            os._exit(0)  # never go on with the parent's code in the child
    os.close(write)
    with os.fdopen(read) as pipe:
        found = pipe.read()
    os.waitpid(pid, 0)
    if not found:
        raise RuntimeError(f"parsing {path} failed")
    return json.loads(found)


print(json.dumps({Path(p).name: in_child(str(p)) for p in sorted(Path(sys.argv[1]).glob("*.py"))}))
