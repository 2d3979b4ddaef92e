"""Blue/green production deploys with rollback, over any environment driver.

The new version (green) comes up next to the live one (blue), is health-checked and smoke
tested at an address of its own, then the application's router sends traffic to it.  Its
health is watched for a while; a failure before or after the switch leaves or puts traffic
back on blue and removes green.  Blue keeps running for a drain period after the switch so
that requests in flight complete, then it is removed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from deployline.config import Production
from deployline.environments.base import (
    EnvironmentDriver,
    EnvironmentFailed,
    EnvironmentSpec,
    RouterInfo,
    StackOperation,
)
from deployline.releases import revision_of, utcnow

log = logging.getLogger(__name__)

BEFORE_SWITCH, AFTER_SWITCH = "before_switch", "after_switch"


class RolledBack(RuntimeError):
    """Green failed; production is on blue (or empty, on a first release) and green is gone."""

    def __init__(self, version: str, phase: str, reason: str, restored: str | None,
                 switched_at: str | None = None, restored_at: str | None = None):
        self.version, self.phase, self.reason, self.restored = version, phase, reason, restored
        # After the switch: when the new version began to serve and when the previous one served
        # again (time to restore); before it, production never served the new version.
        self.switched_at, self.restored_at = switched_at, restored_at
        back = f"traffic {'stays' if phase == BEFORE_SWITCH else 'went back'} on {restored}" if restored \
            else "no earlier release to return to: production has no release"
        super().__init__(f"{version} rolled back {phase.replace('_', ' ')}: {reason}; {back}")

    def to_dict(self) -> dict:
        return {"version": self.version, "phase": self.phase, "reason": self.reason[-2000:],
                "restored_version": self.restored, "at": utcnow(),
                **({"switched_at": self.switched_at, "restored_at": self.restored_at} if self.switched_at else {})}


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


@dataclass(frozen=True)
class Wait:
    """What a deploy waits for before its next step: a stack operation to end, or a moment."""

    stack: StackOperation | None = None
    until: float | None = None  # seconds since the epoch (the next step may run in another process)


class BlueGreen:
    """The blue/green deploy as steps, so that a task can wait between them in Airflow's triggerer.

    ``step(state)`` does one phase's work and returns ``(state, next)``: a :class:`Wait` (a stack
    operation started, or green not healthy yet) or the :class:`Deployed` result; it raises
    :class:`RolledBack`. ``state`` is plain JSON, carried from one step to the next (by a deferred
    task, through the trigger). Every step goes on from where the resources are (the drivers are
    idempotent), so a step repeated after a killed worker does no harm; a whole deploy repeated
    after the switch finds its version live (``already_live``).

    Phases: ``begin`` (the router, what is live) -> ``clear`` (idle environments a killed deploy
    left) -> ``provision`` green -> ``healthy`` (health, smoke tests at green's own address,
    switch) -> ``verify`` (smoke tests through the router, health watched) -> ``drain`` ->
    ``retire`` blue. A failure before or after the switch: ``rollback`` (traffic on blue, green
    removed), then ``RolledBack``. A try killed between the switch and the end of ``verify``
    leaves ``pending`` unverified: the next try verifies (or rolls back) instead of calling it
    live.
    """

    def __init__(self, driver: EnvironmentDriver, spec: EnvironmentSpec, settings: Production, *, health_path: str,
                 health_timeout: float, smoke: Callable[[str], object], logger: logging.Logger = log,
                 look_for: float = 10.0, health_wait: float = 30.0, clock: Callable[[], float] = time.time,
                 journal: Callable[[str, dict], None] | None = None, pending: dict | None = None):
        self.driver, self.spec, self.settings = driver, spec, settings
        # journal(status, details): called before the switch ("switching"), after it ("verifying"),
        # when verified and when rolled back, to record production's state where it outlives the
        # task (the registry's production.json); pending: what it says now (a killed try's).
        self.journal, self.pending = journal, pending
        self.health_path, self.health_timeout, self.smoke = health_path, health_timeout, smoke
        self.log, self.clock = logger, clock
        # How long a step looks at green's health itself before asking to wait (a local
        # environment is healthy within seconds: no wait; instances behind a load balancer: minutes).
        self.look_for = look_for
        self.health_wait = health_wait  # then waits this long before looking again

    def start(self) -> dict:
        return {"phase": "begin", "started": self.clock()}

    def step(self, state: dict) -> tuple[dict, Wait | Deployed]:
        phase = state.get("phase")
        if phase not in _PHASES:
            raise ValueError(f"unknown deploy phase {phase!r} in {state!r}")
        return getattr(self, f"_{phase}")(dict(state))

    def stack_failed(self, state: dict, problem: str) -> dict:
        """A stack operation the last step waited for failed: green's roll back, anything else raises."""
        if state.get("phase") == "provision":
            return self._roll_back(state, BEFORE_SWITCH, f"EnvironmentFailed: {problem}")
        raise EnvironmentFailed(f"production deploy of {self.spec.version} ({state.get('phase')}): {problem}")

    # ------------------------------------------------------------------ phases

    def _begin(self, state: dict):
        pending = self.driver.start_ensure_router(self.spec.application)
        if pending:
            return state, Wait(stack=pending)
        router = self._router()
        state["blue"], state["blue_version"] = router.live, live_version(self.driver, router)
        self.log.info("production address %s; live: %s (%s)", router.endpoint, router.live or "nothing",
                      state["blue_version"] or "-")
        unverified = self.pending if (self.pending or {}).get("version") == self.spec.version \
            and (self.pending or {}).get("status") in UNVERIFIED else None
        if router.live == self.spec.name and unverified:
            # A try was killed after the switch, before its verification ended: finish it here.
            state["blue"], state["blue_version"] = unverified.get("previous_environment"), \
                unverified.get("previous_version")
            state["switch_seconds"] = None
            self.log.warning("%s went live in %s without a finished verification (%s): verifying now; a failure "
                             "switches back to %s", self.spec.version, self.spec.name, unverified.get("status"),
                             state["blue_version"] or "nothing")
            return self._verify(state | {"phase": "verify"})
        other = self.pending or {}
        if other.get("status") in UNVERIFIED and other.get("environment") == router.live and not unverified:
            raise EnvironmentFailed(
                f"production runs {other.get('version')} unverified (a deploy was stopped during its "
                f"{other.get('status')}; {other.get('previous_version') or 'nothing'} is kept to roll back to): "
                f"rerun that version's 8-production.deploy to verify it or roll it back, then deploy "
                f"{self.spec.version}")
        if router.live == self.spec.name:
            self.log.info("%s is already live in %s: nothing to do", self.spec.version, self.spec.name)
            return state, Deployed(self.spec.version, self.spec.name, router.endpoint, None, None, 0, 0, 0, 0,
                                   "already_live")
        return self._clear(state | {"phase": "clear"})

    def _clear(self, state: dict):
        # What an interrupted deploy left (a green, a blue not yet retired) would take the idle slot.
        router = self._router()
        for name in idle_environments(self.driver, self.spec.application, self.pending):
            pending = self._remove(name)
            if pending:
                return state, Wait(stack=pending)
        state["green_labels"] = self.driver.green_spec(router, self.spec).labels
        return self._provision(state | {"phase": "provision"})

    def _provision(self, state: dict):
        green = self._green(state)
        try:
            pending = self.driver.start_provision(green)
        except Exception as exc:
            return self._rollback(self._roll_back(state, BEFORE_SWITCH, _describe(exc)))
        if pending:
            return state, Wait(stack=pending)
        info = self.driver.get(green.name)
        if info is None:
            return self._rollback(self._roll_back(state, BEFORE_SWITCH, f"green {green.name} is gone after its "
                                                                         "stack settled"))
        self.log.info("green %s: %d x %s at %s", info.name, info.size, self.spec.version, info.endpoint)
        return self._healthy(state | {"phase": "healthy", "healthy_by": self.clock() + self.health_timeout})

    def _healthy(self, state: dict):
        green, router = self._green(state), self._router()
        remaining = state["healthy_by"] - self.clock()
        try:
            self.driver.wait_until_healthy(green.name, self.health_path, max(0.0, min(self.look_for, remaining)))
        except EnvironmentFailed as exc:
            if remaining > self.look_for:
                self.log.info("green %s not healthy yet (%s); looking again, for up to %.0fs more", green.name,
                              str(exc).splitlines()[0][:300], remaining)
                return state, Wait(until=self.clock() + min(self.health_wait, remaining - self.look_for))
            return self._rollback(self._roll_back(
                state, BEFORE_SWITCH, f"EnvironmentFailed: {green.name} not healthy after {self.health_timeout:g}s: "
                f"{exc}"))
        try:
            url = self.driver.test_endpoint(router, green.name)
            self.log.info("green is healthy; smoke tests against %s", url)
            self.smoke(url)
        except Exception as exc:
            return self._rollback(self._roll_back(state, BEFORE_SWITCH, _describe(exc)))
        except BaseException:  # killed: start removing green; the stage's clean-up task checks again
            self._remove(green.name)
            raise

        # Written down before the switch: a retry after a killed worker finishes the verification.
        self._note("switching", state)
        switching = time.monotonic()
        self.driver.switch(self.spec.application, green.name)
        state["switch_seconds"] = round(time.monotonic() - switching, 3)
        state["switched_at"] = utcnow()
        self._note("verifying", state)
        self.log.info("switched %s to %s in %.2fs; watching health for %gs", router.endpoint, green.name,
                      state["switch_seconds"], self.settings.verify_seconds)
        return self._verify(state | {"phase": "verify"})

    def _verify(self, state: dict):
        router = self._router()
        try:
            self.smoke(router.endpoint)
            state["verified_seconds"] = round(_watch(self.driver, self.spec.name, self.health_path, self.settings,
                                                     self.log), 3)
        except Exception as exc:
            back = state["blue"] if state["blue"] and self.driver.get(state["blue"]) else None
            self.driver.switch(self.spec.application, back)
            state["restored_at"] = utcnow() if back else None
            self.log.warning("rolled back: %s serves %s again", router.endpoint,
                             state["blue_version"] if back else "nothing")
            return self._rollback(self._roll_back(state, AFTER_SWITCH, _describe(exc)))
        self._note("verified", state)
        if not state["blue"]:
            return self._done(state, drained=0.0)
        self.log.info("draining %s for %gs before removing it", state["blue"], self.settings.drain_seconds)
        state |= {"phase": "drain", "drain_until": self.clock() + self.settings.drain_seconds}
        return self._drain(state)

    def _drain(self, state: dict):
        if self.clock() < state["drain_until"]:
            return state, Wait(until=state["drain_until"])
        return self._retire(state | {"phase": "retire"})

    def _retire(self, state: dict):
        pending = self._remove(state["blue"])
        if pending:
            return state, Wait(stack=pending)
        return self._done(state, drained=self.settings.drain_seconds)

    def _rollback(self, state: dict):
        pending = self._remove(self.spec.name)
        if pending:
            return state, Wait(stack=pending)
        self._note("rolled_back", state)
        failed = state["rollback"]
        after = failed["phase"] == AFTER_SWITCH
        raise RolledBack(self.spec.version, failed["phase"], failed["reason"], state["blue_version"],
                         state.get("switched_at") if after else None, state.get("restored_at") if after else None)

    # ------------------------------------------------------------------ helpers

    def _done(self, state: dict, drained: float):
        router = self._router()
        return state, Deployed(self.spec.version, self.spec.name, router.endpoint, state["blue_version"],
                               state["blue"], state["switch_seconds"], state["verified_seconds"], drained,
                               round(self.clock() - state["started"], 3))

    def _note(self, status: str, state: dict) -> None:
        if self.journal:
            self.journal(status, {"environment": self.spec.name, "previous_version": state.get("blue_version"),
                                  "previous_environment": state.get("blue")})

    def _roll_back(self, state: dict, phase: str, reason: str) -> dict:
        self.log.warning("rolling back %s (%s): %s", self.spec.version, phase.replace("_", " "), reason[-500:])
        return state | {"phase": "rollback", "rollback": {"phase": phase, "reason": reason}}

    def _router(self) -> RouterInfo:
        router = self.driver.router(self.spec.application)
        if router is None:
            raise EnvironmentFailed(f"the production address of {self.spec.application} is gone")
        return router

    def _green(self, state: dict) -> EnvironmentSpec:
        return dataclasses.replace(self.spec, labels=state["green_labels"])

    def _remove(self, name: str) -> StackOperation | None:
        pending = self.driver.start_teardown(name)
        self.log.info("environment %s %s", name, "being removed" if pending else "removed (or already gone)")
        return pending


_PHASES = ("begin", "clear", "provision", "healthy", "verify", "drain", "retire", "rollback")
UNVERIFIED = ("switching", "verifying")  # production.json's pending statuses of a version not verified yet


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def blue_green(driver: EnvironmentDriver, spec: EnvironmentSpec, settings: Production, *, health_path: str,
               health_timeout: float, smoke: Callable[[str], object], logger: logging.Logger = log,
               journal: Callable[[str, dict], None] | None = None, pending: dict | None = None) -> Deployed:
    """Deploy ``spec`` (stage production) as green, waiting here; returns when green serves and blue is gone.

    The steps of :class:`BlueGreen`, run one after the other in this process (the pipeline's
    task waits in the triggerer instead). ``smoke(url)`` raises when the smoke tests fail
    against ``url``.  Raises ``RolledBack``.
    """
    machine = BlueGreen(driver, spec, settings, health_path=health_path, health_timeout=health_timeout, smoke=smoke,
                        logger=logger, journal=journal, pending=pending)
    state = machine.start()
    while True:
        state, following = machine.step(state)
        if isinstance(following, Deployed):
            return following
        if following.stack:
            try:
                driver.wait_for(following.stack)
            except EnvironmentFailed as exc:
                state = machine.stack_failed(state, str(exc))
        else:
            time.sleep(max(0.0, following.until - machine.clock()))


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


def idle_environments(driver: EnvironmentDriver, application: str, pending: dict | None = None) -> list[str]:
    """The production environments of ``application`` that take no traffic, but for the one to roll
    back to while ``pending`` (production.json's) says the live version is not verified yet."""
    router = driver.router(application)
    live = router.live if router else None
    keep = {live}
    if (pending or {}).get("status") in UNVERIFIED and pending.get("environment") == live:
        keep.add(pending.get("previous_environment"))
    return [e.name for e in driver.list(application) if e.stage == "production" and e.name not in keep]


def remove_idle(driver: EnvironmentDriver, application: str, logger: logging.Logger = log,
                pending: dict | None = None) -> list[str]:
    """Remove every production environment of ``application`` that takes no traffic (waiting here).

    Run where no deploy of the application can run at the same time (its one-slot pool).
    """
    idle = idle_environments(driver, application, pending)
    for name in idle:
        _remove(driver, name, logger)
    return idle


def start_removing_idle(driver: EnvironmentDriver, application: str, logger: logging.Logger = log,
                        pending: dict | None = None) -> StackOperation | None:
    """``remove_idle`` without waiting: starts removing the next idle environment and returns the stack
    operation to wait for, or None when none is left (call it again after each wait)."""
    for name in idle_environments(driver, application, pending):
        pending = driver.start_teardown(name)
        logger.info("idle environment %s %s", name, "being removed" if pending else "removed")
        if pending:
            return pending
    return None
