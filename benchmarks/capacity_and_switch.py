"""What the capacity stage measures for the sample service, the load Locust itself can generate
here, and how long a blue/green switch takes (local driver, S3 in moto, real processes).

Prints one JSON object.  ``--quick`` runs tiny profiles (used by the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
SERVICE = ROOT / "include" / "sample-service"
BUCKET = "deployline-bench"

from deployline import embedded  # noqa: E402
from deployline.config import LoadProfile, Production, Thresholds  # noqa: E402
from deployline.deployments import blue_green  # noqa: E402
from deployline.environments.base import EnvironmentSpec, environment_name  # noqa: E402
from deployline.environments.local import LocalDriver  # noqa: E402
from deployline.load_tests import run_load_test  # noqa: E402
from deployline.releases import ReleaseRegistry  # noqa: E402

NO_LIMITS = Thresholds(p95_ms=1e9, p99_ms=1e9, max_error_rate=1, min_rps=0)


def build(out: Path, version: str) -> Path:
    env = {**os.environ, "DEPLOYLINE_VERSION": version, "DEPLOYLINE_COMMIT": version[-7:]}
    subprocess.run([sys.executable, "build.py", "--out", str(out)], cwd=SERVICE, env=env, check=True,
                   capture_output=True)
    return out / f"sample-service-{version}.tar.gz"


def profile_numbers(result) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.to_dict().items()
            if k in ("users", "duration_seconds", "requests", "failures", "throughput_rps", "p50_ms", "p95_ms",
                     "p99_ms")}


def capacity(driver, artifact: dict, work: Path, profiles: dict[str, LoadProfile], size: int) -> dict:
    name = environment_name("bench", "capacity", "bench")
    spec = EnvironmentSpec("bench", "capacity", name, size, artifact["key"].split("/")[2], artifact)
    try:
        driver.provision(spec)
        info = driver.wait_until_healthy(name, "/health", 60)
        return {label: profile_numbers(run_load_test(label, profile, "tests/load/locustfile.py", info.endpoint,
                                                     SERVICE, work / "reports"))
                for label, profile in profiles.items()}
    finally:
        driver.teardown(name)


HELLO = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def hello_server(port: int) -> None:
    """As little work per request as Python allows: the generator, not this, should be the limit."""

    async def handle(reader, writer):
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(HELLO)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def generator_ceiling(work: Path, users: int, seconds: int) -> dict:
    """Locust (FastHttpUser, no wait) against a trivial server: requests/s and Locust's CPU."""
    port = embedded.free_port()
    server = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
                               f"import capacity_and_switch as b; b.hello_server({port})"])
    (work / "hello_locustfile.py").write_text(textwrap.dedent("""\
        from locust import FastHttpUser, constant, task

        class Hello(FastHttpUser):
            wait_time = constant(0)

            @task
            def hello(self):
                self.client.get("/")
        """))
    cpu: list[float] = []
    stop = threading.Event()

    def sample():  # the CPU share of Locust's own process while it runs
        while not stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                if "hello_locustfile.py" in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                    try:
                        cpu.append(proc.cpu_percent(interval=1.0))
                    except psutil.Error:
                        pass
                    break
            else:
                time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # Up when it answers, however busy the machine (a fixed 0.5 s was not always enough: the
        # first requests failed, or none were made).
        embedded.wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200,
                            60, "the trivial server")
        profile = LoadProfile(users=users, spawn_rate=users, duration_seconds=seconds, thresholds=NO_LIMITS)
        result = run_load_test("ceiling", profile, "hello_locustfile.py", f"http://127.0.0.1:{port}", work,
                               work / "ceiling")
    finally:
        stop.set()
        server.terminate()
        server.wait(10)
    busy = [c for c in cpu if c > 0]
    return profile_numbers(result) | {"locust_cpu_percent_median": round(statistics.median(busy), 1) if busy else None}


def switches(driver, published: dict, count: int) -> dict:
    """Blue/green deploys one after the other, a client loop on the production address throughout."""
    from http.client import HTTPConnection

    settings = Production(drain_seconds=1, verify_seconds=2, check_interval=0.5)
    versions = list(published)
    first = blue_green(driver, spec_of(published[versions[0]]), settings, health_path="/health", health_timeout=60,
                       smoke=lambda url: None)
    port = int(first.endpoint.rsplit(":", 1)[1])
    seen, failures, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            conn = HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/version")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    failures.append(response.status)
                else:
                    seen.append(json.loads(body)["version"])
            except OSError as exc:
                failures.append(repr(exc))
            finally:
                conn.close()

    client = threading.Thread(target=loop, daemon=True)
    client.start()
    timings = []
    try:
        for n in range(count):
            version = versions[(n + 1) % len(versions)]
            deployed = blue_green(driver, spec_of(published[version]), settings, health_path="/health",
                                  health_timeout=60, smoke=lambda url: None)
            timings.append({"switch_s": deployed.switch_seconds, "deploy_s": deployed.total_seconds})
    finally:
        stop.set()
        client.join(15)
        router = driver.router("bench")
        if router and router.live:
            driver.switch("bench", None)
            driver.teardown(router.live)
        driver.remove_router("bench")
    return {
        "switches": count,
        "switch_s_median": statistics.median(t["switch_s"] for t in timings),
        "deploy_s_median": round(statistics.median(t["deploy_s"] for t in timings), 2),
        "requests": len(seen) + len(failures),
        "failed_requests": len(failures),
    }


def spec_of(artifact: dict) -> EnvironmentSpec:
    version = artifact["key"].split("/")[2]
    return EnvironmentSpec("bench", "production", environment_name("bench", "production", version), 2, version,
                           artifact)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny profiles: checks the code, measures nothing")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    from moto import mock_aws

    seconds = 2 if args.quick else 15
    profiles = {
        "expected": LoadProfile(users=2 if args.quick else 10, spawn_rate=10, duration_seconds=seconds,
                                thresholds=NO_LIMITS),
        "peak": LoadProfile(users=4 if args.quick else 30, spawn_rate=15, duration_seconds=seconds,
                            thresholds=NO_LIMITS),
    }
    with tempfile.TemporaryDirectory() as tmp, mock_aws():
        work = Path(tmp)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        versions = ["r1-aaaaaaa", "r2-bbbbbbb"]
        registry = ReleaseRegistry(s3, BUCKET, "bench")
        published = {v: registry.publish(v, build(work / "dist", v), work / "publish")[0].to_dict() for v in versions}
        driver = LocalDriver(s3, root=work / "environments")
        result = {
            "capacity_size_2": capacity(driver, published[versions[0]], work, profiles, size=2),
            "locust_ceiling": generator_ceiling(work, users=4 if args.quick else 20, seconds=seconds),
            "blue_green": switches(driver, published, count=1 if args.quick else 5),
            "machine": {"cpus": os.cpu_count()},
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
