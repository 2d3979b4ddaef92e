"""Worker slots held while CloudFormation works (issue 16, item 3 and 5).

Runs a real Airflow (PostgreSQL, scheduler, triggerer, API server, DAG processor) with the
project's DAGs, and moto in this process, so that every stack CloudFormation creates or deletes
is held in progress for ``--hold`` seconds before it completes, as on AWS (moto completes stacks
at once). Then ``support_infrastructure`` launches all four components (four stacks one after
the other) and destroys them again, as stage 0 does; the ``launch``/``destroy`` task's state is
sampled every half second. Worker-slot-seconds = the time the task was ``running`` or ``queued``
(holding or about to hold a slot); the rest of the wait it is ``deferred`` in the triggerer.
Before issue 16 the task waited in the worker: slot-seconds were the whole wait.

Prints one JSON line (``make bench`` reads the last line).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from deployline import embedded  # noqa: E402
from deployline.airflow_api import AirflowApi  # noqa: E402
from moto.cloudformation.models import CloudFormationBackend  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

DAG_ID = "support_infrastructure"
SAMPLE = 0.5


def hold_stacks(seconds: float) -> list[dict]:
    """Every stack created or deleted in moto stays ``*_IN_PROGRESS`` for ``seconds``; returns the log."""
    held: list[dict] = []
    create, delete = CloudFormationBackend.create_stack, CloudFormationBackend.delete_stack

    def finish_later(stack, final: str, operation: str):
        entry = {"stack": stack.name, "operation": operation}
        held.append(entry)

        def done():
            time.sleep(seconds)
            stack.status = final

        threading.Thread(target=done, daemon=True).start()

    def create_held(self, *args, **kwargs):
        stack = create(self, *args, **kwargs)
        final, stack.status = stack.status, "CREATE_IN_PROGRESS"
        finish_later(stack, final, "create")
        return stack

    def delete_held(self, name_or_stack_id: str) -> None:
        try:
            stack = self.get_stack(name_or_stack_id)
        except Exception:  # not there: moto's own answer
            return delete(self, name_or_stack_id)
        if stack.status.endswith("_IN_PROGRESS"):
            return delete(self, name_or_stack_id)
        # Deleting in moto removes the stack at once: keep it listed as DELETE_IN_PROGRESS, then delete.
        stack.status = "DELETE_IN_PROGRESS"
        held.append({"stack": stack.name, "operation": "delete"})

        def done():
            time.sleep(seconds)
            delete(self, name_or_stack_id)

        threading.Thread(target=done, daemon=True).start()

    CloudFormationBackend.create_stack = create_held
    CloudFormationBackend.delete_stack = delete_held
    return held


def follow(api: AirflowApi, run_id: str, task_id: str, timeout: float) -> dict:
    """Sample ``task_id``'s state until the run ends; seconds spent in each state."""
    seconds: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = (api.task_instances(DAG_ID, run_id).get(task_id) or {}).get("state") or "none"
        seconds[state] = seconds.get(state, 0) + SAMPLE
        run = api.run(DAG_ID, run_id)
        if run["state"] in ("success", "failed"):
            return {"run_state": run["state"], "seconds_in_state": seconds}
        time.sleep(SAMPLE)
    raise embedded.StackError(f"{run_id} did not end in {timeout}s: {seconds}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold", type=float, default=20, help="seconds each stack operation stays in progress")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below must run
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    held = hold_stacks(args.hold)
    stack = embedded.Stack()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=embedded.free_port(), verbose=False)
    moto.start()
    results = {}
    with tempfile.TemporaryDirectory(prefix="aws-wait-bench-") as tmp:
        root = Path(tmp)
        try:
            endpoint = f"http://127.0.0.1:{moto._server.server_port}"
            database = embedded.start_database(stack, root / "postgres", root / "logs")
            env = embedded.airflow_env(root / "airflow", embedded.free_port(), endpoint, database | {
                "DEPLOYLINE_DEMO_REPO": str(root / "no-repo.git"),  # the pipelines parse; none runs here
                "DEPLOYLINE_CI_REPOSITORY_URL": str(ROOT),
            })
            base = embedded.start_airflow(stack, env, root / "logs")
            stack.watch(restart=False)
            api = AirflowApi(base, "admin", embedded.password(root / "airflow"))
            embedded.wait_until(lambda: DAG_ID in api.dag_ids(), 120, f"{DAG_ID} to be parsed", 1)
            # Destroy only the topic: moto cannot delete a network stack cleanly (DESIGN.md).
            for action, components in (("launch", ["all"]), ("destroy", ["notifications"])):
                task_id = action
                conf = {"action": action, "components": components}
                run_id = f"bench__{action}_{time.time_ns()}"
                started, before = time.time(), len(held)
                api.trigger(DAG_ID, conf=conf, run_id=run_id)
                found = follow(api, run_id, task_id, timeout=60 * args.hold + 600)
                states = found["seconds_in_state"]
                results[action] = {
                    "run_state": found["run_state"],
                    "stack_operations_held": len(held) - before,
                    "held_seconds_each": args.hold,
                    "wall_s": round(time.time() - started, 1),
                    "worker_slot_s": states.get("running", 0) + states.get("queued", 0),
                    "deferred_s": states.get("deferred", 0),
                    "seconds_in_state": states,
                    # What the same wait cost when the task waited in its worker (before issue 16).
                    "worker_slot_s_if_blocking": (len(held) - before) * args.hold,
                }
                print(f"{action}: {results[action]}", file=sys.stderr, flush=True)
        finally:
            stack.stop()
            moto.stop()
    print(json.dumps(results))
    return 0 if all(r["run_state"] == "success" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
