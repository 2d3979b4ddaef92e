"""Loaded for every suite under tests/: registers the live-service options once.

The suites that need a running service (tests/acceptance, tests/smoke) share
``--base-url`` and ``--wait-seconds``; each checks them in its own conftest, so
the unit tests (which load this file too) need no service. Loading this file
also puts tests/ on sys.path, which is how those suites import service_client.
"""

from __future__ import annotations

import pytest
from service_client import add_live_service_options


def pytest_addoption(parser: pytest.Parser) -> None:
    add_live_service_options(parser)
