"""``python -m deployline demo``: the embedded default on this machine (``make demo``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from deployline import embedded
from deployline.airflow_api import AirflowApi
from deployline.config import PROJECT_ROOT, load_pipeline_config

DEMO_APP = "sample_service"


def _banner(base: str, password: str, home: Path, clone: Path, bare: Path, moto: str, pid_file: Path) -> str:
    approver, viewer = embedded.password(home, "approver"), embedded.password(home, "viewer")
    return f"""
Deployline demo is running.

  Airflow UI   {base}      login: admin / {password}   (approver: approver / {approver}, read-only: viewer / {viewer})
  Moto (AWS)   {moto}      bucket: s3://{os.environ.get('DEPLOYLINE_ARTIFACT_BUCKET', 'deployline-artifacts')}
  Repository   {bare}
  Your clone   {clone}

The first commit is being polled and built now: open DAG '{DEMO_APP}_pipeline'.
Push a change and watch a new run start within a minute:

  cd {clone}
  echo "# change" >> README.md && git commit -am "Try the pipeline" && git push

Ctrl-C stops everything this command started, environments and the production address too
(from a script: `kill -TERM <make's pid>`, or `kill -INT $(cat {pid_file})`).
"""


def demo(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    home = state / "airflow"
    bare, clone = state / "repos" / "sample-service.git", state / "sample-service"
    bucket = os.environ.setdefault("DEPLOYLINE_ARTIFACT_BUCKET", "deployline-artifacts")
    os.environ["DEPLOYLINE_DEMO_REPO"] = str(bare)
    # Fail before starting anything when the demo config itself is broken.
    load_pipeline_config(PROJECT_ROOT / "include" / "pipelines" / f"{DEMO_APP}.yaml")

    # moto keeps AWS in memory only, so the Airflow database starts afresh with it;
    # the demo repository and your clone are kept.
    embedded.stop_environments(home)  # left by a demo that was killed
    shutil.rmtree(home, ignore_errors=True)
    stack = embedded.Stack()

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started with SIGINT ignored (a background job)
    # make passes SIGTERM on to this process but not SIGINT: scripts signal this pid instead.
    pid_file = state / "demo.pid"
    state.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        logs = state / "logs"
        print(f"starting moto on 127.0.0.1:{args.moto_port} ...", flush=True)
        moto = embedded.start_moto(stack, args.moto_port, logs / "moto.log")
        print(f"starting PostgreSQL for Airflow's metadata database (data: {state / 'postgres'}) ...", flush=True)
        database = embedded.start_database(stack, state / "postgres", logs)
        env = embedded.airflow_env(home, args.api_port, moto, database | {
            "DEPLOYLINE_DEMO_REPO": str(bare),
            "DEPLOYLINE_ARTIFACT_BUCKET": bucket,
            # The CI environment of stage 0 runs this project (an instance in moto: nothing runs on it).
            "DEPLOYLINE_CI_REPOSITORY_URL": os.environ.get("DEPLOYLINE_CI_REPOSITORY_URL", str(PROJECT_ROOT)),
        }, paused=True)  # until stage 0 has run: the pipelines need its artifact bucket
        print(f"starting Airflow: api-server on port {args.api_port}, scheduler, dag-processor, triggerer "
              f"(logs: {logs}) ...", flush=True)
        base = embedded.start_airflow(stack, env, logs)
        # From now on a component that exits is reported (name, exit code, last log lines) and
        # started again; one that keeps exiting stops the demo with that report.
        stack.watch(restart=True)
        password = embedded.password(home)
        api = AirflowApi(base, "admin", password)
        _stage_zero(api)
        head = embedded.seed_repository(bare, clone)
        print(f"demo repository {bare} at {head[:10]}", flush=True)
        for dag_id in api.dag_ids():
            api.set_paused(dag_id, False)
        print(_banner(base, password, home, clone, bare, moto, pid_file), flush=True)
        if args.auto_approve:
            return _release_first_commit(base, home, head, moto)
        if args.headless:
            return _follow_first_run(base, password, head)
        while True:
            if stack.failure:
                raise stack.failure
            time.sleep(2)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except embedded.StackError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        removed = embedded.stop_environments(home)
        pid_file.unlink(missing_ok=True)
        print(f"stopped: moto and airflow are down; {len(removed)} environment(s) removed.", flush=True)


def _stage_zero(api: AirflowApi) -> None:
    """Run ``support_infrastructure`` (launch all) as a user would, and print what it did."""
    from deployline.support_infrastructure import DAG_ID

    embedded.wait_until(lambda: DAG_ID in api.dag_ids(), 120, f"DAG {DAG_ID} to be parsed", interval=2)
    api.set_paused(DAG_ID, False)
    run = api.trigger(DAG_ID, conf={"action": "launch", "components": ["all"]}, run_id="demo__launch")
    print(f"stage 0: {DAG_ID} run {run['dag_run_id']} launches network, artifact store, topic, CI ...", flush=True)
    run = api.wait_for_run(DAG_ID, run["dag_run_id"], timeout=600)
    if run["state"] != "success":
        raise embedded.StackError(f"stage 0 failed: see the log of {DAG_ID} run {run['dag_run_id']} in the UI")
    for result in api.xcom(DAG_ID, run["dag_run_id"], "launch"):
        print(f"  {result['action']:9} {result['component']:15} {result['stack']}", flush=True)


def _follow_first_run(base: str, password: str, head: str) -> int:
    """Headless: follow the seeded commit's run until it is a release candidate waiting for
    exploratory approval (or finished), print what each task did, exit 0 for a candidate."""
    from deployline.sensors import pipeline_run_id

    api = AirflowApi(base, "admin", password)
    dag_id, run_id = f"{DEMO_APP}_pipeline", pipeline_run_id(head)
    embedded.wait_until(lambda: api.run(dag_id, run_id), 300, f"pipeline run {run_id}", interval=3)

    def settled():
        states = {t: ti["state"] for t, ti in api.task_instances(dag_id, run_id).items()}
        finished = api.run(dag_id, run_id)["state"] in ("success", "failed")
        return states if finished or states.get("5-exploratory.await_approval") == "deferred" else None

    states = embedded.wait_until(settled, 900, f"{run_id} to become a candidate", interval=3)
    for task_id, ti in sorted(api.task_instances(dag_id, run_id).items()):
        print(f"  {task_id:40} {ti['state'] or '-':16} {ti.get('duration') or 0:6.1f}s")
    candidate = states.get("3-acceptance.record_candidate") == "success"
    print(f"run {run_id}: {'release candidate, waiting for exploratory approval' if candidate else 'no candidate'}")
    return 0 if candidate else 1


def _release_first_commit(base: str, home: Path, head: str, aws_endpoint: str) -> int:
    """Auto-approve: take the seeded commit to production, approving through the REST API as the
    approver; print each stage and the production address; 0 only when the release is live."""
    import urllib.request

    from deployline.sensors import pipeline_run_id

    admin = AirflowApi(base, "admin", embedded.password(home))
    approver = AirflowApi(base, "approver", embedded.password(home, "approver"))
    dag_id, run_id = f"{DEMO_APP}_pipeline", pipeline_run_id(head)
    embedded.wait_until(lambda: admin.run(dag_id, run_id), 300, f"pipeline run {run_id}", interval=3)
    for gate in ("exploratory", "production"):
        gate_dag = f"{DEMO_APP}_approve_{gate}"

        def waiting(gate_dag=gate_dag):
            if admin.run(dag_id, run_id)["state"] in ("success", "failed"):
                return "ended"
            if not any(r["dag_run_id"] == run_id for r in admin.runs(gate_dag)):
                return None
            state = (admin.task_instances(gate_dag, run_id).get("decision") or {}).get("state")
            return "waiting" if state in ("deferred", "awaiting_input", "up_for_reschedule") else None

        if embedded.wait_until(waiting, 1200, f"{gate} approval of {run_id} to be asked", interval=3) == "ended":
            break
        approver.set_task_state(gate_dag, run_id, "decision", "success", note="approved by make demo AUTO_APPROVE=1")
        print(f"{gate} approval given as 'approver'", flush=True)
    run = admin.wait_for_run(dag_id, run_id, timeout=1200)
    tis = admin.task_instances(dag_id, run_id)
    stages: dict[str, list] = {}
    for task_id, ti in tis.items():
        stages.setdefault(task_id.split(".", 1)[0], []).append(ti)
    print(f"\nrun {run_id}: {run['state']}")
    for stage, items in sorted(stages.items(), key=lambda kv: min(t.get("start_date") or "~" for t in kv[1])):
        states = sorted({t["state"] or "-" for t in items})
        seconds = sum(t.get("duration") or 0 for t in items)
        print(f"  {stage:22} {'/'.join(states):24} {len(items):3} task(s) {seconds:7.1f}s of work")
    live = _production_address(aws_endpoint)
    if run["state"] != "success" or live is None:
        print("the release did not reach production", file=sys.stderr)
        return 1
    with urllib.request.urlopen(f"{live['endpoint']}/version", timeout=10) as response:
        serving = json.loads(response.read())["version"]
    print(f"\nproduction: {live['endpoint']}  serves {serving} (released {live['version']})")
    return 0 if serving == live["version"] else 1


def _production_address(aws_endpoint: str) -> dict | None:
    """The live version and address, from the release registry in the demo's S3 (moto)."""
    import boto3

    from deployline.embedded import AWS_KEYS, REGION

    s3 = boto3.client("s3", endpoint_url=aws_endpoint, region_name=REGION,
                      aws_access_key_id=AWS_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=AWS_KEYS["AWS_SECRET_ACCESS_KEY"])
    try:
        body = s3.get_object(Bucket=os.environ["DEPLOYLINE_ARTIFACT_BUCKET"], Key=f"{DEMO_APP}/production.json")
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body["Body"].read())


def create_pools(args) -> int:
    from deployline.config import load_all
    from deployline.pools import ensure_pools

    configs, errors = load_all()
    for error in errors:
        print(f"skipped: {error}", file=sys.stderr)
    for name in ensure_pools(configs):
        print(f"pool {name}: 1 slot, counting deferred tasks")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployline")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo", help="run the embedded default (moto, local git, airflow standalone)")
    demo_cmd.add_argument("--state-dir", default=os.environ.get("DEPLOYLINE_DEMO_DIR", str(PROJECT_ROOT / ".demo")))
    demo_cmd.add_argument("--api-port", type=int, default=int(os.environ.get("DEPLOYLINE_API_PORT", "8080")))
    demo_cmd.add_argument("--moto-port", type=int, default=int(os.environ.get("DEPLOYLINE_MOTO_PORT", "5055")))
    demo_cmd.add_argument("--headless", action="store_true",
                          help="follow the first pipeline run to its release candidate, print its tasks, exit")
    demo_cmd.add_argument("--auto-approve", action="store_true",
                          help="approve through the REST API, wait until the first commit is live in production, "
                               "print each stage and the production address, exit (0 only when it is live)")
    demo_cmd.set_defaults(func=demo)
    pools_cmd = commands.add_parser("pools", help="create the one-slot deploy pools of every pipeline config in "
                                                   "Airflow's database (run where Airflow's settings are)")
    pools_cmd.set_defaults(func=create_pools)
    from deployline.infra_cli import add_parser as add_infra_parser  # infra up|down|status

    add_infra_parser(commands)
    args = parser.parse_args(argv)
    return args.func(args)
