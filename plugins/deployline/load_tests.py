"""Load tests with Locust (headless), judged by the thresholds of the pipeline config.

Locust runs as its own process (it patches the standard library with gevent, which must not
happen inside an Airflow worker).  Its CSV statistics are the source of the numbers; the HTML
report is kept next to them for people.
"""

from __future__ import annotations

import csv
import logging
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deployline.commands import run_command
from deployline.config import LoadProfile, Thresholds

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5  # seconds users get to finish their task when the time is up
# Locust's own start-up and shut-down, on top of the profile's duration.
OVERHEAD_TIMEOUT = 120


class LoadTestFailed(RuntimeError):
    """A profile missed a threshold (the message has the numbers), or Locust produced no statistics."""


@dataclass
class Check:
    metric: str
    limit: float
    value: float
    passed: bool

    def describe(self) -> str:
        relation = ">=" if self.metric == "throughput_rps" else "<="
        verdict = "ok" if self.passed else "MISSED"
        return f"{self.metric} {_fmt(self.value)} (limit {relation} {_fmt(self.limit)}): {verdict}"


@dataclass
class ProfileResult:
    profile: str
    users: int
    spawn_rate: float
    duration_seconds: int
    requests: int
    failures: int
    error_rate: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    checks: list[Check] = field(default_factory=list)
    reports: dict[str, str] = field(default_factory=dict)  # name -> s3:// URI (or local path)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def locust_command(locustfile: str, host: str, profile: LoadProfile, prefix: Path, processes: int = 1) -> list[str]:
    command = [
        sys.executable, "-m", "locust", "-f", locustfile, "--headless", "--host", host,
        "--users", str(profile.users), "--spawn-rate", f"{profile.spawn_rate:g}",
        "--run-time", f"{profile.duration_seconds}s", "--stop-timeout", str(STOP_TIMEOUT),
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        # The thresholds decide, not Locust's exit code (which is 1 on any failed request).
        "--exit-code-on-error", "0",
    ]
    if processes > 1:
        command += ["--processes", str(processes)]
    return command


def read_aggregate(stats_csv: Path) -> dict:
    """The ``Aggregated`` row of Locust's ``<prefix>_stats.csv``."""
    try:
        with open(stats_csv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise LoadTestFailed(f"Locust wrote no statistics ({stats_csv}): {exc.strerror}") from exc
    for row in rows:
        if row.get("Name") == "Aggregated":
            return row
    raise LoadTestFailed(f"{stats_csv} has no Aggregated row")


def _number(row: dict, column: str) -> float:
    try:
        return float(row[column])
    except (KeyError, TypeError, ValueError):
        return math.nan  # "N/A": no request completed


def judge(name: str, profile: LoadProfile, row: dict) -> ProfileResult:
    requests, failures = int(_number(row, "Request Count") or 0), int(_number(row, "Failure Count") or 0)
    result = ProfileResult(
        profile=name, users=profile.users, spawn_rate=profile.spawn_rate, duration_seconds=profile.duration_seconds,
        requests=requests, failures=failures, error_rate=failures / requests if requests else 1.0,
        throughput_rps=_number(row, "Requests/s"), p50_ms=_number(row, "50%"), p95_ms=_number(row, "95%"),
        p99_ms=_number(row, "99%"), max_ms=_number(row, "Max Response Time"),
    )
    result.checks = checks(result, profile.thresholds)
    return result


def checks(result: ProfileResult, limits: Thresholds) -> list[Check]:
    def at_most(metric: str, value: float, limit: float) -> Check:
        return Check(metric, limit, value, not math.isnan(value) and value <= limit)

    return [
        at_most("p95_ms", result.p95_ms, limits.p95_ms),
        at_most("p99_ms", result.p99_ms, limits.p99_ms),
        at_most("error_rate", result.error_rate, limits.max_error_rate),
        Check("throughput_rps", limits.min_rps, result.throughput_rps,
              result.requests > 0 and not math.isnan(result.throughput_rps)
              and result.throughput_rps >= limits.min_rps),
    ]


def run_load_test(name: str, profile: LoadProfile, locustfile: str, host: str, cwd: Path, out_dir: Path,
                  processes: int = 1, env: dict[str, str] | None = None,
                  logger: logging.Logger | None = None, stop_when=None) -> ProfileResult:
    """Run one profile against ``host``; the reports are written to ``out_dir/<name>*``.

    ``stop_when`` (see ``commands.run_command``) ends the run early with ``CommandStopped``."""
    if not (cwd / locustfile).is_file():
        raise LoadTestFailed(f"capacity.locustfile: {locustfile} does not exist in the repository at this commit")
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / name
    command = shlex.join(locust_command(locustfile, host, profile, prefix, processes))
    run_command(command, cwd, profile.duration_seconds + OVERHEAD_TIMEOUT, env=env, logger=logger or log,
                stop_when=stop_when)
    result = judge(name, profile, read_aggregate(Path(f"{prefix}_stats.csv")))
    result.reports = {p.name: str(p) for p in sorted(out_dir.glob(f"{name}*")) if p.is_file()}
    return result


def summary_table(results: list[ProfileResult]) -> str:
    """A fixed-width table for the task log."""
    header = f"{'profile':<10} {'users':>6} {'requests':>9} {'failures':>9} {'rps':>8} {'p50':>7} {'p95':>7} " \
             f"{'p99':>7}  result"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.profile:<10} {r.users:>6} {r.requests:>9} {r.failures:>9} {_fmt(r.throughput_rps):>8} "
                     f"{_fmt(r.p50_ms):>7} {_fmt(r.p95_ms):>7} {_fmt(r.p99_ms):>7}  "
                     f"{'pass' if r.passed else 'FAIL'}")
        lines += [f"    {c.describe()}" for c in r.checks]
    return "\n".join(lines)


def failure_message(result: ProfileResult) -> str:
    missed = "; ".join(c.describe() for c in result.checks if not c.passed)
    return (f"load profile {result.profile!r} ({result.users} users, {result.duration_seconds}s) missed its "
            f"thresholds: {missed}. Measured: {result.requests} requests, {result.failures} failures, "
            f"{_fmt(result.throughput_rps)} req/s, p95 {_fmt(result.p95_ms)} ms, p99 {_fmt(result.p99_ms)} ms")


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.1f}"
