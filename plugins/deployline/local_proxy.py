"""The local driver's reverse proxy: ``python -m deployline.local_proxy --port P --backends FILE``.

Round-robins requests over the backends listed in FILE (``{"backends": ["http://127.0.0.1:1234"]}``)
and follows changes to FILE, so that a resize or a blue/green switch is one atomic file replace:
requests already sent to an old backend complete there, new requests go to the new list.  A backend
that refuses or drops the connection is skipped (the request goes to the next one), so a worker
being stopped does not fail client requests; 502 only when every backend fails.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

RELOAD_INTERVAL = 0.2  # seconds between two looks at the backends file
BACKEND_TIMEOUT = 60
MAX_BODY = 10 * 1024 * 1024  # a request body is held in memory to be sent again to the next backend
MAX_HANDLERS = 64  # connections served at once; the next ones wait in the listen backlog
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "expect", "content-length"}


class Backends:
    """The backends file, re-read when it changes (atomic replaces give it a new inode)."""

    def __init__(self, path: str):
        self.path = path
        self.urls: list[str] = []
        self._signature = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self.current()

    def current(self) -> list[str]:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= RELOAD_INTERVAL:
                self._checked = now
                try:
                    st = os.stat(self.path)
                    signature = (st.st_ino, st.st_mtime_ns, st.st_size)
                    # A file changed within the last second may change again with the same signature
                    # (coarse mtime, a recycled inode): read it again until it is older ("racy git").
                    if signature != self._signature or time.time() - st.st_mtime < 1.0:
                        with open(self.path, encoding="utf-8") as fh:
                            self.urls = [u.rstrip("/") for u in json.load(fh)["backends"]]
                        self._signature = signature
                except (OSError, ValueError, KeyError, TypeError) as exc:  # keep the last good list
                    log(f"cannot read {self.path}: {exc}")
            return self.urls

    def order(self) -> list[str]:
        """Every backend, starting at the next one in round-robin order."""
        urls = self.current()
        if not urls:
            return []
        start = next(self._counter) % len(urls)
        return urls[start:] + urls[:start]


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} local_proxy: {message}", file=sys.stderr, flush=True)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive to clients
    # Headers and body go out in separate writes: without TCP_NODELAY each kept-alive answer
    # waits for the client's delayed ACK (about 40 ms).
    disable_nagle_algorithm = True
    timeout = 20  # an idle client connection releases its handler after this
    server: ProxyServer
    _local = threading.local()  # this thread's backend connections: reused for speed

    def _connection(self, url: str, fresh: bool) -> http.client.HTTPConnection:
        pool = self._pool()
        conn = pool.get(url)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            parts = urlsplit(url)
            conn = pool[url] = http.client.HTTPConnection(parts.hostname, parts.port, timeout=BACKEND_TIMEOUT)
        return conn

    def _pool(self) -> dict[str, http.client.HTTPConnection]:
        if not hasattr(self._local, "pool"):
            self._local.pool = {}
        return self._local.pool

    def _forget_old_backends(self, urls: list[str]) -> None:
        pool = self._pool()
        for url in [u for u in pool if u not in urls]:
            pool.pop(url).close()

    def _proxy(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._error(411, "send a Content-Length")
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if not length.isdigit():
            return self._error(400, "bad Content-Length")
        if int(length) > self.server.max_body:
            return self._error(413, f"request body of {length} bytes, more than {self.server.max_body}")
        body = self.rfile.read(int(length))
        dropped = HOP_BY_HOP | {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
        headers["X-Forwarded-For"] = self.client_address[0]
        urls = self.server.backends.order()
        self._forget_old_backends(urls)
        errors = []
        for url in urls:
            # A kept-alive connection may have been closed by the backend meanwhile: retry once on a new one.
            for fresh in (False, True):
                conn = self._connection(url, fresh)
                reused = conn.sock is not None
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    # Refused, reset or closed before an answer: the worker is stopping, try the next one.
                    # (A non-idempotent request may then run twice if the worker died after handling it.)
                    conn.close()
                    errors.append(f"{url}: {exc!r}")
                    if reused and not fresh:
                        continue
                    break
                if response.will_close:
                    conn.close()
                out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                return self._reply(response.status, out, data, response.reason, length)
        log(f"{self.command} {self.path}: no backend answered: {'; '.join(errors) or 'no backends'}")
        self._error(502, "bad gateway", backends=len(urls))

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _proxy

    def _error(self, status: int, message: str, **extra) -> None:
        headers = [("Content-Type", "application/json")]
        if status != 502:  # the request body was not read: this connection cannot carry another request
            headers.append(("Connection", "close"))
        self._reply(status, headers, json.dumps({"error": message, **extra}).encode() + b"\n")

    def _reply(self, status: int, headers: list, body: bytes, reason: str | None = None, length=None) -> None:
        self.send_response_only(status, reason)  # the backend's own Date and Server headers are kept
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", length or str(len(body)))  # HEAD: the length a GET would have
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # no access log: the workers keep one
        pass


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, port: int, backends: Backends, max_body: int = MAX_BODY, max_handlers: int = MAX_HANDLERS):
        self.backends, self.max_body = backends, max_body
        self._handlers = threading.BoundedSemaphore(max_handlers)
        super().__init__(("127.0.0.1", port), ProxyHandler)

    def process_request(self, request, client_address) -> None:
        # One thread per connection, but at most max_handlers: the accept loop waits for a free one.
        self._handlers.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._handlers.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._handlers.release()

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):  # a client hanging up is normal
            super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployline.local_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backends", required=True, help='JSON file: {"backends": ["http://127.0.0.1:1234"]}')
    parser.add_argument("--max-body", type=int, default=MAX_BODY, help="largest request body, bytes (else 413)")
    parser.add_argument("--max-handlers", type=int, default=MAX_HANDLERS, help="connections served at once")
    args = parser.parse_args(argv)
    server = ProxyServer(args.port, Backends(args.backends), args.max_body, args.max_handlers)

    def _terminate(_signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    log(f"listening on http://127.0.0.1:{args.port}, backends from {args.backends}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
