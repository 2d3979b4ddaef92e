"""Settings every Deployline DAG shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

# Fixed and in the past: DAGs are triggered or scheduled from now on (catchup is off).
START_DATE = datetime(2024, 1, 1, tzinfo=UTC)


def default_args(**overrides) -> dict:
    return {
        "owner": "deployline",
        "retries": 0,
        "retry_delay": timedelta(seconds=20),
    } | overrides
