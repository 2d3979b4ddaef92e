"""Acceptance tests against a LIVE sample-service (stdlib urllib only).

    python -m pytest tests/acceptance --base-url http://127.0.0.1:8000
    BASE_URL=http://10.0.0.5:8080 python -m pytest tests/acceptance

--base-url wins over $BASE_URL; with neither, the run fails (nothing is skipped).
Optional: $EXPECTED_VERSION / $EXPECTED_COMMIT are compared with GET /version;
--wait-seconds / $ACCEPTANCE_WAIT_SECONDS (default 30) bounds how long to wait
for the service to accept connections before the first test.
"""

from __future__ import annotations

import contextlib
import os
from urllib.parse import urlsplit

import pytest
from service_client import Client


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sample-service acceptance")
    # pytest-base-url, if installed, already registers --base-url with the same meaning.
    with contextlib.suppress(ValueError):
        group.addoption(
            "--base-url",
            dest="base_url",
            default=None,
            help="base URL of the live service, e.g. http://127.0.0.1:8000 (or env BASE_URL)",
        )
    group.addoption(
        "--wait-seconds",
        dest="wait_seconds",
        type=float,
        default=None,
        help="max seconds to wait for the service to accept connections "
        "(env ACCEPTANCE_WAIT_SECONDS, default 30)",
    )


def _configured_base_url(config: pytest.Config) -> str:
    return (config.getoption("base_url", default=None) or os.environ.get("BASE_URL", "")).strip()


def pytest_configure(config: pytest.Config) -> None:
    base_url = _configured_base_url(config)
    if not base_url:
        raise pytest.UsageError(
            "acceptance tests need the URL of a running sample-service: "
            "pass --base-url http://HOST:PORT or set BASE_URL"
        )
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise pytest.UsageError(f"--base-url/BASE_URL must be an http(s) URL, got {base_url!r}")


@pytest.fixture(scope="session")
def base_url(pytestconfig: pytest.Config) -> str:
    return _configured_base_url(pytestconfig).rstrip("/")


@pytest.fixture(scope="session")
def api(base_url: str, pytestconfig: pytest.Config) -> Client:
    wait = pytestconfig.getoption("wait_seconds", default=None)
    if wait is None:
        wait = float(os.environ.get("ACCEPTANCE_WAIT_SECONDS", "30"))
    client = Client(base_url)
    client.wait_until_reachable(wait)
    return client
