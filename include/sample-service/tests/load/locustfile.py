"""Load test for sample-service (Locust 2.x), run headless by Deployline's capacity stage:

    locust -f tests/load/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 10 -r 10 -t 30s --csv /tmp/load --html /tmp/load.html --only-summary

Each simulated user creates one item when it starts, then loops with no think time
(the generator measures throughput, not a human pace) over a read-heavy mix:

    weight  request                                  stats name
      8     GET  /api/items/<id> (a catalogue item)  /api/items/[id]
      4     GET  /api/quote?items=<id>:<n>,...       /api/quote
      2     GET  /api/items                          /api/items
      1     POST /api/items (small body)             /api/items
      1     GET  /version                            /version

Reads use the catalogue (ids 1..CATALOGUE_SIZE) that every server process starts with:
an environment has several processes or instances behind a load balancer, each with
its own in-memory store, so an item created through one is unknown to the others.
Any non-2xx answer counts as a failure (FastHttpUser's default). POSTs are rare on
purpose: GET /api/items returns all items, so every created item makes that request
a little bigger for the rest of the environment's life.

No test_ prefix: pytest must not collect this file. Importing it needs no network.
"""

from __future__ import annotations

import random
import uuid

from locust import FastHttpUser, constant, task

CATALOGUE_SIZE = 10  # sample_service.app.CATALOGUE_SIZE: items every server process starts with


def catalogue_item() -> int:
    return random.randint(1, CATALOGUE_SIZE)


class ServiceUser(FastHttpUser):
    wait_time = constant(0)

    @task(8)
    def get_item(self) -> None:
        self.client.get(f"/api/items/{catalogue_item()}", name="/api/items/[id]")

    @task(4)
    def quote(self) -> None:
        lines = sorted({catalogue_item(), catalogue_item()})
        query = ",".join(f"{line}:{random.randint(1, 3)}" for line in lines)
        self.client.get(f"/api/quote?items={query}", name="/api/quote")

    @task(2)
    def list_items(self) -> None:
        self.client.get("/api/items", name="/api/items")

    @task(1)
    def post_item(self) -> None:
        payload = {"name": f"load-{uuid.uuid4().hex[:8]}", "quantity": random.randint(1, 100)}
        with self.client.post(
            "/api/items", json=payload, name="/api/items", catch_response=True
        ) as response:
            if response.status_code != 201:
                response.failure(f"expected 201, got {response.status_code}")

    @task(1)
    def version(self) -> None:
        self.client.get("/version", name="/version")
