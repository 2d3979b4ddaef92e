"""What end-to-end tests use to act as a user: push commits, use the REST API, read AWS state."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from deployline import embedded
from deployline.airflow_api import AirflowApi, AirflowApiError
from deployline.sensors import pipeline_run_id

ROOT = Path(__file__).resolve().parents[2]
APP = "sample_service"
STRICT_APP = "strict_service"  # the same repository, with a capacity threshold set too tight
BUCKET = "deployline-e2e"
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
CANDIDATE = "3-acceptance.record_candidate"
ACCEPTANCE_TEARDOWNS = ("3-acceptance.teardown_environment", "3-acceptance.terminate_image_builder")
FINISHED = ("success", "failed", "upstream_failed", "skipped")
# Secrets that live only in Airflow connections for the session: a git token for the repository's
# connection and the AWS secret key of aws_default (moto accepts any). None may show up anywhere.
SECRETS = {"git token": f"ghp-dl-{secrets.token_hex(12)}", "aws secret key": f"dl-aws-{secrets.token_hex(16)}"}
GIT_CONN = "deployline_git"


@dataclass
class E2E:
    api: AirflowApi
    s3: object
    clone: Path
    bare: Path
    home: Path
    seed: str  # the first commit, in the repository before Airflow started
    stack: embedded.Stack
    database_url: str  # Airflow's metadata database (the session's own PostgreSQL)
    work_dir: Path | None = None  # the environments' host's DEPLOYLINE_WORK_DIR (default: home/deployline)
    bucket: str = BUCKET

    @property
    def environments_dir(self) -> Path:
        return (self.work_dir or self.home / "deployline") / "environments"

    def push(self, files: dict[str, str], message: str, commits: int = 1) -> list[str]:
        """Commit ``files`` (``commits`` times, each a separate commit) and push once; returns the shas."""
        shas = []
        for n in range(commits):
            for name, content in files.items():
                path = self.clone / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content if commits == 1 else f"{content}\n# {n}\n")
            embedded.git("add", "-A", cwd=self.clone)
            embedded.git("commit", "--quiet", "-m", message if commits == 1 else f"{message} ({n + 1})", cwd=self.clone)
            shas.append(embedded.git("rev-parse", "HEAD", cwd=self.clone))
        embedded.git("push", "--quiet", "origin", "HEAD:main", cwd=self.clone)
        self.poll_now(shas[-1])
        return shas

    def poll_now(self, sha: str) -> None:
        """What a push webhook does: start a poll now instead of at the next cron minute.

        With one poll at a time, it waits behind a poll that is still looking (and finds nothing).
        """
        try:
            self.api.trigger(f"{APP}_commit_poll", run_id=f"push__{sha[:10]}")
        except AirflowApiError as exc:  # that poll exists already
            if "409" not in str(exc):
                raise

    def revision(self, sha: str) -> int:
        return int(embedded.git("rev-list", "--count", "--first-parent", sha, cwd=self.clone))

    def version(self, sha: str) -> str:
        return f"r{self.revision(sha)}-{sha[:10]}"

    def pipeline_run(self, sha: str, until: tuple[str, ...] = (), timeout: float = 600) -> dict:
        """Wait for the polled pipeline run of ``sha`` to appear and to finish, or only until the
        tasks ``until`` are done (runs of candidates go on to wait for approval)."""
        dag_id, run_id = f"{APP}_pipeline", pipeline_run_id(sha)
        embedded.wait_until(lambda: _exists(self.api, dag_id, run_id), 180, f"poll to start {run_id}", interval=2)
        if not until:
            return self.api.wait_for_run(dag_id, run_id, timeout=timeout)

        def done():
            run = self.api.run(dag_id, run_id)
            tis = self.api.task_instances(dag_id, run_id)
            finished = all(tis.get(task, {}).get("state") in FINISHED for task in until)
            return run if run["state"] in ("success", "failed") or finished else None

        return embedded.wait_until(done, timeout, f"{run_id} to finish {until}", interval=2)

    def wait_for_tasks(self, run_id: str, tasks: tuple[str, ...], timeout: float = 300,
                       states: tuple[str, ...] = FINISHED, dag_id: str = f"{APP}_pipeline") -> dict:
        """The run, once each of ``tasks`` is in one of ``states`` (or the run has ended)."""

        def done():
            run = self.api.run(dag_id, run_id)
            tis = self.api.task_instances(dag_id, run_id)
            reached = all(tis.get(task, {}).get("state") in states for task in tasks)
            return run if reached or run["state"] in ("success", "failed") else None

        return embedded.wait_until(done, timeout, f"{run_id}: {tasks} to be {'/'.join(states)}", interval=2)

    def approve(self, api: AirflowApi, gate: str, run_id: str, note: str, decision: str = "success") -> None:
        """Mark the gate's ``decision`` as a person would, once it waits.

        Marking is not affected by the race of answering the Required Action (see test_approvals):
        the task is not resumed, its state is set."""
        gate_dag = f"{APP}_approve_{gate}"

        def waiting():
            if not any(r["dag_run_id"] == run_id for r in self.api.runs(gate_dag)):
                return None
            ti = self.api.task_instances(gate_dag, run_id).get("decision") or {}
            return ti if ti.get("state") in ("deferred", "awaiting_input", "up_for_reschedule") else None

        embedded.wait_until(waiting, 300, f"{gate} approval of {run_id} to wait", interval=2)
        api.set_task_state(gate_dag, run_id, "decision", decision, note=note)

    def candidate_run(self, sha: str) -> tuple[dict, dict[str, str | None]]:
        """The pipeline run of ``sha`` up to its release candidate (and the stage's teardowns), and
        its task states."""
        run = self.pipeline_run(sha, until=(CANDIDATE, *ACCEPTANCE_TEARDOWNS))
        return run, self.task_states(run)

    def task_states(self, run: dict) -> dict[str, str | None]:
        return {tid: ti["state"] for tid, ti in self.api.task_instances(run["dag_id"], run["dag_run_id"]).items()}

    def record(self, version: str) -> dict | None:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=f"{APP}/releases/{version}.json")["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None
        return json.loads(body)


def _exists(api: AirflowApi, dag_id: str, run_id: str) -> bool:
    return any(r["dag_run_id"] == run_id for r in api.runs(dag_id))




EPHEMERAL = ("acceptance", "capacity", "self_service")  # stages that tear their environments down


def leftovers(e2e: E2E, stages: tuple[str, ...] = EPHEMERAL) -> dict[str, list]:
    """Builder instances, stacks, and environments of ``stages`` (folders and processes) still around.

    Pre-production, production and the production address are long-lived: not leftovers.
    """
    import boto3
    import psutil

    endpoint = e2e.s3.meta.endpoint_url
    kwargs = {"endpoint_url": endpoint, "region_name": "us-east-1",
              "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    ec2 = boto3.client("ec2", **kwargs)
    reservations = ec2.describe_instances(Filters=[
        {"Name": "tag-key", "Values": ["deployline:builder"]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ])["Reservations"]
    stacks = [s["StackName"] for s in boto3.client("cloudformation", **kwargs).describe_stacks()["Stacks"]
              if s["StackStatus"] != "DELETE_COMPLETE"]
    found = {name: info["stage"] for name, info in environments(e2e).items()}
    processes = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            environ = proc.environ()
            # This session's environments only (the driver names its folder in their environment).
            if "DEPLOYLINE_ENVIRONMENT" in environ \
                    and environ.get("DEPLOYLINE_ENVIRONMENTS_DIR") == str(e2e.environments_dir) \
                    and found.get(environ["DEPLOYLINE_ENVIRONMENT"], environ.get("DEPLOYLINE_STAGE")) in stages:
                processes.append((proc.pid, " ".join(proc.info["cmdline"] or [])))
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return {
        "builder_instances": [i["InstanceId"] for r in reservations for i in r["Instances"]],
        "stacks": stacks,
        "environment_processes": processes,
        "environment_folders": sorted(name for name, stage in found.items() if stage in stages),
    }


def environments(e2e: E2E) -> dict[str, dict]:
    """Every environment folder of this session (routers too): name -> its state."""
    envs_dir = e2e.environments_dir
    found = {}
    for state in sorted(envs_dir.glob("*/state.json")) if envs_dir.exists() else []:
        try:
            found[state.parent.name] = json.loads(state.read_text())
        except ValueError:
            found[state.parent.name] = {"stage": "unreadable"}
    return found


def images_of(e2e: E2E, version: str) -> dict[str, dict]:
    """AMIs tagged with this version, by their deployline:kind tag."""
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=e2e.s3.meta.endpoint_url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag:deployline:version", "Values": [version]}])
    return {next(t["Value"] for t in i["Tags"] if t["Key"] == "deployline:kind"): i for i in found["Images"]}


class ClientLoop:
    """A client sending requests to ``url`` one after the other, from a thread, counting the answers."""

    def __init__(self, url: str, path: str = "/version"):
        import threading

        self.url, self.path = url, path
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.versions: list[str] = []  # in the order they were seen, each once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        while not self._stop.is_set():
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
                if response.status == 200:
                    version = json.loads(body)["version"]
                    if not self.versions or self.versions[-1] != version:
                        self.versions.append(version)
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
            finally:
                conn.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(n for status, n in self.statuses.items() if status != 200)
