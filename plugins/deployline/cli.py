"""``python -m deployline demo``: the embedded default on this machine (``make demo``)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from deployline import embedded
from deployline.config import PROJECT_ROOT, load_pipeline_config

DEMO_APP = "sample_service"


def _banner(base: str, password: str, approver: str, clone: Path, bare: Path, moto: str) -> str:
    return f"""
Deployline demo is running.

  Airflow UI   {base}      login: admin / {password}   (approver: approver / {approver})
  Moto (AWS)   {moto}      bucket: s3://{os.environ.get('DEPLOYLINE_ARTIFACT_BUCKET', 'deployline-artifacts')}
  Repository   {bare}
  Your clone   {clone}

The first commit is being polled and built now: open DAG '{DEMO_APP}_pipeline'.
Push a change and watch a new run start within a minute:

  cd {clone}
  echo "# change" >> README.md && git commit -am "Try the pipeline" && git push

Ctrl-C stops everything this command started, environments and the production address too.
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
    try:
        print(f"starting moto on 127.0.0.1:{args.moto_port} ...", flush=True)
        moto = embedded.start_moto(stack, args.moto_port, state / "logs" / "moto.log")
        embedded.ensure_bucket(moto, bucket)
        head = embedded.seed_repository(bare, clone)
        print(f"demo repository {bare} at {head[:10]}", flush=True)
        env = embedded.airflow_env(home, args.api_port, moto, {
            "DEPLOYLINE_DEMO_REPO": str(bare),
            "DEPLOYLINE_ARTIFACT_BUCKET": bucket,
        })
        print(f"starting airflow standalone on port {args.api_port} (log: {state / 'logs' / 'airflow.log'}) ...",
              flush=True)
        base = embedded.start_airflow(stack, env, state / "logs" / "airflow.log")
        password = embedded.password(home)
        print(_banner(base, password, embedded.password(home, "approver"), clone, bare, moto), flush=True)
        if args.headless:
            return _follow_first_run(base, password, head)
        while True:
            stack.check_alive()
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
        print(f"stopped: moto and airflow are down; {len(removed)} environment(s) removed.", flush=True)


def _follow_first_run(base: str, password: str, head: str) -> int:
    """Headless: follow the seeded commit's run until it is a release candidate waiting for
    exploratory approval (or finished), print what each task did, exit 0 for a candidate."""
    from deployline.airflow_api import AirflowApi
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployline")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo", help="run the embedded default (moto, local git, airflow standalone)")
    demo_cmd.add_argument("--state-dir", default=os.environ.get("DEPLOYLINE_DEMO_DIR", str(PROJECT_ROOT / ".demo")))
    demo_cmd.add_argument("--api-port", type=int, default=int(os.environ.get("DEPLOYLINE_API_PORT", "8080")))
    demo_cmd.add_argument("--moto-port", type=int, default=int(os.environ.get("DEPLOYLINE_MOTO_PORT", "5055")))
    demo_cmd.add_argument("--headless", action="store_true",
                          help="follow the first pipeline run to its release candidate, print its tasks, exit")
    demo_cmd.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)
