"""Time from an AMI becoming ``available`` to ``AmiAvailableSensor`` succeeding, deferrable vs reschedule.

Runs a real Airflow (scheduler, triggerer, API server, DAG processor, PostgreSQL) on a
temporary DAGs folder with two one-task DAGs, and moto in this process, so the image state
can be flipped in moto's backend at a known instant T.  Per sample: trigger a run, wait until
the sensor really waits (``deferred`` / ``up_for_reschedule``), wait a random 0..poke_interval
(so T falls anywhere in the polling cycle), flip the image to ``available``, and take
latency = the task's ``end_date`` - T.  Prints JSON on stdout, a summary line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

import boto3  # noqa: E402
from deployline import embedded  # noqa: E402
from deployline.airflow_api import AirflowApi  # noqa: E402
from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.ec2.models import ec2_backends  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

MODES = {"deferrable": "deferred", "reschedule": "up_for_reschedule"}  # mode -> its waiting state
DAG_FILE = '''\
from airflow.sdk import DAG
from deployline.image_readiness import AmiAvailableSensor

for mode, deferrable in (("deferrable", True), ("reschedule", False)):
    with DAG(f"bench_ami_{mode}", schedule=None, params={"image_id": ""}) as dag:
        AmiAvailableSensor(task_id="wait", image_id="{{ params.image_id }}", deferrable=deferrable,
                           poke_interval=POKE_INTERVAL, timeout=600)
    globals()[dag.dag_id] = dag
'''


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def pending_image(ec2, n: int) -> str:
    """A fresh AMI that moto reports as ``pending`` until we say otherwise."""
    base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    image_id = ec2.create_image(InstanceId=instance, Name=f"bench-ami-{n}-{time.time_ns()}")["ImageId"]
    set_state(image_id, "pending")
    return image_id


def set_state(image_id: str, state: str) -> None:
    # moto creates images `available` at once; its in-process backend is the only way to model a bake.
    ec2_backends[DEFAULT_ACCOUNT_ID][embedded.REGION].amis[image_id].state = state


def ti_state(api: AirflowApi, dag_id: str, run_id: str) -> dict:
    return api.task_instances(dag_id, run_id).get("wait") or {}


def dags_parsed(api: AirflowApi) -> bool:
    if errors := api.import_errors():
        raise embedded.StackError(errors[0].get("stack_trace", "")[-800:])
    return {f"bench_ami_{m}" for m in MODES} <= set(api.dag_ids())


def sample(api: AirflowApi, ec2, mode: str, n: int, poke_interval: int) -> dict:
    dag_id, waiting = f"bench_ami_{mode}", MODES[mode]
    image_id = pending_image(ec2, n)
    run_id = api.trigger(dag_id, conf={"image_id": image_id})["dag_run_id"]
    embedded.wait_until(lambda: ti_state(api, dag_id, run_id).get("state") == waiting, 300,
                        f"{dag_id} {run_id} to be {waiting}", 0.2)
    # Watch the task while it waits: a state other than running/queued means it holds no worker slot.
    seen: dict[str, int] = {}
    until = time.monotonic() + random.uniform(0, poke_interval)
    while time.monotonic() < until:
        state = ti_state(api, dag_id, run_id).get("state")
        seen[state] = seen.get(state, 0) + 1
        time.sleep(0.2)
    set_state(image_id, "available")
    flipped = time.time()
    # Note when the task leaves its waiting state: trigger fired (deferrable) or next poke queued (reschedule).
    left_wait = None
    deadline = time.monotonic() + 300
    while (ti := ti_state(api, dag_id, run_id)).get("state") not in ("success", "failed"):
        if left_wait is None and ti.get("state") != waiting:
            left_wait = time.time()
        if time.monotonic() > deadline:
            raise embedded.StackError(f"{dag_id} {run_id} did not finish: {ti.get('state')}")
        time.sleep(0.2)
    busy = sum(count for state, count in seen.items() if state in ("running", "queued"))
    if ti["state"] != "success":
        # Kept as a result, not raised: a sensor that fails while waiting is what a user would see.
        events = api.get("/eventLogs", dag_id=dag_id, run_id=run_id, event="state mismatch")["event_logs"]
        return {"image_id": image_id, "state": ti["state"], "states_while_waiting": seen,
                "scheduler_says": events[0]["extra"][:300] if events else None}
    return {
        "image_id": image_id,
        "state": "success",
        "latency_s": round(ts(ti["end_date"]) - flipped, 2),
        "available_to_left_waiting_state_s": round((left_wait or flipped) - flipped, 2),
        "states_while_waiting": seen,
        "held_worker_slot_fraction": round(busy / max(1, sum(seen.values())), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5, help="samples per mode")
    parser.add_argument("--poke-interval", type=int, default=5, help="seconds between checks (both modes)")
    args = parser.parse_args()
    # A SIGTERM must still run the `finally` below, or Airflow and its children outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    stack = embedded.Stack()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=embedded.free_port(), verbose=False)
    moto.start()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ami-sensor-bench-") as tmp:
        root = Path(tmp)
        try:
            endpoint = f"http://127.0.0.1:{moto._server.server_port}"
            ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=embedded.REGION,
                               aws_access_key_id="testing", aws_secret_access_key="testing")
            dags = root / "dags"
            dags.mkdir()
            (dags / "bench_ami.py").write_text(DAG_FILE.replace("POKE_INTERVAL", str(args.poke_interval)))
            database = embedded.start_database(stack, root / "postgres", root / "logs")
            env = embedded.airflow_env(root / "airflow", embedded.free_port(), endpoint,
                                       database | {"AIRFLOW__CORE__DAGS_FOLDER": str(dags)})
            base = embedded.start_airflow(stack, env, root / "logs")
            api = AirflowApi(base, "admin", embedded.password(root / "airflow"))
            # Healthy is not parsed: wait for both DAGs before triggering (an import error is the last error shown).
            embedded.wait_until(lambda: dags_parsed(api), 120, "the bench DAGs", 1)
            for mode in MODES:
                samples = []
                for n in range(args.samples):
                    samples.append(sample(api, ec2, mode, n, args.poke_interval))
                    print(f"{mode} {n}: {samples[-1]}", file=sys.stderr)
                latencies = [s["latency_s"] for s in samples if s["state"] == "success"]
                results[mode] = {"poke_interval_s": args.poke_interval, "samples": samples,
                                 "failed_runs": sum(s["state"] != "success" for s in samples),
                                 "median_latency_s": statistics.median(latencies) if latencies else None,
                                 "max_latency_s": max(latencies, default=None)}
        except Exception:
            print(f"failed; the scheduler's log was {root / 'logs'} (removed on exit):", file=sys.stderr)
            sys.stderr.write(embedded.last_lines(root / "logs" / "scheduler.log", 40) + "\n")
            raise
        finally:
            stack.stop()
            moto.stop()
    print(json.dumps(results))  # one line: make bench reads the last line
    summary = "; ".join(f"{m}: median {r['median_latency_s']}s, max {r['max_latency_s']}s, {r['failed_runs']} failed"
                        for m, r in results.items())
    print(f"AMI available -> sensor success: {summary} (poke_interval {args.poke_interval}s, "
          f"{args.samples} samples each)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
