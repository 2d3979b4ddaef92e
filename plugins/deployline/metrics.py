"""Delivery metrics from the release registry: the four DORA metrics and per-stage figures.

Everything here is a pure function of release records (``ReleaseRegistry.records()``) and a
time window, so the UI plugin, the ``delivery_metrics`` DAG and the tests compute the same
numbers.  The definitions are in ``docs/METRICS.md``; in short:

* a *deploy* is one production attempt in a record's ``deployments`` (``deployed`` or
  ``rolled_back``), counted in the window that holds its ``at``;
* *lead time* is per commit: from ``committed_at`` to the deploy that first put it live;
* a deploy *failed* when it rolled back, or when a later commit (recorded in a later release,
  deployed or not) reverts (``git revert``) one of the commits it put live;
* *time to restore* runs from the moment production served a failed change until it served a
  good version again: for a rollback after the switch, from the switch to the switch back (a
  rollback before the switch never reached users: 0); for a first release with nothing to go
  back to, until the next successful deploy; for a revert, until the deploy that put the revert
  live. Counted in the window that holds the restore; an incident not restored by the window's
  end is open, its hours counted up to that end.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from deployline.releases import revision_of

# Stage groups of the pipeline, in the order a release goes through them.
STAGES = ("1-baking", "2-commit", "3-acceptance", "5-exploratory", "6-capacity", "7-pre-production",
          "8-production")
DEPLOYED, ROLLED_BACK = "deployed", "rolled_back"


def parse_time(value: str | None) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime (naive times are taken as UTC); None stays None."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


@dataclass(frozen=True)
class Window:
    """``[start, end)``."""

    start: datetime
    end: datetime

    def __post_init__(self):
        # Day rows and comparisons are in UTC: bounds in another zone (or naive, taken as UTC) are converted.
        for name in ("start", "end"):
            moment = getattr(self, name)
            object.__setattr__(self, name, (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC))
        if self.end <= self.start:
            raise ValueError(f"window end {self.end.isoformat()} is not after its start {self.start.isoformat()}")

    @classmethod
    def last(cls, days: float, end: datetime | None = None) -> Window:
        end = end or datetime.now(UTC)
        return cls(end - timedelta(days=days), end)

    @property
    def days(self) -> float:
        return (self.end - self.start).total_seconds() / 86400

    def __contains__(self, moment: datetime | None) -> bool:
        return moment is not None and self.start <= moment < self.end

    def to_dict(self) -> dict:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "days": round(self.days, 3)}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p90(values: list[float]) -> float | None:
    """Nearest rank: the smallest value with at least 90 % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def summary(values: list[float]) -> dict:
    return {"count": len(values), "median": median(values), "p90": p90(values)}


# ------------------------------------------------------------------------------- deploys


@dataclass(frozen=True)
class Deploy:
    version: str
    result: str  # deployed | rolled_back
    at: datetime  # live (deployed) or rolled back
    run_id: str | None
    previous_version: str | None
    # Rolled back after the switch: when it began to serve and when the previous version served again.
    switched_at: datetime | None = None
    restored_at: datetime | None = None
    phase: str | None = None
    restored_version: str | None = None

    @property
    def revision(self) -> int:
        return revision_of(self.version)


def deploys(records: list[dict]) -> list[Deploy]:
    """Every production attempt of every record, oldest first."""
    found = []
    for record in records:
        for attempt in record.get("deployments") or []:
            at = parse_time(attempt.get("at"))
            if at and attempt.get("result") in (DEPLOYED, ROLLED_BACK):
                found.append(Deploy(record["version"], attempt["result"], at, attempt.get("run_id"),
                                    attempt.get("previous_version"), parse_time(attempt.get("switched_at")),
                                    parse_time(attempt.get("restored_at")), attempt.get("phase"),
                                    attempt.get("restored_version")))
    return sorted(found, key=lambda d: d.at)


def _commits_of(record: dict) -> list[dict]:
    return record.get("included_commits") or ([record["commit"]] if record.get("commit") else [])


def shipped_commits(records: list[dict], successful: list[Deploy]) -> dict[int, list[dict]]:
    """For each successful deploy (by index), the commits it put live for the first time."""
    by_revision = sorted(records, key=lambda r: revision_of(r["version"]))
    live: set[str] = set()
    shipped = {}
    for index, deploy in enumerate(successful):
        floor = revision_of(deploy.previous_version) if deploy.previous_version else 0
        commits = []
        for record in by_revision:
            if floor < revision_of(record["version"]) <= deploy.revision:
                commits += [c for c in _commits_of(record) if c.get("sha") and c["sha"] not in live]
        unique = list({c["sha"]: c for c in commits}.values())
        live.update(c["sha"] for c in unique)
        shipped[index] = unique
    return shipped


@dataclass(frozen=True)
class Incident:
    """A failed deploy and what restored production."""

    version: str
    kind: str  # rolled_back | reverted
    failed_at: datetime  # production began to serve the failed change
    restored_at: datetime | None  # production served a good version again
    restored_by: str | None  # the version that served then
    deploy_at: datetime | None = None  # the failed deploy's ``at`` (which deploy failed)

    def hours(self, until: datetime) -> float:
        """Hours to restore, or hours open so far as of ``until``."""
        end = self.restored_at if self.restored_at and self.restored_at <= until else until
        return (end - self.failed_at).total_seconds() / 3600

    def to_dict(self, until: datetime) -> dict:
        return {"version": self.version, "kind": self.kind, "failed_at": self.failed_at.isoformat(),
                "restored_at": self.restored_at.isoformat() if self.restored_at else None,
                "restored_by": self.restored_by, "hours": round(self.hours(until), 3)}


def incidents(records: list[dict]) -> list[Incident]:
    all_deploys = deploys(records)
    successful = [d for d in all_deploys if d.result == DEPLOYED]
    shipped = shipped_commits(records, successful)
    found = []
    for deploy in all_deploys:
        if deploy.result != ROLLED_BACK:
            continue
        if deploy.phase == "before_switch" and deploy.restored_version:
            # Production kept serving the previous version: a failed change that hurt nobody.
            found.append(Incident(deploy.version, ROLLED_BACK, deploy.at, deploy.at, deploy.restored_version,
                                  deploy.at))
        elif deploy.restored_version and (deploy.restored_at or deploy.phase == "after_switch"):
            # Switched back: restored when the previous version served again (older records: the
            # rollback's end).
            found.append(Incident(deploy.version, ROLLED_BACK, deploy.switched_at or deploy.at,
                                  deploy.restored_at or deploy.at, deploy.restored_version, deploy.at))
        else:  # nothing to go back to (or an old record): restored by the next successful deploy
            after = next((d for d in successful if d.at > deploy.at), None)
            found.append(Incident(deploy.version, ROLLED_BACK, deploy.at, after and after.at,
                                  after and after.version, deploy.at))
    for index, deploy in enumerate(successful):
        shas = [c["sha"] for c in shipped[index]]

        def reverts_this(commit: dict, shas=shas) -> bool:
            return any(s.startswith(r) for r in commit.get("reverts") or [] for s in shas)

        # A revert in any later record marks the deploy failed, deployed or not; production is
        # restored when a deploy puts a revert live.
        if not any(reverts_this(c) for r in records if revision_of(r["version"]) > deploy.revision
                   for c in _commits_of(r)):
            continue
        fix = next((successful[later] for later in range(index + 1, len(successful))
                    if any(reverts_this(c) for c in shipped[later])), None)
        found.append(Incident(deploy.version, "reverted", deploy.at, fix and fix.at, fix and fix.version, deploy.at))
    return sorted(found, key=lambda i: i.failed_at)


# ------------------------------------------------------------------------------- the four metrics


def deployment_frequency(records: list[dict], window: Window) -> dict:
    count = sum(1 for d in deploys(records) if d.result == DEPLOYED and d.at in window)
    return {"deploys": count, "per_day": count / window.days, "per_week": count / window.days * 7}


def lead_time(records: list[dict], window: Window) -> dict:
    """Hours from commit to live, per commit put live by a deploy in the window."""
    successful = [d for d in deploys(records) if d.result == DEPLOYED]
    shipped = shipped_commits(records, successful)
    hours = []
    for index, deploy in enumerate(successful):
        if deploy.at in window:
            hours += [(deploy.at - parse_time(c["committed_at"])).total_seconds() / 3600
                      for c in shipped[index] if c.get("committed_at")]
    return summary(hours) | {"unit": "hours"}


def change_failure_rate(records: list[dict], window: Window) -> dict:
    attempts = [d for d in deploys(records) if d.at in window]
    failed = {(i.version, i.deploy_at) for i in incidents(records)}
    failures = sum(1 for d in attempts if (d.version, d.at) in failed)
    return {"deploys": len(attempts), "failed": failures,
            "rate": failures / len(attempts) if attempts else None}


def time_to_restore(records: list[dict], window: Window) -> dict:
    found = incidents(records)
    restored = [i for i in found if i.restored_at in window]
    still_open = [i for i in found
                  if i.failed_at < window.end and (i.restored_at is None or i.restored_at >= window.end)]
    return summary([i.hours(window.end) for i in restored]) | {
        "unit": "hours",
        "restored": [i.to_dict(window.end) for i in restored],
        "open": [i.to_dict(window.end) for i in still_open],
    }


# ------------------------------------------------------------------------------- stages


def stage_entries(records: list[dict]) -> list[tuple[str, dict]]:
    """(stage, entry) for every recorded stage result; an approved exploratory stage counts as passed."""
    found = []
    for record in records:
        for stage, entry in (record.get("stages") or {}).items():
            if stage in STAGES and entry.get("result") != "running":
                found.append((stage, entry))
    return found


def stage_statistics(records: list[dict], window: Window) -> dict:
    """Per stage: passed, failed, superseded, pass rate and seconds taken (median, p90)."""
    counts: dict[str, Counter] = {stage: Counter() for stage in STAGES}
    seconds: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for stage, entry in stage_entries(records):
        finished = parse_time(entry.get("finished_at"))
        if finished not in window:
            continue
        counts[stage][entry.get("result")] += 1
        started = parse_time(entry.get("started_at"))
        if started:
            seconds[stage].append((finished - started).total_seconds())
    result = {}
    for stage in STAGES:
        passed, failed = counts[stage]["success"], counts[stage]["failed"]
        result[stage] = {"passed": passed, "failed": failed, "superseded": counts[stage]["superseded"],
                         "pass_rate": passed / (passed + failed) if passed + failed else None,
                         "seconds": summary(seconds[stage])}
    return result


# ------------------------------------------------------------------------------- everything


def daily_deploys(records: list[dict], window: Window) -> list[dict]:
    """One row per day of the window: deploys and failed deploys (for charts)."""
    failed = {(i.version, i.deploy_at) for i in incidents(records)}
    days: dict[date, Counter] = {}
    day = window.start.date()
    while day <= (window.end - timedelta(microseconds=1)).date():
        days[day] = Counter()
        day += timedelta(days=1)
    for deploy in deploys(records):
        if deploy.at in window:
            days[deploy.at.date()]["deploys"] += 1
            days[deploy.at.date()]["failed"] += (deploy.version, deploy.at) in failed
    return [{"date": d.isoformat(), "deploys": c["deploys"], "failed": c["failed"]} for d, c in days.items()]


def delivery_metrics(application: str, records: list[dict], window: Window) -> dict:
    """All figures for one application and window, as JSON-ready data."""
    return {
        "application": application,
        "window": window.to_dict(),
        "releases": len(records),
        "deployment_frequency": deployment_frequency(records, window),
        "lead_time": lead_time(records, window),
        "change_failure_rate": change_failure_rate(records, window),
        "time_to_restore": time_to_restore(records, window),
        "stages": stage_statistics(records, window),
        "daily": daily_deploys(records, window),
    }
