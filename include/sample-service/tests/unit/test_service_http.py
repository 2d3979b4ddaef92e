"""Unit tests for the thin http.server adapter (real sockets on 127.0.0.1, port 0)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator

import pytest

from sample_service.app import MAX_BODY_BYTES, App, Config, ServiceHTTPServer, make_server


@pytest.fixture
def server() -> Iterator[ServiceHTTPServer]:
    srv = make_server("127.0.0.1", 0, App(Config("9.9.9", "feed")), access_log=False)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def conn(server: ServiceHTTPServer) -> Iterator[http.client.HTTPConnection]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        yield connection
    finally:
        connection.close()


def test_server_settings(server: ServiceHTTPServer) -> None:
    assert server.daemon_threads is True
    assert server.request_queue_size >= 128
    # without TCP_NODELAY every keep-alive response after the first stalls ~40 ms
    assert server.RequestHandlerClass.disable_nagle_algorithm is True


def test_keep_alive_and_headers(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/health")
    first = conn.getresponse()
    body = first.read()
    assert first.status == 200
    assert first.version == 11
    assert first.getheader("Content-Type") == "application/json"
    assert first.getheader("Content-Length") == str(len(body))
    assert json.loads(body) == {"status": "ok", "version": "9.9.9"}
    sock = conn.sock

    payload = json.dumps({"name": "widget", "quantity": 2})
    conn.request("POST", "/api/items", body=payload, headers={"Content-Type": "application/json"})
    created = conn.getresponse()
    assert created.status == 201
    assert json.loads(created.read())["id"] == 1

    conn.request("GET", "/api/items/1?x=y")
    fetched = conn.getresponse()
    assert fetched.status == 200
    assert json.loads(fetched.read())["name"] == "widget"
    assert conn.sock is sock  # all three requests reused one connection


def test_head_has_no_body(conn: http.client.HTTPConnection) -> None:
    conn.request("HEAD", "/version")
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.getheader("Content-Length")) > 0
    assert response.read() == b""


def test_unknown_path_and_validation(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/missing")
    missing = conn.getresponse()
    assert missing.status == 404
    assert json.loads(missing.read())["error"] == "not found"

    conn.request("POST", "/api/items", body=b"{}")
    invalid = conn.getresponse()
    assert invalid.status == 400
    assert json.loads(invalid.read())["field"] == "name"


def test_oversized_body_is_rejected(conn: http.client.HTTPConnection) -> None:
    conn.putrequest("POST", "/api/items")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert response.getheader("Connection") == "close"
    assert json.loads(response.read())["field"] == "body"
