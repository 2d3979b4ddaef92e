"""Load test for sample-service (Locust 2.x), run headless by Deployline's capacity stage:

    locust -f tests/load/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 10 -r 10 -t 30s --csv /tmp/load --html /tmp/load.html --only-summary

Each simulated user creates one item when it starts, then loops with no think time
(the generator measures throughput, not a human pace) over a read-heavy mix:

    weight  request                              stats name
      8     GET  /api/items/<id> (its own item)  /api/items/[id]
      4     GET  /api/quote?items=<id>:<n>,...   /api/quote
      2     GET  /api/items                      /api/items
      1     POST /api/items (small body)         /api/items
      1     GET  /version                        /version

Any non-2xx answer counts as a failure (FastHttpUser's default), including a 404 for
an item the user created itself. POSTs are rare on purpose: the store is in memory
and GET /api/items returns all items, so every created item makes that request a
little bigger for the rest of the environment's life.

No test_ prefix: pytest must not collect this file. Importing it needs no network.
"""

from __future__ import annotations

import random
import uuid
from collections import deque

from locust import FastHttpUser, constant, task

MAX_KNOWN_ITEMS = 50  # ids remembered per user for reads and quotes


class ServiceUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.item_ids: deque[int] = deque(maxlen=MAX_KNOWN_ITEMS)
        self.create_item()

    def create_item(self) -> int | None:
        payload = {"name": f"load-{uuid.uuid4().hex[:8]}", "quantity": random.randint(1, 100)}
        with self.client.post(
            "/api/items", json=payload, name="/api/items", catch_response=True
        ) as response:
            if response.status_code != 201:
                response.failure(f"expected 201, got {response.status_code}")
                return None
            try:
                item_id = response.json()["id"]
            except (ValueError, KeyError, TypeError):
                response.failure(f"created item has no id: {response.text[:200]!r}")
                return None
            if not isinstance(item_id, int):
                response.failure(f"created item has a bad id: {item_id!r}")
                return None
        self.item_ids.append(item_id)
        return item_id

    def known_item(self) -> int | None:
        """One of this user's items (creating one if it has none yet)."""
        return random.choice(self.item_ids) if self.item_ids else self.create_item()

    @task(8)
    def get_item(self) -> None:
        item_id = self.known_item()
        if item_id is not None:
            self.client.get(f"/api/items/{item_id}", name="/api/items/[id]")

    @task(4)
    def quote(self) -> None:
        item_id = self.known_item()
        if item_id is None:
            return
        lines = {item_id, random.choice(self.item_ids)}
        query = ",".join(f"{line}:{random.randint(1, 3)}" for line in sorted(lines))
        self.client.get(f"/api/quote?items={query}", name="/api/quote")

    @task(2)
    def list_items(self) -> None:
        self.client.get("/api/items", name="/api/items")

    @task(1)
    def post_item(self) -> None:
        self.create_item()

    @task(1)
    def version(self) -> None:
        self.client.get("/version", name="/version")
