"""Shared by the suites that run against a LIVE sample-service (tests/acceptance, tests/smoke).

A minimal JSON-over-HTTP client (stdlib urllib only) and the helpers behind their
``--base-url`` / ``--wait-seconds`` options (registered once, in tests/conftest.py).
Importable as ``service_client`` because loading tests/conftest.py puts tests/ on
sys.path (pytest's default "prepend" import mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import pytest


@dataclass
class HttpResult:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """Tiny JSON-over-HTTP client; non-2xx statuses are returned, not raised."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        host = urlsplit(self.base_url).hostname or ""
        handlers: list[urllib.request.BaseHandler] = []
        if host in ("localhost", "127.0.0.1", "::1"):
            handlers.append(urllib.request.ProxyHandler({}))  # never proxy loopback
        self._opener = urllib.request.build_opener(*handlers)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Mapping[str, Any] | list[Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> HttpResult:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            all_headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=all_headers
        )
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return HttpResult(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return HttpResult(err.code, err.headers, err.read())

    def get(self, path: str) -> HttpResult:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | Mapping[str, Any] | list[Any] | None) -> HttpResult:
        return self.request("POST", path, body)

    def wait_until_reachable(self, seconds: float) -> None:
        """Wait until the service answers HTTP at all (any status: /health may be failing).

        No attempt outlasts the deadline by much, even against a host that drops packets.
        """
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            try:
                self.request("GET", "/version", timeout=min(self.timeout, max(remaining, 0.5)))
                return
            except (urllib.error.URLError, OSError) as exc:
                if time.monotonic() >= deadline:
                    pytest.fail(
                        f"sample-service at {self.base_url} not reachable "
                        f"after {seconds:g}s: {exc}",
                        pytrace=False,
                    )
                time.sleep(0.5)


# ------------------------------------------------------------------ pytest options


def add_live_service_options(parser: pytest.Parser) -> None:
    """``--base-url`` and ``--wait-seconds``, for every suite that needs a live service."""
    group = parser.getgroup("sample-service live service (acceptance, smoke)")
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
        "(acceptance: env ACCEPTANCE_WAIT_SECONDS, default 30; "
        "smoke: env SMOKE_WAIT_SECONDS, default 5)",
    )


def configured_base_url(config: pytest.Config) -> str:
    """``--base-url``, else ``$BASE_URL`` (stripped; "" when neither is given)."""
    return (config.getoption("base_url", default=None) or os.environ.get("BASE_URL", "")).strip()


def require_base_url(config: pytest.Config, suite: str) -> None:
    """Fail the whole run (nothing is skipped) without a usable base URL."""
    base_url = configured_base_url(config)
    if not base_url:
        raise pytest.UsageError(
            f"{suite} tests need the URL of a running sample-service: "
            "pass --base-url http://HOST:PORT or set BASE_URL"
        )
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise pytest.UsageError(f"--base-url/BASE_URL must be an http(s) URL, got {base_url!r}")


def wait_seconds(config: pytest.Config, env_var: str, default: float) -> float:
    """``--wait-seconds``, else ``$env_var``, else ``default``."""
    wait = config.getoption("wait_seconds", default=None)
    if wait is not None:
        return float(wait)
    raw = os.environ.get(env_var, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise pytest.UsageError(f"{env_var} must be a number of seconds, got {raw!r}") from None
