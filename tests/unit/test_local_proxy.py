"""The local driver's proxy: bounded request bodies and a bounded number of handlers (real sockets)."""

import http.client
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from deployline.embedded import free_port
from deployline.local_proxy import Backends, ProxyServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        answer = json.dumps({"received": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(tmp_path):
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    backends = tmp_path / "backends.json"
    backends.write_text(json.dumps({"backends": [f"http://127.0.0.1:{backend.server_address[1]}"]}))
    servers = []

    def start(**limits) -> int:
        port = free_port()
        server = ProxyServer(port, Backends(str(backends)), **limits)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    backend.shutdown()
    backend.server_close()


def post(port: int, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/items", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_body_over_the_limit_is_refused_before_it_is_read(proxy):
    port = proxy(max_body=1024)
    assert post(port, b"x" * 1024) == (200, {"received": 1024})
    status, answer = post(port, b"x" * 2048)
    assert status == 413 and answer["error"] == "request body of 2048 bytes, more than 1024"


def test_a_huge_content_length_is_refused_at_once(proxy):
    """Content-Length: 10^11 used to end in MemoryError: the proxy read the body to hold it."""
    port = proxy()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):  # headers and body come in two writes; then the proxy closes
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b"more than 10485760" in answer


def test_connections_beyond_the_handler_limit_wait_for_a_free_one(proxy):
    port = proxy(max_handlers=2)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]  # hold both handlers
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(post(port, b"hello")), daemon=True)
    waiting.start()
    waiting.join(1.5)
    assert answers == []  # queued in the backlog: no third thread was started for it
    idle[0].close()
    waiting.join(30)
    assert answers == [(200, {"received": 5})]
    idle[1].close()
