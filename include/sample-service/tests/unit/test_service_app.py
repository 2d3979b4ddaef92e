"""Unit tests for sample_service.app: handlers called directly, no sockets."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import sample_service
from sample_service.app import (
    MAX_NAME_LENGTH,
    MAX_QUANTITY,
    App,
    Config,
    ItemStore,
    Response,
    parse_fail_after,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock) -> App:
    return App(Config(version="1.2.3", commit="abc1234"), clock=clock)


def post_item(app: App, payload: object) -> Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return app.handle("POST", "/api/items", "", body)


def assert_json(response: Response) -> object:
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == str(len(response.body))
    return response.json()


# ------------------------------------------------------------------ health / version


def test_health_ok(app: App) -> None:
    status, headers, body = app.handle("GET", "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert json.loads(body) == {"status": "ok", "version": "1.2.3"}


def test_version(app: App) -> None:
    response = app.handle("GET", "/version")
    assert response.status == 200
    assert assert_json(response) == {"version": "1.2.3", "commit": "abc1234"}


def test_head_is_answered_like_get(app: App) -> None:
    assert app.handle("HEAD", "/health") == app.handle("GET", "/health")


def test_config_from_env_defaults_to_packaged_metadata() -> None:
    config = Config.from_env({})
    assert config.version == sample_service.__version__
    assert config.commit == sample_service.read_packaged_file("COMMIT", "unknown")
    assert config.fail_health_after is None


def test_config_from_env_overrides() -> None:
    config = Config.from_env(
        {
            "SAMPLE_SERVICE_VERSION": "2.0.0",
            "SAMPLE_SERVICE_COMMIT": "deadbeef",
            "SAMPLE_SERVICE_FAIL_HEALTH_AFTER": "12.5",
        }
    )
    assert config == Config("2.0.0", "deadbeef", 12.5)
    response = App(config).handle("GET", "/version")
    assert response.json() == {"version": "2.0.0", "commit": "deadbeef"}


def test_packaged_files_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "VERSION").write_text("3.1.4\n", encoding="utf-8")
    (tmp_path / "EMPTY").write_text("  \n", encoding="utf-8")
    monkeypatch.setattr(sample_service, "_PACKAGE_DIR", tmp_path)
    assert sample_service.read_packaged_file("VERSION", "dev") == "3.1.4"
    assert sample_service.read_packaged_file("EMPTY", "dev") == "dev"
    assert sample_service.read_packaged_file("MISSING", "dev") == "dev"


# ------------------------------------------------------------------ fail-health switch


def test_health_fails_after_configured_seconds(clock: FakeClock) -> None:
    app = App(Config("1.0.0", "c0ffee", fail_health_after=30), clock=clock)
    assert app.handle("GET", "/health").status == 200
    clock.advance(29.9)
    assert app.handle("GET", "/health").status == 200
    clock.advance(0.1)
    response = app.handle("GET", "/health")
    assert response.status == 503
    assert assert_json(response)["status"] == "failing"
    # the service keeps answering everything else
    assert app.handle("GET", "/version").status == 200
    assert post_item(app, {"name": "still", "quantity": 1}).status == 201


def test_fail_health_after_zero_fails_immediately(clock: FakeClock) -> None:
    app = App(Config(fail_health_after=0), clock=clock)
    assert app.handle("GET", "/health").status == 503


def test_no_fail_switch_means_always_healthy(app: App, clock: FakeClock) -> None:
    clock.advance(10**9)
    assert app.handle("GET", "/health").status == 200


@pytest.mark.parametrize(
    ("raw", "expected"), [("", None), ("  ", None), ("0", 0.0), ("45", 45.0), ("1.5", 1.5)]
)
def test_parse_fail_after(raw: str, expected: float | None) -> None:
    assert parse_fail_after(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "soon", "nan", "inf"])
def test_parse_fail_after_rejects_garbage(raw: str) -> None:
    with pytest.raises(ValueError, match="SAMPLE_SERVICE_FAIL_HEALTH_AFTER"):
        parse_fail_after(raw)


# ------------------------------------------------------------------ items


def test_create_get_and_list_items(app: App) -> None:
    created = post_item(app, {"name": "widget", "quantity": 3})
    assert created.status == 201
    item = assert_json(created)
    assert item == {"id": 1, "name": "widget", "quantity": 3}
    assert created.headers["Location"] == "/api/items/1"

    second = post_item(app, {"name": "  gadget ", "quantity": 0}).json()
    assert second == {"id": 2, "name": "gadget", "quantity": 0}

    fetched = app.handle("GET", "/api/items/1")
    assert fetched.status == 200
    assert assert_json(fetched) == item

    listing = app.handle("GET", "/api/items")
    assert listing.status == 200
    assert assert_json(listing) == {"items": [item, second], "count": 2}


def test_list_is_empty_initially(app: App) -> None:
    assert app.handle("GET", "/api/items").json() == {"items": [], "count": 0}


def test_trailing_slash_and_query_in_path(app: App) -> None:
    post_item(app, {"name": "a", "quantity": 1})
    assert app.handle("GET", "/api/items/").status == 200
    assert app.handle("GET", "/api/items/1/").status == 200
    assert app.handle("GET", "/api/items?verbose=1").status == 200


@pytest.mark.parametrize("item_id", ["999", "0", "abc", "-1", "1.0", "9" * 40])
def test_get_unknown_item_is_404(app: App, item_id: str) -> None:
    post_item(app, {"name": "a", "quantity": 1})
    response = app.handle("GET", f"/api/items/{item_id}")
    assert response.status == 404
    assert assert_json(response)["error"] == "item not found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"", "body"),
        (b"not json", "body"),
        (b"\xff\xfe", "body"),
        (b"[1, 2]", "body"),
        (b'"widget"', "body"),
        ({"quantity": 1}, "name"),
        ({"name": None, "quantity": 1}, "name"),
        ({"name": 42, "quantity": 1}, "name"),
        ({"name": "   ", "quantity": 1}, "name"),
        ({"name": "x" * (MAX_NAME_LENGTH + 1), "quantity": 1}, "name"),
        ({"name": "widget"}, "quantity"),
        ({"name": "widget", "quantity": "3"}, "quantity"),
        ({"name": "widget", "quantity": 1.5}, "quantity"),
        ({"name": "widget", "quantity": True}, "quantity"),
        ({"name": "widget", "quantity": None}, "quantity"),
        ({"name": "widget", "quantity": -1}, "quantity"),
        ({"name": "widget", "quantity": MAX_QUANTITY + 1}, "quantity"),
    ],
)
def test_create_item_validation(app: App, body: object, field: str) -> None:
    response = post_item(app, body)
    assert response.status == 400
    payload = assert_json(response)
    assert payload["field"] == field
    assert field in payload["error"] or field == "body"
    assert app.handle("GET", "/api/items").json()["count"] == 0


def test_boundary_values_are_accepted(app: App) -> None:
    assert post_item(app, {"name": "x" * MAX_NAME_LENGTH, "quantity": 0}).status == 201
    assert post_item(app, {"name": "y", "quantity": MAX_QUANTITY}).status == 201
    assert post_item(app, {"name": "z", "quantity": 1, "extra": "ignored"}).status == 201


def test_store_full_is_reported(clock: FakeClock) -> None:
    app = App(Config(), store=ItemStore(max_items=1), clock=clock)
    assert post_item(app, {"name": "a", "quantity": 1}).status == 201
    response = post_item(app, {"name": "b", "quantity": 1})
    assert response.status == 507
    assert "full" in response.json()["error"]


def test_store_is_thread_safe() -> None:
    store = ItemStore()
    threads_count, per_thread = 8, 250
    barrier = threading.Barrier(threads_count)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            store.add(f"t{n}-{i}", i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    items = store.list_items()
    assert len(store) == len(items) == threads_count * per_thread
    assert [item.id for item in items] == list(range(1, threads_count * per_thread + 1))
    assert len({item.name for item in items}) == len(items)


# ------------------------------------------------------------------ quote


def test_quote(app: App) -> None:
    post_item(app, {"name": "widget", "quantity": 5})
    post_item(app, {"name": "gadget", "quantity": 1})
    response = app.handle("GET", "/api/quote", "items=1:2,2,1:1")
    assert response.status == 200
    assert assert_json(response) == {
        "lines": [
            {
                "id": 1,
                "name": "widget",
                "requested": 3,
                "available": 5,
                "fulfillable": True,
                "shortfall": 0,
            },
            {
                "id": 2,
                "name": "gadget",
                "requested": 1,
                "available": 1,
                "fulfillable": True,
                "shortfall": 0,
            },
        ],
        "total_requested": 4,
        "fulfillable": True,
    }


def test_quote_shortfall(app: App) -> None:
    post_item(app, {"name": "widget", "quantity": 2})
    payload = app.handle("GET", "/api/quote?items=1:5").json()
    assert payload["fulfillable"] is False
    assert payload["lines"][0]["shortfall"] == 3


@pytest.mark.parametrize("query", ["", "items=", "items=abc", "items=1:0", "items=1:x", "items=-1"])
def test_quote_validation(app: App, query: str) -> None:
    post_item(app, {"name": "widget", "quantity": 2})
    response = app.handle("GET", "/api/quote", query)
    assert response.status == 400
    assert response.json()["field"] == "items"


def test_quote_unknown_item(app: App) -> None:
    response = app.handle("GET", "/api/quote", "items=42")
    assert response.status == 404
    assert response.json()["field"] == "items"


# ------------------------------------------------------------------ routing / errors


@pytest.mark.parametrize("path", ["/", "/nope", "/api", "/api/items/1/extra", "/healthz"])
def test_unknown_path_is_json_404(app: App, path: str) -> None:
    response = app.handle("GET", path)
    assert response.status == 404
    assert assert_json(response)["error"] == "not found"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/api/items", "GET, HEAD, POST"),
        ("PUT", "/api/items/1", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405(app: App, method: str, path: str, allowed: str) -> None:
    response = app.handle(method, path)
    assert response.status == 405
    assert response.headers["Allow"] == allowed
    assert assert_json(response)["allowed"] == allowed.split(", ")


def test_unexpected_errors_become_json_500(
    app: App, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom() -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(app.store, "list_items", boom)
    response = app.handle("GET", "/api/items")
    assert response.status == 500
    assert assert_json(response) == {"error": "internal server error"}
    assert "RuntimeError: boom" in capsys.readouterr().err
