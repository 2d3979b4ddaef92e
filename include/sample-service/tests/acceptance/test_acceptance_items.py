"""Acceptance: the item store API and error handling on the live service."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_client import Client, HttpResult


def unique_name(prefix: str = "acceptance") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_create_get_and_list_item(api: Client) -> None:
    name = unique_name()
    created = api.post("/api/items", {"name": name, "quantity": 7})
    assert created.status == 201, created.body
    assert created.headers["Content-Type"] == "application/json"
    item = created.json()
    assert isinstance(item["id"], int)
    assert item["name"] == name
    assert item["quantity"] == 7
    assert created.headers["Location"] == f"/api/items/{item['id']}"

    fetched = api.get(f"/api/items/{item['id']}")
    assert fetched.status == 200
    assert fetched.json() == item

    listing = api.get("/api/items")
    assert listing.status == 200
    payload = listing.json()
    assert item in payload["items"]
    assert payload["count"] == len(payload["items"])


def test_quote_for_created_item(api: Client) -> None:
    item = api.post("/api/items", {"name": unique_name(), "quantity": 3}).json()
    result = api.get(f"/api/quote?items={item['id']}:2")
    assert result.status == 200
    payload = result.json()
    assert payload["fulfillable"] is True
    assert payload["total_requested"] == 2


def test_concurrent_creates_get_unique_ids(api: Client) -> None:
    names = [unique_name("concurrent") for _ in range(32)]

    def create(name: str) -> HttpResult:
        return api.post("/api/items", {"name": name, "quantity": 1})

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(create, names))
    assert [r.status for r in results] == [201] * len(names)
    ids = [r.json()["id"] for r in results]
    assert len(set(ids)) == len(ids)


def test_unknown_item_is_404(api: Client) -> None:
    result = api.get("/api/items/999999999999")
    assert result.status == 404
    assert result.headers["Content-Type"] == "application/json"
    assert "error" in result.json()


@pytest.mark.parametrize("path", ["/definitely-not-here", "/api/nothing", "/api/items/1/extra"])
def test_unknown_path_is_404(api: Client, path: str) -> None:
    result = api.get(path)
    assert result.status == 404
    assert result.headers["Content-Type"] == "application/json"
    assert result.json()["error"] == "not found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        ({"quantity": 1}, "name"),
        ({"name": "", "quantity": 1}, "name"),
        ({"name": "widget"}, "quantity"),
        ({"name": "widget", "quantity": -1}, "quantity"),
        ({"name": "widget", "quantity": "many"}, "quantity"),
    ],
)
def test_invalid_item_is_400(api: Client, body: object, field: str) -> None:
    result = api.post("/api/items", body)  # type: ignore[arg-type]
    assert result.status == 400
    assert result.headers["Content-Type"] == "application/json"
    payload = result.json()
    assert payload["field"] == field
    assert payload["error"]
