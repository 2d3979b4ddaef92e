"""Acceptance tests against a LIVE sample-service (stdlib urllib only).

    python -m pytest tests/acceptance --base-url http://127.0.0.1:8000
    BASE_URL=http://10.0.0.5:8080 python -m pytest tests/acceptance

--base-url wins over $BASE_URL; with neither, the run fails (nothing is skipped).
Optional: $EXPECTED_VERSION / $EXPECTED_COMMIT are compared with GET /version;
--wait-seconds / $ACCEPTANCE_WAIT_SECONDS (default 30) bounds how long to wait
for the service to accept connections before the first test.
The options and the client are shared with tests/smoke (tests/conftest.py,
tests/service_client.py).
"""

from __future__ import annotations

import pytest
from service_client import Client, configured_base_url, require_base_url, wait_seconds


def pytest_configure(config: pytest.Config) -> None:
    require_base_url(config, "acceptance")


@pytest.fixture(scope="session")
def base_url(pytestconfig: pytest.Config) -> str:
    return configured_base_url(pytestconfig).rstrip("/")


@pytest.fixture(scope="session")
def api(base_url: str, pytestconfig: pytest.Config) -> Client:
    client = Client(base_url)
    client.wait_until_reachable(wait_seconds(pytestconfig, "ACCEPTANCE_WAIT_SECONDS", 30))
    return client
