"""Smoke tests: a few fast, read-only checks of a LIVE sample-service.

Run by Deployline's pre-production and production stages after a deployment:

    python -m pytest -q -p no:cacheprovider tests/smoke --base-url http://HOST:PORT
    BASE_URL=http://HOST:PORT python -m pytest -q tests/smoke

--base-url wins over $BASE_URL; with neither, the run fails (nothing is skipped).
$EXPECTED_VERSION / $EXPECTED_COMMIT, when set, must match GET /version.
They never write (safe against production) and give up quickly on a dead
service: --wait-seconds / $SMOKE_WAIT_SECONDS (default 5) bounds the wait for
it to accept connections, and each request times out after 5 s.
"""

from __future__ import annotations

import pytest
from service_client import Client, configured_base_url, require_base_url, wait_seconds

REQUEST_TIMEOUT = 5.0  # seconds per request


def pytest_configure(config: pytest.Config) -> None:
    require_base_url(config, "smoke")


@pytest.fixture(scope="session")
def base_url(pytestconfig: pytest.Config) -> str:
    return configured_base_url(pytestconfig).rstrip("/")


@pytest.fixture(scope="session")
def api(base_url: str, pytestconfig: pytest.Config) -> Client:
    client = Client(base_url, timeout=REQUEST_TIMEOUT)
    client.wait_until_reachable(wait_seconds(pytestconfig, "SMOKE_WAIT_SECONDS", 5))
    return client
