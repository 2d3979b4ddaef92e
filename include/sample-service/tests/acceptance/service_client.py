"""Minimal JSON-over-HTTP client for the acceptance tests (stdlib urllib only)."""

from __future__ import annotations

import json
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
    ) -> HttpResult:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            all_headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=all_headers
        )
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return HttpResult(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return HttpResult(err.code, err.headers, err.read())

    def get(self, path: str) -> HttpResult:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | Mapping[str, Any] | list[Any] | None) -> HttpResult:
        return self.request("POST", path, body)

    def wait_until_reachable(self, seconds: float) -> None:
        """Wait until the service answers HTTP at all (any status: /health may be failing)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.get("/version")
                return
            except (urllib.error.URLError, OSError) as exc:
                if time.monotonic() >= deadline:
                    pytest.fail(
                        f"sample-service at {self.base_url} not reachable "
                        f"after {seconds:g}s: {exc}",
                        pytrace=False,
                    )
                time.sleep(0.5)
