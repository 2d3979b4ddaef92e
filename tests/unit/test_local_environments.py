"""The local environment driver and its proxy: real processes, sockets and HTTP; only S3 is moto."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from deployline import artifacts
from deployline.config import LocalDriverSettings
from deployline.environments.base import EnvironmentFailed, EnvironmentSpec, environment_name
from deployline.environments.local import SWITCH_GRACE, LocalDriver

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "include" / "sample-service"
BUCKET = "deployline-artifacts-test"
V1, V2 = "r1-abcdef0", "r2-def0123"  # the versions the conftest's ``tarballs`` builds


def build_artifact(out: Path, version: str) -> Path:
    env = {**os.environ, "DEPLOYLINE_VERSION": version, "DEPLOYLINE_COMMIT": "abc"}
    subprocess.run([sys.executable, "build.py", "--out", str(out)], cwd=SERVICE, env=env, check=True,
                   capture_output=True)
    return out / f"sample-service-{version}.tar.gz"




def make_spec(artifact: dict, key: str, size: int = 2, application: str = "shop") -> EnvironmentSpec:
    return EnvironmentSpec(application=application, stage="acceptance",
                           name=environment_name(application, "acceptance", key), size=size,
                           version=artifact["key"].split("/")[2], artifact=artifact, labels={"owner": "tests"})


def get(url: str, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # an orphan the container's init never reaps
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def state_of(root: Path, name: str) -> dict:
    return json.loads((root / name / "state.json").read_text())


def worker_ports(info) -> list[int]:
    return [p["port"] for p in info.details["processes"] if p["role"] == "worker"]


def requests_in_log(root: Path, name: str, port: int) -> int:
    return (root / name / "logs" / f"worker-{port}.log").read_text().count('"GET /version')


def test_provision_runs_workers_behind_a_proxy_and_is_idempotent(driver, published, root):
    spec = make_spec(published["r1-abcdef0"], "run-1")
    driver.provision(spec)
    info = driver.wait_until_healthy(spec.name, "/health", timeout=20)

    assert info.size == 2 and info.driver == "local" and info.labels == {"owner": "tests"}
    assert datetime.fromisoformat(info.created_at).utcoffset().total_seconds() == 0
    status, body = get(info.endpoint, "/version")
    assert status == 200 and json.loads(body) == {"version": "r1-abcdef0", "commit": "abc"}
    for port in worker_ports(info):
        assert json.loads(get(f"http://127.0.0.1:{port}", "/version")[1])["version"] == "r1-abcdef0"
    # The proxy forwards methods, bodies and statuses as they are.
    status, body = get(info.endpoint, "/api/items", "POST", b'{"name": "widget", "quantity": 2}')
    assert status == 201 and json.loads(body)["name"] == "widget"
    assert get(info.endpoint, "/api/items/no-such-item")[0] == 404

    state = state_of(root, spec.name)
    assert [p["role"] for p in state["processes"]] == ["worker", "worker", "proxy"]
    assert state["artifact"]["sha256"] == published["r1-abcdef0"]["sha256"] and state["endpoint"] == info.endpoint
    for entry in state["processes"]:
        process = psutil.Process(entry["pid"])
        assert process.is_running() and process.create_time() == pytest.approx(entry["create_time"], abs=1)
    worker = psutil.Process(state["processes"][0]["pid"])
    assert worker.environ()["DEPLOYLINE_ENVIRONMENT"] == spec.name
    assert worker.environ()["DEPLOYLINE_VERSION"] == "r1-abcdef0"

    assert driver.get(spec.name).endpoint == info.endpoint == driver.endpoint(spec.name)
    assert [e.name for e in driver.list()] == [spec.name] == [e.name for e in driver.list("shop")]
    assert driver.list("other-app") == [] and driver.get("dl-no-such-env") is None

    pids = [p["pid"] for p in state["processes"]]
    assert [p["pid"] for p in driver.provision(spec).details["processes"]] == pids  # the same environment

    # A worker that died is restarted by the next provision; the others are left alone.
    os.kill(pids[1], signal.SIGKILL)
    wait_gone(pids[1])
    again = driver.provision(spec)
    new_pids = [p["pid"] for p in again.details["processes"]]
    assert new_pids[0] == pids[0] and new_pids[2] == pids[2] and new_pids[1] != pids[1]
    assert driver.wait_until_healthy(spec.name, "/health", timeout=20).endpoint == info.endpoint


def test_the_application_sees_none_of_the_workers_secrets(driver, published, root, monkeypatch):
    """An environment runs a commit's code: its processes get an allow-listed environment."""
    secrets = {"AWS_SECRET_ACCESS_KEY": "worker-secret", "AIRFLOW_CONN_DEPLOYLINE_API": "http://admin:pw@x",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:pw@db/airflow", "PYTHONPATH": "/x"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    spec = make_spec(published["r1-abcdef0"], "run-env")
    driver.provision(spec)
    for entry in state_of(root, spec.name)["processes"]:
        environ = psutil.Process(entry["pid"]).environ()
        assert not set(secrets) - {"PYTHONPATH"} & set(environ), entry
        assert not any(v in value for v in secrets.values() for value in environ.values()), entry
        assert environ["HOME"].startswith(str(root)) and environ["DEPLOYLINE_ENVIRONMENTS_DIR"] == str(root)
        assert environ["DEPLOYLINE_ENVIRONMENT"] == spec.name and environ["DEPLOYLINE_STAGE"] == spec.stage
    assert driver.wait_until_healthy(spec.name, "/health", timeout=20)


def test_teardown_kills_every_process_even_if_some_are_dead(driver, published, root):
    spec = make_spec(published["r1-abcdef0"], "run-teardown")
    info = driver.provision(spec)
    driver.wait_until_healthy(spec.name, "/health", timeout=20)
    pids = [p["pid"] for p in info.details["processes"]]
    os.kill(pids[0], signal.SIGKILL)  # already dead when teardown comes
    wait_gone(pids[0])

    # With no live backend the proxy says so.
    driver.set_backends(spec.name, [worker_ports(info)[0]])
    time.sleep(SWITCH_GRACE)  # the proxy looks at the file again
    status, body = get(info.endpoint, "/version")
    assert status == 502 and json.loads(body)["error"] == "bad gateway"

    assert driver.teardown(spec.name) is True
    assert all(gone(pid) for pid in pids)
    assert not (root / spec.name).exists()
    assert driver.get(spec.name) is None and driver.list() == []
    assert driver.teardown(spec.name) is False


CHILD = """
import json, sys
from pathlib import Path
import boto3
from moto import mock_aws
from deployline.environments.base import EnvironmentSpec
from deployline.releases import ReleaseRegistry
from deployline.environments.local import LocalDriver

root, tarball, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with mock_aws():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="child-bucket")
    s3.put_bucket_versioning(Bucket="child-bucket", VersioningConfiguration={"Status": "Enabled"})
    artifact, _ = ReleaseRegistry(s3, "child-bucket", "shop").publish("r1-abcdef0", tarball, root / "publish")
    spec = EnvironmentSpec("shop", "acceptance", name, 2, "r1-abcdef0", artifact.to_dict())
    print(json.dumps(LocalDriver(s3, root=root).provision(spec).to_dict()))
"""


def test_processes_outlive_the_process_that_provisioned_them(driver, tarballs, root, monkeypatch):
    # Two Python processes provision at the same time: they must not pick the same ports either.
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "plugins"))
    names = ["dl-shop-child-a", "dl-shop-child-b"]
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(tarballs["r1-abcdef0"]), name],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    outputs = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs

    ports = []
    for name in names:
        info = driver.wait_until_healthy(name, "/health", timeout=20)  # from this process: the child is gone
        ports += [p["port"] for p in info.details["processes"]]
        assert json.loads(get(info.endpoint, "/version")[1])["version"] == "r1-abcdef0"
    assert len(ports) == len(set(ports)) == 6
    assert sorted(e.name for e in driver.list("shop")) == names

    pids = [p["pid"] for name in names for p in state_of(root, name)["processes"]]
    for name in names:
        assert driver.teardown(name) is True
    assert all(gone(pid) for pid in pids)
    assert driver.list() == []


def test_resize_starts_and_stops_real_workers(driver, published, root):
    spec = make_spec(published["r1-abcdef0"], "run-resize")
    driver.provision(spec)
    driver.wait_until_healthy(spec.name, "/health", timeout=20)

    info = driver.resize(spec.name, 3)
    assert info.size == 3 and all(p["alive"] for p in info.details["processes"])
    ports = worker_ports(info)
    backends = json.loads((root / spec.name / "backends.json").read_text())["backends"]
    assert backends == [f"http://127.0.0.1:{port}" for port in ports]
    for _ in range(9):
        assert get(info.endpoint, "/version")[0] == 200
    assert all(requests_in_log(root, spec.name, port) == 3 for port in ports)  # round robin over all three

    stopped = [p["pid"] for p in info.details["processes"] if p["role"] == "worker"][1:]
    info = driver.resize(spec.name, 1)
    assert info.size == 1 and worker_ports(info) == ports[:1]
    assert all(gone(pid) for pid in stopped)
    before = [requests_in_log(root, spec.name, port) for port in ports]
    for _ in range(5):
        assert get(info.endpoint, "/version")[0] == 200
    after = [requests_in_log(root, spec.name, port) for port in ports]
    assert after == [before[0] + 5, before[1], before[2]]  # only the live worker gets requests
    assert driver.wait_until_healthy(spec.name, "/health", timeout=20).size == 1


def test_two_environments_at_once_get_different_ports(driver, published):
    specs = [make_spec(published["r1-abcdef0"], "a"), make_spec(published["r2-def0123"], "b", size=1)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(driver.provision, specs))
    infos = [driver.wait_until_healthy(spec.name, "/health", timeout=20) for spec in specs]
    ports = [p["port"] for info in infos for p in info.details["processes"]]
    assert len(ports) == len(set(ports)) == 5
    assert [json.loads(get(info.endpoint, "/version")[1])["version"] for info in infos] == ["r1-abcdef0", "r2-def0123"]


def test_a_tampered_artifact_is_refused_before_anything_starts(driver, published, s3, root):
    artifact = published["r1-abcdef0"] | {"version_id": None}  # a record without the object version
    s3.put_object(Bucket=BUCKET, Key=artifact["key"], Body=b"not the release that was tested")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(artifacts.ArtifactError, match="refusing a tampered or replaced artifact"):
        driver.provision(make_spec(artifact, "tampered"))
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    assert driver.list() == [] and not list(root.glob("dl-*"))


def test_a_failure_midway_stops_what_was_started(driver, published, root, monkeypatch, tmp_path):
    # The workers start, then the proxy cannot (its interpreter is missing): the workers must not stay.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    spec = make_spec(published["r1-abcdef0"], "midway")
    with pytest.raises(EnvironmentFailed, match=f"environment {spec.name}: provisioning failed: .*no-such-python"):
        driver.provision(spec)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    assert not (root / spec.name).exists() and driver.list() == []


@pytest.mark.parametrize(
    ("command", "expected"),
    [("sh run.sh --port {port} --no-such-flag", "exited with code 2(.|\n)*unrecognized arguments: --no-such-flag"),
     ("echo giving up; exit 3", "exited with code 3(.|\n)*giving up")],
    ids=["unknown-flag", "exit-3"],
)
def test_a_worker_that_fails_to_start_is_reported_with_its_log(s3, published, root, command, expected):
    driver = LocalDriver(s3, LocalDriverSettings(start_command=command), root=root)
    spec = make_spec(published["r1-abcdef0"], f"broken-{command}", size=1)
    info = driver.provision(spec)
    with pytest.raises(EnvironmentFailed, match=expected) as failure:
        driver.wait_until_healthy(spec.name, "/health", timeout=20)
    assert spec.name in str(failure.value) and "worker on port" in str(failure.value)
    assert driver.teardown(spec.name) is True
    assert all(gone(p["pid"]) for p in info.details["processes"])


def test_unhealthy_workers_time_out_with_their_answer(s3, published, root):
    settings = LocalDriverSettings(env={"SAMPLE_SERVICE_FAIL_HEALTH_AFTER": "0"})
    driver = LocalDriver(s3, settings, root=root)
    spec = make_spec(published["r1-abcdef0"], "unhealthy", size=1)
    driver.provision(spec)
    with pytest.raises(EnvironmentFailed, match=f"environment {spec.name} not healthy after 1.5s: .*HTTP 503"):
        driver.wait_until_healthy(spec.name, "/health", timeout=1.5)


def test_switching_backends_fails_no_client_request(driver, published, root):
    blue, green = make_spec(published["r1-abcdef0"], "blue"), make_spec(published["r2-def0123"], "green")
    for spec in (blue, green):
        driver.provision(spec)
    endpoint = driver.wait_until_healthy(blue.name, "/health", timeout=20).endpoint
    green_info = driver.wait_until_healthy(green.name, "/health", timeout=20)

    stop, switched = threading.Event(), threading.Event()
    results = {"requests": 0, "failures": [], "after_switch": set()}

    port = int(endpoint.rsplit(":", 1)[1])

    def client(keep_alive: bool) -> None:
        conn = None
        for _ in range(20000):  # bounded, whatever happens
            if stop.is_set():
                break
            conn = conn if keep_alive and conn else http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            after = switched.is_set()
            try:
                conn.request("GET", "/version")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    results["failures"].append(response.status)
                elif after:
                    results["after_switch"].add(json.loads(body)["version"])
            except (OSError, http.client.HTTPException) as exc:
                results["failures"].append(repr(exc))
                conn = None
            results["requests"] += 1
            if conn and not keep_alive:
                conn.close()

    threads = [threading.Thread(target=client, args=(keep_alive,)) for keep_alive in (True, False)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)
        driver.resize(blue.name, 4)  # new workers join...
        time.sleep(0.2)
        driver.resize(blue.name, 1)  # ...and leave, while requests flow
        old_pid = state_of(root, blue.name)["processes"][0]["pid"]
        driver.set_backends(blue.name, worker_ports(green_info))  # blue/green: another worker set entirely
        time.sleep(SWITCH_GRACE)
        switched.set()
        os.kill(old_pid, signal.SIGTERM)  # the old worker goes away once nothing new is sent to it
        time.sleep(0.3)
        os.kill(green_info.details["processes"][0]["pid"], signal.SIGKILL)  # a worker dying: the other answers
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    print(f"{results['requests']} requests through the switch")
    assert results["failures"] == []
    assert results["requests"] >= 300
    assert results["after_switch"] == {"r2-def0123"}


def test_a_stepped_clock_does_not_hide_an_environments_processes_from_teardown():
    """create_time is boot time + ticks, and the boot time moves when the clock is stepped: on a
    machine whose clock moved by seconds, teardown took live processes for dead and left them
    running (seen in the e2e suite). The start time in ticks identifies them instead."""
    import subprocess

    import psutil
    from deployline.commands import process_start_ticks
    from deployline.environments import local

    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        entry = {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time() + 5.0,
                 "start_ticks": process_start_ticks(process.pid)}
        assert local._alive(entry)
        assert not local._alive(entry | {"start_ticks": entry["start_ticks"] + 1})  # another process
        local._stop([entry])
        assert process.wait(timeout=10) is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
