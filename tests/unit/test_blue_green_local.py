"""Blue/green deploys, rollbacks and in-place updates with the local driver: real processes and HTTP."""

import json
import threading
import time

import pytest
from deployline.config import LocalDriverSettings, Production
from deployline.deployments import AFTER_SWITCH, BEFORE_SWITCH, RolledBack, blue_green, remove_idle, superseded_by
from deployline.environments.base import EnvironmentSpec, environment_name
from deployline.environments.local import LocalDriver
from test_local_environments import BUCKET, get

__all__ = ["BUCKET"]  # the s3 fixture reads the module's BUCKET
V1, V2 = "r1-abcdef0", "r2-bcdef01"
FAST = Production(drain_seconds=0.5, verify_seconds=1.5, check_interval=0.2)




def spec(artifact: dict, stage: str = "production", size: int = 2, name: str | None = None) -> EnvironmentSpec:
    version = artifact["key"].split("/")[2]
    return EnvironmentSpec(application="shop", stage=stage, size=size, version=version, artifact=artifact,
                           name=name or environment_name("shop", stage, version))


def version_at(url: str) -> str:
    status, body = get(url, "/version")
    assert status == 200, body
    return json.loads(body)["version"]


def no_smoke(url: str) -> None:
    assert version_at(url)


class ClientLoop:
    """Requests against ``url`` without pause, from a thread; counts answers by status."""

    def __init__(self, url: str):
        self.url, self.statuses, self.errors, self.versions = url, {}, [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                status, body = get(self.url, "/version")
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 200:
                    self.versions.add(json.loads(body)["version"])
            except OSError as exc:
                self.errors.append(repr(exc))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(n for status, n in self.statuses.items() if status != 200)


def deploy(driver, artifact, smoke=no_smoke, settings=FAST):
    return blue_green(driver, spec(artifact), settings, health_path="/health", health_timeout=30, smoke=smoke)


def test_first_release_then_a_switch_without_a_failed_request(driver, published):
    first = deploy(driver, published[V1])
    assert first.previous_version is None and version_at(first.endpoint) == V1
    with ClientLoop(first.endpoint) as loop:
        second = deploy(driver, published[V2])
        time.sleep(0.5)
    assert second.endpoint == first.endpoint and second.previous_version == V1
    assert loop.failed == 0 and loop.versions == {V1, V2}
    assert sum(loop.statuses.values()) > 50
    assert [e.version for e in driver.list("shop")] == [V2]  # blue is gone after the drain
    assert driver.router("shop").live == second.environment
    assert superseded_by(driver, "shop", V1) == V2 and superseded_by(driver, "shop", "r3-fffffff") is None


def test_a_retry_after_the_switch_does_nothing(driver, published):
    deploy(driver, published[V1])
    again = deploy(driver, published[V1])
    assert again.result == "already_live" and len(driver.list("shop")) == 1


def test_failing_smoke_tests_before_the_switch_keep_blue(driver, published):
    live = deploy(driver, published[V1])

    def smoke(url):
        raise AssertionError(f"smoke tests failed against {url}")

    with ClientLoop(live.endpoint) as loop, pytest.raises(RolledBack) as caught:
        deploy(driver, published[V2], smoke=smoke)
    assert caught.value.phase == BEFORE_SWITCH and caught.value.restored == V1
    assert "smoke tests failed" in str(caught.value)
    assert loop.failed == 0 and loop.versions == {V1}
    assert [e.version for e in driver.list("shop")] == [V1]


def test_unhealthy_after_the_switch_goes_back_to_blue(s3, root, published):
    healthy = LocalDriver(s3, root=root)
    live = deploy(healthy, published[V1])
    # The same root, but this release's workers turn unhealthy 2 s after they start.
    failing = LocalDriver(s3, LocalDriverSettings(env={"SAMPLE_SERVICE_FAIL_HEALTH_AFTER": "2"}), root=root)
    with ClientLoop(live.endpoint) as loop, pytest.raises(RolledBack) as caught:
        deploy(failing, published[V2], settings=Production(drain_seconds=0, verify_seconds=10,
                                                                 check_interval=0.2))
    assert caught.value.phase == AFTER_SWITCH and "unhealthy" in caught.value.reason
    assert version_at(live.endpoint) == V1 and loop.errors == []
    assert [e.version for e in healthy.list("shop")] == [V1]
    assert healthy.router("shop").live == live.environment


def test_first_release_failing_leaves_production_empty(driver, published):
    with pytest.raises(RolledBack, match="no earlier release"):
        deploy(driver, published[V1], smoke=lambda url: 1 / 0)
    router = driver.router("shop")
    assert router.live is None and driver.list("shop") == []
    assert get(router.endpoint, "/version")[0] == 502


def test_remove_idle_keeps_the_live_environment(driver, published):
    live = deploy(driver, published[V1])
    stray = driver.provision(spec(published[V2]))  # a green left by a killed deploy
    assert remove_idle(driver, "shop") == [stray.name]
    assert [e.name for e in driver.list("shop")] == [live.environment]


def test_the_router_keeps_its_address_after_its_process_dies(driver, published):
    live = deploy(driver, published[V1])
    router = driver.router("shop")
    proxy = router.details["processes"][0]["pid"]
    import os
    import signal

    os.kill(proxy, signal.SIGKILL)
    time.sleep(0.2)
    again = driver.ensure_router("shop")
    assert again.endpoint == live.endpoint and version_at(live.endpoint) == V1


def test_update_replaces_the_version_in_place_without_a_failed_request(driver, published):
    name = environment_name("shop", "preproduction", "shop")
    first = driver.update(spec(published[V1], stage="preproduction", size=1, name=name))
    driver.wait_until_healthy(name, "/health", 30)
    with ClientLoop(first.endpoint) as loop:
        second = driver.update(spec(published[V2], stage="preproduction", size=3, name=name))
        time.sleep(0.3)
    assert second.endpoint == first.endpoint and second.version == V2 and second.size == 3
    assert loop.failed == 0, (loop.statuses, loop.errors[:3])
    assert loop.versions == {V1, V2}
    assert driver.health_problem(name, "/health") is None
    folders = sorted(p.name for p in (driver.root / name).iterdir() if p.name.startswith("release"))
    assert folders == [f"release-{V2}"]
