"""Parse dags/ the way the DAG processor does, in a fresh interpreter, and print JSON.

Every socket connection, subprocess, process spawn and file written or removed while the DAG
files run is recorded through an audit hook, and every file read other than Python code, so a
test can prove parsing is offline and reads nothing but the pipeline configs.
"""

import json
import os
import sys
import time

from airflow.dag_processing.dagbag import DagBag  # imported before the hook: only parsing is watched

events = []
files_read = set()
WATCHED = ("socket.connect", "socket.getaddrinfo", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
           "os.fork", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "shutil.")
CODE = (".py", ".pyc", ".so", ".pth")  # Python's own imports and bytecode cache


def hook(event, args):
    if event.startswith(WATCHED):
        events.append(f"{event} {args!r}"[:300])
    elif event == "open" and isinstance(args[0], str | os.PathLike) and not os.fspath(args[0]).endswith(CODE):
        if any(m in (args[1] or "r") for m in "wax+"):
            events.append(f"{event} {args!r}"[:300])
        else:
            files_read.add(os.fspath(args[0]))


sys.addaudithook(hook)
started = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - started
sys.addaudithook(lambda *a: None)


def shape(dag):
    return {
        "schedule": str(dag.schedule) if dag.schedule is not None else None,
        "doc_md": bool(dag.doc_md),
        "params": sorted(dag.params.keys()),
        "max_active_runs": dag.max_active_runs,
        "access_control": {role: {k: sorted(v) for k, v in perms.items()}
                           for role, perms in (dag.access_control or {}).items()},
        "groups": {gid: bool(group.doc_md) for gid, group in dag.task_group.get_task_group_dict().items() if gid},
        "tasks": {
            t.task_id: {
                "upstream": sorted(t.upstream_task_ids),
                "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule),
                "is_setup": t.is_setup,
                "is_teardown": t.is_teardown,
                "type": type(t).__name__,
                "mode": getattr(t, "mode", None),
                "deferrable": getattr(t, "deferrable", None),
                "pool": t.pool,
                "queue": t.queue,
                "retries": t.retries,
            }
            for t in dag.tasks
        },
    }


print(json.dumps({
    "seconds": elapsed,
    "import_errors": bag.import_errors,
    "dags": {dag_id: shape(dag) for dag_id, dag in bag.dags.items()},
    "events": events,
    "files_read": sorted(files_read),
}))
