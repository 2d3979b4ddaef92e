"""Acceptance: /health and /version on the live service."""

from __future__ import annotations

import os

import pytest
from service_client import Client


def test_health_is_ok(api: Client) -> None:
    result = api.get("/health")
    assert result.status == 200, f"/health returned {result.status}: {result.body!r}"
    assert result.headers["Content-Type"] == "application/json"
    assert int(result.headers["Content-Length"]) == len(result.body)
    payload = result.json()
    assert payload["status"] == "ok"
    assert payload["version"] == api.get("/version").json()["version"]


def test_version_reports_version_and_commit(api: Client) -> None:
    result = api.get("/version")
    assert result.status == 200
    assert result.headers["Content-Type"] == "application/json"
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
    actual = api.get("/version").json()[field]
    if expected:
        assert actual == expected, f"deployed {field} {actual!r} != {env_var}={expected!r}"
