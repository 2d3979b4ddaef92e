"""Blue/green production deploys with rollback, over any environment driver.

The new version (green) comes up next to the live one (blue), is health-checked and smoke
tested at an address of its own, then the application's router sends traffic to it.  Its
health is watched for a while; a failure before or after the switch leaves or puts traffic
back on blue and removes green.  Blue keeps running for a drain period after the switch so
that requests in flight complete, then it is removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from deployline.config import Production
from deployline.environments.base import EnvironmentDriver, EnvironmentSpec, RouterInfo
from deployline.releases import revision_of, utcnow

log = logging.getLogger(__name__)

BEFORE_SWITCH, AFTER_SWITCH = "before_switch", "after_switch"


class RolledBack(RuntimeError):
    """Green failed; production is on blue (or empty, on a first release) and green is gone."""

    def __init__(self, version: str, phase: str, reason: str, restored: str | None):
        self.version, self.phase, self.reason, self.restored = version, phase, reason, restored
        back = f"traffic {'stays' if phase == BEFORE_SWITCH else 'went back'} on {restored}" if restored \
            else "no earlier release to return to: production has no release"
        super().__init__(f"{version} rolled back {phase.replace('_', ' ')}: {reason}; {back}")

    def to_dict(self) -> dict:
        return {"version": self.version, "phase": self.phase, "reason": self.reason[-2000:],
                "restored_version": self.restored, "at": utcnow()}


class Unhealthy(RuntimeError):
    """Green stopped answering its health check after the switch."""


@dataclass
class Deployed:
    version: str
    environment: str
    endpoint: str
    previous_version: str | None
    previous_environment: str | None
    switch_seconds: float  # from the switch call until every new request goes to green
    verified_seconds: float
    drained_seconds: float
    total_seconds: float
    result: str = "deployed"  # or "already_live" (a retry after the switch)

    def to_dict(self) -> dict:
        return asdict(self)


def live_version(driver: EnvironmentDriver, router: RouterInfo | None) -> str | None:
    """The version production serves now, from the router itself (not from any record)."""
    if router is None or not router.live:
        return None
    info = driver.get(router.live)
    return info.version if info else None


def superseded_by(driver: EnvironmentDriver, application: str, version: str) -> str | None:
    """The live version when it is newer than ``version``, else None."""
    live = live_version(driver, driver.router(application))
    return live if live and revision_of(live) > revision_of(version) else None


def blue_green(driver: EnvironmentDriver, spec: EnvironmentSpec, settings: Production, *, health_path: str,
               health_timeout: float, smoke: Callable[[str], object], logger: logging.Logger = log) -> Deployed:
    """Deploy ``spec`` (stage production) as green; returns when green serves and blue is gone.

    ``smoke(url)`` raises when the smoke tests fail against ``url``.  Raises ``RolledBack``.
    """
    started = time.monotonic()
    router = driver.ensure_router(spec.application)
    blue = router.live
    blue_version = live_version(driver, router)
    logger.info("production address %s; live: %s (%s)", router.endpoint, blue or "nothing", blue_version or "-")
    if blue == spec.name:
        logger.info("%s is already live in %s: nothing to do", spec.version, spec.name)
        return Deployed(spec.version, spec.name, router.endpoint, None, None, 0, 0, 0, 0, "already_live")
    # What an interrupted deploy left (a green, a blue not yet retired) would take the idle slot.
    remove_idle(driver, spec.application, logger)
    green = driver.green_spec(router, spec)

    try:
        info = driver.provision(green)
        logger.info("green %s: %d x %s at %s", info.name, info.size, spec.version, info.endpoint)
        driver.wait_until_healthy(green.name, health_path, health_timeout)
        url = driver.test_endpoint(router, green.name)
        logger.info("green is healthy; smoke tests against %s", url)
        smoke(url)
    except Exception as exc:
        _remove(driver, green.name, logger)
        raise RolledBack(spec.version, BEFORE_SWITCH, f"{type(exc).__name__}: {exc}", blue_version) from exc
    except BaseException:  # killed: leave nothing behind; the stage's clean-up task checks again
        _remove(driver, green.name, logger)
        raise

    switching = time.monotonic()
    driver.switch(spec.application, green.name)
    switch_seconds = time.monotonic() - switching
    logger.info("switched %s to %s in %.2fs; watching health for %gs", router.endpoint, green.name,
                switch_seconds, settings.verify_seconds)
    try:
        smoke(router.endpoint)
        verified = _watch(driver, green.name, health_path, settings, logger)
    except Exception as exc:
        driver.switch(spec.application, blue)
        logger.warning("rolled back: %s serves %s again", router.endpoint, blue_version or "nothing")
        _remove(driver, green.name, logger)
        raise RolledBack(spec.version, AFTER_SWITCH, f"{type(exc).__name__}: {exc}", blue_version) from exc

    drained = 0.0
    if blue:
        logger.info("draining %s for %gs before removing it", blue, settings.drain_seconds)
        time.sleep(settings.drain_seconds)
        drained = settings.drain_seconds
        _remove(driver, blue, logger)
    return Deployed(spec.version, green.name, router.endpoint, blue_version, blue, round(switch_seconds, 3),
                    round(verified, 3), drained, round(time.monotonic() - started, 3))


def _watch(driver: EnvironmentDriver, name: str, health_path: str, settings: Production, logger) -> float:
    started = time.monotonic()
    deadline = started + settings.verify_seconds
    looks = 0
    while True:
        problem = driver.health_problem(name, health_path)
        looks += 1
        if problem:
            raise Unhealthy(f"{name} unhealthy {time.monotonic() - started:.1f}s after the switch: {problem}")
        if time.monotonic() >= deadline:
            logger.info("%s stayed healthy for %gs (%d checks)", name, settings.verify_seconds, looks)
            return time.monotonic() - started
        time.sleep(min(settings.check_interval, max(0.0, deadline - time.monotonic())))


def _remove(driver: EnvironmentDriver, name: str, logger) -> None:
    removed = driver.teardown(name)
    logger.info("environment %s %s", name, "removed" if removed else "was already gone")


def remove_idle(driver: EnvironmentDriver, application: str, logger: logging.Logger = log) -> list[str]:
    """Remove every production environment of ``application`` that takes no traffic.

    Run where no deploy of the application can run at the same time (its one-slot pool).
    """
    router = driver.router(application)
    live = router.live if router else None
    idle = [e.name for e in driver.list(application) if e.stage == "production" and e.name != live]
    for name in idle:
        _remove(driver, name, logger)
    return idle
