"""Delivery insight: the release list, a release's trace and the delivery metrics, as pages and JSON.

A FastAPI app that the ``deployline_insight`` plugin mounts on Airflow's API server at
``/deployline``.  It reads the release registry (S3), never the Airflow database, and asks
Airflow's auth manager whether the user may read the application's pipeline DAG.

Pages: ``/deployline/`` (applications), ``/deployline/applications/<app>`` (releases),
``.../releases/<version>`` (trace), ``.../metrics?days=30`` (metrics with charts).
JSON: the same paths under ``/deployline/api/``.
"""


import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from deployline import charts
from deployline.metrics import STAGES, Window, delivery_metrics, parse_time
from deployline.releases import ReleaseRegistry, revision_of
from deployline.traceability import STAGE_TITLES, release_summary, trace

log = logging.getLogger(__name__)
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
CACHE_SECONDS = 5.0  # pages load several views of the same records; the registry changes slowly


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _hours(hours: float | None) -> str:
    return "—" if hours is None else _duration(hours * 3600)


def _percent(rate: float | None) -> str:
    return "—" if rate is None else f"{rate * 100:.0f} %"


TEMPLATES.env.filters.update(duration=_duration, hours=_hours, percent=_percent)


# The longest metrics window: a daily series over 0001-9999 took 72 s and 2.2 GB.
MAX_WINDOW_DAYS = 3650
MAX_RELEASES = 1000  # releases listed per request (newest first)


def unknown(application: str) -> str:
    return f"no application {application!r} that you may read"


class NotFound(HTTPException):
    def __init__(self, detail: str):
        super().__init__(status_code=404, detail=detail)


class Registries:
    """Pipeline configs and their registries' records, each kept for ``CACHE_SECONDS``."""

    def __init__(self, load_configs: Callable[[], tuple[list, list]], registry_for: Callable[[Any], Any],
                 ttl: float = CACHE_SECONDS):
        self.load_configs, self.registry_for, self.ttl = load_configs, registry_for, ttl
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def _cached(self, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            hit = self._cache.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        value = load()
        with self._lock:
            self._cache[key] = (time.monotonic(), value)
        return value

    def configs(self) -> dict[str, Any]:
        return self._cached("configs", lambda: {c.application: c for c in self.load_configs()[0]})

    def config(self, application: str):
        configs = self.configs()
        if application not in configs:
            raise NotFound(unknown(application))  # lists nothing: which applications exist is not for everyone
        return configs[application]

    def records(self, application: str) -> tuple[list[dict], str | None]:
        """(records oldest first, live version) of one application."""

        def load():
            registry = self.registry_for(self.config(application))
            production = registry.production() or {}
            return registry.records(), production.get("version")

        return self._cached(f"records:{application}", load)


def airflow_user_dependency():
    """Airflow's own authentication: the UI's session cookie or a Bearer token from /auth/token."""
    from airflow.api_fastapi.core_api.security import get_user

    return get_user


def airflow_can_read(user, dag_id: str) -> bool:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    return get_auth_manager().is_authorized_dag(method="GET", user=user, details=DagDetails(id=dag_id))


def ui_root() -> str:
    """The path of Airflow's UI (``[api] base_url`` may put it under a prefix)."""
    from urllib.parse import urlparse

    from airflow.configuration import conf

    return urlparse(conf.get("api", "base_url", fallback="/") or "/").path.rstrip("/")


def create_app(registries: "Registries | None" = None, user_dependency=None,
               can_read: Callable[[Any, str], bool] = airflow_can_read,
               root: Callable[[], str] = ui_root) -> FastAPI:
    if registries is None:
        from deployline.config import load_all

        registries = Registries(load_all, ReleaseRegistry.for_config)
    # The API's description and schema are behind the same login as the data (routes below).
    app = FastAPI(title="Deployline delivery insight", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Release traceability and delivery metrics from the Deployline release registry.")
    User = Annotated[Any, Depends(user_dependency or airflow_user_dependency())]

    def readable_config(application: str, user):
        config = registries.config(application)
        if not can_read(user, config.pipeline_dag_id):
            raise NotFound(unknown(application))  # the same answer as for none: no hint that it exists
        return config

    def window_of(days: float | None, since: str | None, until: str | None) -> Window:
        try:
            end = parse_time(until) or datetime.now(UTC)
            start = parse_time(since)
            window = Window(start, end) if start else Window.last(days or 30, end)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=f"bad window: {exc}") from exc
        if (window.end - window.start).days > MAX_WINDOW_DAYS:
            raise HTTPException(status_code=422, detail=f"bad window: {window.start.isoformat()} to "
                                f"{window.end.isoformat()} is longer than {MAX_WINDOW_DAYS} days")
        return window

    # ---------------------------------------------------------------------------- data

    def applications(user) -> list[dict]:
        found = []
        for application, config in sorted(registries.configs().items()):
            if not can_read(user, config.pipeline_dag_id):
                continue
            records, live = registries.records(application)
            found.append({"application": application, "pipeline": config.pipeline_dag_id,
                          "releases": len(records), "live_version": live,
                          "newest": records[-1]["version"] if records else None})
        return found

    def releases(application: str, user, limit: int = MAX_RELEASES) -> dict:
        config = readable_config(application, user)
        records, live = registries.records(application)
        newest = list(reversed(records))[:limit]
        return {"application": application, "pipeline": config.pipeline_dag_id, "live_version": live,
                "releases": [release_summary(r, live) for r in newest], "total": len(records)}

    def release(application: str, version: str, user) -> dict:
        config = readable_config(application, user)
        try:
            revision_of(version)
        except ValueError as exc:
            raise NotFound(str(exc)) from exc
        records, live = registries.records(application)
        record = next((r for r in records if r["version"] == version), None)
        if record is None:
            raise NotFound(f"{application} has no release {version!r}")
        return trace(record, config.pipeline_dag_id, root(), live)

    def metrics(application: str, window: Window, user) -> dict:
        readable_config(application, user)
        records, _ = registries.records(application)
        return delivery_metrics(application, records, window)

    Days = Annotated[float | None, Query(gt=0, le=3650, description="window: the last N days (default 30)")]
    Since = Annotated[str | None, Query(description="window start, ISO 8601 (instead of days)")]
    Until = Annotated[str | None, Query(description="window end, ISO 8601 (default now)")]

    # ---------------------------------------------------------------------------- JSON

    @app.get("/api/applications", tags=["JSON"])
    def api_applications(user: User):
        return {"applications": applications(user)}

    Limit = Annotated[int, Query(ge=1, le=MAX_RELEASES, description="the newest N releases")]

    @app.get("/api/applications/{application}/releases", tags=["JSON"])
    def api_releases(application: str, user: User, limit: Limit = 100):
        return releases(application, user, limit)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema(user: User):
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    def api_docs(request: Request, user: User):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                                   title="Deployline delivery insight")

    @app.get("/api/applications/{application}/releases/{version}", tags=["JSON"])
    def api_release(application: str, version: str, user: User):
        return release(application, version, user)

    @app.get("/api/applications/{application}/metrics", tags=["JSON"])
    def api_metrics(application: str, user: User, days: Days = None, since: Since = None, until: Until = None):
        return metrics(application, window_of(days, since, until), user)

    # ---------------------------------------------------------------------------- pages

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, {"ui_root": root(), "stage_titles": STAGE_TITLES,
                                                          "stages": STAGES, **context}, status_code=status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page(request: Request, user: User):
        return page(request, "index.html", applications=applications(user))

    @app.get("/pipelines/{dag_id}", include_in_schema=False)
    def pipeline_page(request: Request, dag_id: str, user: User):
        """The "Releases" tab of a DAG page: the application whose DAG it is."""
        for application, config in registries.configs().items():
            if dag_id == config.pipeline_dag_id or dag_id.startswith(f"{application}_"):
                return RedirectResponse(f"{request.scope.get('root_path', '')}/applications/{application}")
        raise NotFound(f"{dag_id} belongs to no Deployline application: releases are shown on the DAGs of "
                       f"each application (<application>_pipeline and the others)")

    @app.get("/applications/{application}", response_class=HTMLResponse, include_in_schema=False)
    def releases_page(request: Request, application: str, user: User, limit: Limit = 200):
        return page(request, "releases.html", **releases(application, user, limit))

    @app.get("/applications/{application}/releases/{version}", response_class=HTMLResponse,
             include_in_schema=False)
    def release_page(request: Request, application: str, version: str, user: User):
        return page(request, "release.html", release=release(application, version, user))

    @app.get("/applications/{application}/metrics", response_class=HTMLResponse, include_in_schema=False)
    def metrics_page(request: Request, application: str, user: User, days: Days = None, since: Since = None,
                     until: Until = None):
        figures = metrics(application, window_of(days, since, until), user)
        return page(request, "metrics.html", m=figures, days=days or 30,
                    deploy_chart=charts.daily_bars(figures["daily"]),
                    stage_chart=charts.stage_durations(figures["stages"]))

    @app.exception_handler(HTTPException)
    def explain(request: Request, exc: HTTPException):
        if request.url.path.rstrip("/").split("/")[-1] == "api" or "/api/" in request.url.path:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return page(request, "error.html", status_code=exc.status_code, status=exc.status_code, detail=exc.detail)

    return app
