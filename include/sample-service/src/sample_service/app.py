"""Request handling for sample-service.

The service logic lives in :class:`App`, whose :meth:`App.handle` is a pure
``(method, path, query, body) -> Response`` function that unit tests call
directly, without sockets. :func:`make_server` wraps it in a small
``http.server`` adapter (HTTP/1.1, keep-alive, one thread per connection).

Endpoints::

    GET  /health                200 {"status": "ok", "version": ...}
                                503 {"status": "failing", ...} once the fail-health
                                switch (SAMPLE_SERVICE_FAIL_HEALTH_AFTER or the
                                packaged SETTINGS.json) has fired
    GET  /version               200 {"version": ..., "commit": ...}
    GET  /api/items             200 {"items": [...], "count": n}
    POST /api/items             201 {"id": ..., "name": ..., "quantity": ...}
    GET  /api/items/<id>        200 item | 404
    GET  /api/quote?items=1:2,3 200 availability of the requested quantities
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from . import __version__, read_packaged_file

MAX_BODY_BYTES = 64 * 1024
MAX_NAME_LENGTH = 200
MAX_QUANTITY = 1_000_000_000
MAX_ITEMS = 100_000
# Every server process starts with the same catalogue (ids 1..CATALOGUE_SIZE), so that reads by
# id work behind a load balancer whatever worker answers; items created later stay per process.
CATALOGUE_SIZE = 10
MAX_QUOTE_LINES = 100

ENV_VERSION = "SAMPLE_SERVICE_VERSION"
ENV_COMMIT = "SAMPLE_SERVICE_COMMIT"
ENV_FAIL_HEALTH_AFTER = "SAMPLE_SERVICE_FAIL_HEALTH_AFTER"
ENV_STAGE = "DEPLOYLINE_STAGE"  # set by the Deployline pipeline: "acceptance", "production"...

# Build-time settings: build.py packages the optional settings.json from the project
# root as SETTINGS.json next to this module (see load_settings).
SETTINGS_FILE = Path(__file__).resolve().parent / "SETTINGS.json"
SETTINGS_KEYS = ("fail_health_after", "fail_health_stages")


class Response(NamedTuple):
    """An HTTP response: unpacks as ``status, headers, body``."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
    all_headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
    }
    if headers:
        all_headers.update(headers)
    return Response(int(status), all_headers, body)


def error_response(
    status: int, message: str, *, field: str | None = None, **extra: Any
) -> Response:
    payload: dict[str, Any] = {"error": message}
    if field is not None:
        payload["field"] = field
    payload.update(extra)
    return json_response(status, payload)


class ValidationError(Exception):
    """Bad client input; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Settings:
    """The validated content of a settings file (see :func:`load_settings`)."""

    fail_health_after: float | None = None
    fail_health_stages: tuple[str, ...] = ()

    def fail_health_after_in(self, stage: str) -> float | None:
        """The switch for a service running in ``stage`` ("" = unknown stage)."""
        if self.fail_health_stages and stage not in self.fail_health_stages:
            return None
        return self.fail_health_after


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file and the key."""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SettingsError(f"key {key!r} appears more than once")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise SettingsError(f"{name} is not a valid JSON value")


def parse_settings(text: str | bytes, source: str = "settings") -> Settings:
    """Parse and validate settings JSON; errors name ``source`` and the offending key.

    Keys (all optional, nothing else allowed):

    - ``fail_health_after``: seconds (number >= 0) after start when ``/health`` starts
      failing, or ``null`` for never;
    - ``fail_health_stages``: list of stage names (``$DEPLOYLINE_STAGE``) the switch is
      limited to; empty or absent = every stage.

    build.py validates the project's settings.json with this function.
    """
    try:
        data = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except SettingsError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(
            f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SettingsError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SETTINGS_KEYS))
    if unknown:
        raise SettingsError(
            f"{source}: unknown key {unknown[0]!r} (allowed keys: {', '.join(SETTINGS_KEYS)})"
        )

    after = data.get("fail_health_after")
    if after is not None and not _is_seconds(after):
        raise SettingsError(
            f"{source}: key 'fail_health_after' must be a number of seconds >= 0 or null, "
            f"got {json.dumps(after)}"
        )

    stages = data.get("fail_health_stages", [])
    if not isinstance(stages, list):
        raise SettingsError(
            f"{source}: key 'fail_health_stages' must be a list of stage names "
            f'(e.g. ["production"]), got {json.dumps(stages)}'
        )
    for index, stage in enumerate(stages):
        if not isinstance(stage, str) or not stage or stage.strip() != stage:
            raise SettingsError(
                f"{source}: key 'fail_health_stages' item {index} must be a non-empty stage "
                f"name without surrounding spaces, got {json.dumps(stage)}"
            )
    return Settings(None if after is None else float(after), tuple(stages))


def _is_seconds(value: Any) -> bool:
    """A JSON number >= 0 that fits a float (bool is an int subclass: not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:  # an int too large for a float
        return False


def load_settings(path: Path = SETTINGS_FILE) -> Settings:
    """Read a settings file; a missing file means the defaults (switch off)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return Settings()
    except OSError as exc:
        raise SettingsError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return parse_settings(text, str(path))


@dataclass(frozen=True)
class Config:
    version: str = "dev"
    commit: str = "unknown"
    fail_health_after: float | None = None
    # where fail_health_after came from, for the startup message (not part of equality)
    fail_health_source: str = dataclasses.field(default="", compare=False)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, settings_file: Path = SETTINGS_FILE
    ) -> Config:
        """Build the config from the packaged files and the environment.

        ``SAMPLE_SERVICE_VERSION`` / ``SAMPLE_SERVICE_COMMIT`` override the packaged
        VERSION / COMMIT files. The failing-health switch used for rollback demos comes
        from ``SAMPLE_SERVICE_FAIL_HEALTH_AFTER`` (seconds, >= 0) when that is set, else
        from the packaged SETTINGS.json, limited to its ``fail_health_stages`` (compared
        with ``$DEPLOYLINE_STAGE``) if it lists any. Raises ``ValueError`` (naming the
        variable, or the file and key) for bad values.
        """
        env = os.environ if environ is None else environ
        version = env.get(ENV_VERSION, "").strip() or __version__
        commit = env.get(ENV_COMMIT, "").strip() or read_packaged_file("COMMIT", "unknown")
        # Always validate the packaged settings: a bad file fails at startup, everywhere.
        settings = load_settings(settings_file)
        from_env = parse_fail_after(env.get(ENV_FAIL_HEALTH_AFTER, ""))
        if from_env is not None:
            return cls(version, commit, from_env, ENV_FAIL_HEALTH_AFTER)
        stage = env.get(ENV_STAGE, "").strip()
        after = settings.fail_health_after_in(stage)
        source = ""
        if after is not None:
            source = settings_file.name
            if settings.fail_health_stages:
                source += f", stage {stage}"
        return cls(version, commit, after, source)


def parse_fail_after(raw: str) -> float | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{ENV_FAIL_HEALTH_AFTER} must be a number of seconds >= 0, got {raw!r}")
    return value


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    id: int
    name: str
    quantity: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "quantity": self.quantity}


class StoreFullError(Exception):
    pass


class ItemStore:
    """In-memory, thread-safe item store with monotonically increasing ids."""

    def __init__(self, max_items: int = MAX_ITEMS) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, Item] = {}
        self._next_id = 1
        self._max_items = max_items

    @classmethod
    def with_catalogue(cls, size: int = CATALOGUE_SIZE) -> ItemStore:
        store = cls()
        for n in range(1, size + 1):
            store.add(f"catalogue-{n}", 100)
        return store

    def add(self, name: str, quantity: int) -> Item:
        with self._lock:
            if len(self._items) >= self._max_items:
                raise StoreFullError(f"item store is full ({self._max_items} items)")
            item = Item(self._next_id, name, quantity)
            self._items[item.id] = item
            self._next_id += 1
            return item

    def get(self, item_id: int) -> Item | None:
        with self._lock:
            return self._items.get(item_id)

    def list_items(self) -> list[Item]:
        with self._lock:
            return list(self._items.values())  # insertion order == id order

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ValidationError("body", "request body must be a JSON object")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ValidationError("body", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationError("body", "request body must be a JSON object")
    return data


def validate_new_item(data: Mapping[str, Any]) -> tuple[str, int]:
    """Return ``(name, quantity)`` or raise :class:`ValidationError`."""
    if "name" not in data:
        raise ValidationError("name", "name is required")
    name = data["name"]
    if not isinstance(name, str):
        raise ValidationError("name", "name must be a string")
    name = name.strip()
    if not name:
        raise ValidationError("name", "name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValidationError("name", f"name must be at most {MAX_NAME_LENGTH} characters")

    if "quantity" not in data:
        raise ValidationError("quantity", "quantity is required")
    quantity = data["quantity"]
    # bool is a subclass of int: reject true/false explicitly.
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise ValidationError("quantity", "quantity must be an integer")
    if quantity < 0:
        raise ValidationError("quantity", "quantity must be >= 0")
    if quantity > MAX_QUANTITY:
        raise ValidationError("quantity", f"quantity must be <= {MAX_QUANTITY}")
    return name, quantity


_QUOTE_ENTRY = re.compile(r"(\d{1,12})(?::(\d{1,12}))?")


def parse_quote_request(raw: str) -> dict[int, int]:
    """Parse ``"1:2,3"`` into ``{1: 2, 3: 1}`` (requested quantities, duplicates summed)."""
    entries = [part.strip() for part in raw.split(",") if part.strip()]
    if not entries:
        raise ValidationError("items", "items must list at least one item id, e.g. items=1:2,3")
    if len(entries) > MAX_QUOTE_LINES:
        raise ValidationError("items", f"at most {MAX_QUOTE_LINES} entries are allowed")
    requested: dict[int, int] = {}
    for entry in entries:
        match = _QUOTE_ENTRY.fullmatch(entry)
        if match is None:
            raise ValidationError(
                "items", f"invalid entry {entry!r}: expected <id> or <id>:<count>"
            )
        item_id = int(match.group(1))
        count = int(match.group(2)) if match.group(2) is not None else 1
        if count < 1:
            raise ValidationError("items", f"invalid entry {entry!r}: count must be >= 1")
        requested[item_id] = requested.get(item_id, 0) + count
    return requested


# --------------------------------------------------------------------------- app


class Request(NamedTuple):
    """A routed request as seen by the endpoint handlers."""

    method: str
    path: str
    params: dict[str, str]  # named groups of the matched route
    query: dict[str, list[str]]
    body: bytes


Handler = Callable[[Request], Response]


class App:
    """The service: routing plus endpoint handlers. No I/O besides the clock."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: ItemStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else Config.from_env()
        self.store = store if store is not None else ItemStore()
        self._clock = clock
        self._started = clock()
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
            (re.compile(r"/health"), {"GET": self._health}),
            (re.compile(r"/version"), {"GET": self._version}),
            (re.compile(r"/api/items"), {"GET": self._list_items, "POST": self._create_item}),
            (re.compile(r"/api/items/(?P<item_id>[^/]+)"), {"GET": self._get_item}),
            (re.compile(r"/api/quote"), {"GET": self._quote}),
        ]

    # -- public API -------------------------------------------------------------

    def uptime(self) -> float:
        return self._clock() - self._started

    def health_failing(self) -> bool:
        limit = self.config.fail_health_after
        return limit is not None and self.uptime() >= limit

    def handle(self, method: str, path: str, query: str = "", body: bytes = b"") -> Response:
        """Handle one request. ``path`` may carry a ``?query`` if ``query`` is empty.

        ``HEAD`` is answered like ``GET``; the transport drops the body.
        """
        if not query and "?" in path:
            path, _, query = path.partition("?")
        try:
            return self._dispatch(method.upper(), path, query, body)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error")

    # -- routing ----------------------------------------------------------------

    def _dispatch(self, method: str, path: str, query: str, body: bytes) -> Response:
        if len(path) > 1:
            path = path.rstrip("/")
        for pattern, handlers in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            handler = handlers.get("GET" if method == "HEAD" else method)
            if handler is None:
                allowed = sorted({*handlers, *(["HEAD"] if "GET" in handlers else [])})
                return json_response(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    {"error": f"method {method} not allowed", "allowed": allowed},
                    {"Allow": ", ".join(allowed)},
                )
            request = Request(
                method, path, match.groupdict(), parse_qs(query, keep_blank_values=True), body
            )
            try:
                return handler(request)
            except ValidationError as exc:
                return error_response(HTTPStatus.BAD_REQUEST, exc.message, field=exc.field)
        return error_response(HTTPStatus.NOT_FOUND, "not found", path=path)

    # -- handlers ---------------------------------------------------------------

    def _health(self, request: Request) -> Response:
        if self.health_failing():
            return json_response(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "failing", "version": self.config.version},
            )
        return json_response(HTTPStatus.OK, {"status": "ok", "version": self.config.version})

    def _version(self, request: Request) -> Response:
        return json_response(
            HTTPStatus.OK, {"version": self.config.version, "commit": self.config.commit}
        )

    def _list_items(self, request: Request) -> Response:
        items = [item.to_dict() for item in self.store.list_items()]
        return json_response(HTTPStatus.OK, {"items": items, "count": len(items)})

    def _create_item(self, request: Request) -> Response:
        name, quantity = validate_new_item(parse_json_object(request.body))
        try:
            item = self.store.add(name, quantity)
        except StoreFullError as exc:
            return error_response(HTTPStatus.INSUFFICIENT_STORAGE, str(exc))
        return json_response(
            HTTPStatus.CREATED, item.to_dict(), {"Location": f"/api/items/{item.id}"}
        )

    def _get_item(self, request: Request) -> Response:
        raw_id = request.params["item_id"]
        item = self.store.get(int(raw_id)) if raw_id.isdigit() and len(raw_id) <= 18 else None
        if item is None:
            return error_response(HTTPStatus.NOT_FOUND, "item not found", id=raw_id)
        return json_response(HTTPStatus.OK, item.to_dict())

    def _quote(self, request: Request) -> Response:
        requested = parse_quote_request(",".join(request.query.get("items", [])))
        lines = []
        for item_id, count in requested.items():
            item = self.store.get(item_id)
            if item is None:
                return error_response(
                    HTTPStatus.NOT_FOUND, f"item {item_id} not found", field="items", id=item_id
                )
            lines.append(
                {
                    "id": item.id,
                    "name": item.name,
                    "requested": count,
                    "available": item.quantity,
                    "fulfillable": count <= item.quantity,
                    "shortfall": max(0, count - item.quantity),
                }
            )
        return json_response(
            HTTPStatus.OK,
            {
                "lines": lines,
                "total_requested": sum(line["requested"] for line in lines),
                "fulfillable": all(line["fulfillable"] for line in lines),
            },
        )


# --------------------------------------------------------------------------- HTTP adapter


class RequestHandler(BaseHTTPRequestHandler):
    """Thin adapter from http.server to :meth:`App.handle`."""

    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "sample-service"
    sys_version = ""
    timeout = 60  # seconds an idle keep-alive connection may hold a thread
    # TCP_NODELAY: headers and body are separate writes; with Nagle on, the body waits
    # for the client's delayed ACK (~40 ms) on every request after the first of a
    # keep-alive connection.
    disable_nagle_algorithm = True

    server: ServiceHTTPServer

    def version_string(self) -> str:
        return self.server_version

    def _dispatch(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self._send(error_response(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length"), True)
            return
        raw_length = self.headers.get("Content-Length", "0").strip() or "0"
        length = int(raw_length) if raw_length.isdigit() else -1
        if length < 0:
            response = error_response(
                HTTPStatus.BAD_REQUEST, "invalid Content-Length", field="Content-Length"
            )
            self._send(response, True)
            return
        if length > MAX_BODY_BYTES:
            response = error_response(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body must be at most {MAX_BODY_BYTES} bytes",
                field="body",
            )
            self._send(response, True)  # body left unread: the connection cannot be reused
            return
        body = self.rfile.read(length) if length else b""
        if len(body) != length:  # client went away mid-body
            self.close_connection = True
            return
        url = urlsplit(self.path)
        self._send(self.server.app.handle(self.command, url.path, url.query, body))

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _send(self, response: Response, close: bool = False) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.access_log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            sys.stderr.write(f"{stamp} {self.client_address[0]} {format % args}\n")


class ServiceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log
        super().__init__(address, RequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # client hung up or idled out: not worth a traceback
        super().handle_error(request, client_address)


class ServiceHTTPServerV6(ServiceHTTPServer):
    address_family = socket.AF_INET6


def make_server(
    host: str, port: int, app: App | None = None, *, access_log: bool = True
) -> ServiceHTTPServer:
    """Bind (but do not start) the HTTP server; ``port=0`` picks a free port."""
    server_class = ServiceHTTPServerV6 if ":" in host else ServiceHTTPServer
    return server_class((host, port), app if app is not None else App(), access_log=access_log)
