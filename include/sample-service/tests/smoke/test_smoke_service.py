"""Smoke: is the deployed service up, the expected build, and serving its API?"""

from __future__ import annotations

import os

import pytest
from service_client import Client


def test_health_is_ok(api: Client) -> None:
    result = api.get("/health")
    assert result.status == 200, f"/health returned {result.status}: {result.body!r}"
    assert result.json()["status"] == "ok"


def test_version_is_reported(api: Client) -> None:
    result = api.get("/version")
    assert result.status == 200, f"/version returned {result.status}: {result.body!r}"
    payload = result.json()
    assert isinstance(payload["version"], str)
    assert payload["version"]
    assert isinstance(payload["commit"], str)
    assert payload["commit"]


@pytest.mark.parametrize(
    ("env_var", "field"), [("EXPECTED_VERSION", "version"), ("EXPECTED_COMMIT", "commit")]
)
def test_deployed_build_is_the_expected_one(api: Client, env_var: str, field: str) -> None:
    expected = os.environ.get(env_var, "").strip()
    if not expected:
        pytest.skip(f"{env_var} is not set")
    actual = api.get("/version").json()[field]
    assert actual == expected, f"deployed {field} {actual!r} != {env_var}={expected!r}"


def test_items_can_be_listed(api: Client) -> None:
    result = api.get("/api/items")
    assert result.status == 200, f"/api/items returned {result.status}: {result.body!r}"
    payload = result.json()
    assert isinstance(payload["items"], list)
    assert payload["count"] == len(payload["items"])
