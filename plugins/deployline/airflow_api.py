"""A small client of Airflow's REST API (``/api/v2``), as a user or a script drives it."""

from __future__ import annotations

import time

import requests

API_CONN_ID = "deployline_api"


class AirflowApiError(RuntimeError):
    pass


def api_from_connection(conn_id: str = API_CONN_ID) -> AirflowApi | None:
    """A client logged in with the http connection ``deployline_api`` (host = API base URL), if it exists.

    Tasks use it to read what the task SDK does not expose: task notes and the event log.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    base = conn.host if "://" in (conn.host or "") else f"http://{conn.host}:{conn.port or 8080}"
    return AirflowApi(base, conn.login, conn.password)


class AirflowApi:
    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30):
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        response = self.session.post(
            f"{self.base}/auth/token", json={"username": username, "password": password}, timeout=timeout
        )
        if not response.ok:
            raise AirflowApiError(f"login as {username!r} failed: {response.status_code} {response.text[:200]}")
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def request(self, method: str, path: str, idempotent: bool | None = None, **kwargs) -> dict:
        """``idempotent``: may be sent again (default: every method but POST)."""
        if idempotent is None:
            idempotent = method != "POST"
        for attempt in range(4):
            response = self.session.request(method, f"{self.base}/api/v2{path}", timeout=self.timeout, **kwargs)
            # SQLite (the one-machine default) answers 500 "Database error" when its lock times out
            # under load; a request that does the same thing twice can be sent again.
            retry = response.status_code == 500 and "Database error" in response.text and idempotent
            if not retry or attempt == 3:
                break
            time.sleep(1 + attempt)
        if not response.ok:
            raise AirflowApiError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else {}

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params)

    def dag_ids(self) -> list[str]:
        return [d["dag_id"] for d in self.get("/dags", limit=1000)["dags"]]

    def import_errors(self) -> list[dict]:
        return self.get("/importErrors")["import_errors"]

    def trigger(self, dag_id: str, conf: dict | None = None, run_id: str | None = None) -> dict:
        body = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        # With a run id, sending it again cannot make a second run: at worst it answers 409.
        return self.request("POST", f"/dags/{dag_id}/dagRuns", idempotent=bool(run_id), json=body)

    def set_paused(self, dag_id: str, paused: bool) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.get(path, deserialize=True)["value"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns", limit=100, order_by="-run_after")["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        items = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]
        return {ti["task_id"]: ti for ti in items}

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str, note: str | None = None) -> dict:
        body = {"new_state": state}
        if note is not None:
            body["note"] = note
        return self.request("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}", json=body)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600, interval: float = 2) -> dict:
        """Wait until the run is finished (success or failed); returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(dag_id, run_id)
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(interval)
        raise AirflowApiError(f"{dag_id} run {run_id} did not finish within {timeout:.0f}s")
