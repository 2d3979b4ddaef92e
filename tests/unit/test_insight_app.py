"""The delivery insight app (plugin pages and JSON) on a moto registry, with Airflow's auth replaced."""

import html
from types import SimpleNamespace

import pytest
from deployline.insight_app import Registries, create_app
from deployline.releases import ReleaseRegistry
from fastapi import HTTPException
from fastapi.testclient import TestClient

BUCKET = "insight-registry"
RUN = "commit__abcdef1234"
COMMIT = {"sha": "abcdef1234" * 4, "short": "abcdef1234", "author": "Ann Example", "email": "ann@example.com",
          "message": "Add the cart", "committed_at": "2026-11-20T10:00:00+00:00", "reverts": []}


def stage(result, start, end, **extra):
    return {"result": result, "started_at": start, "finished_at": end, "run_id": RUN, **extra}


@pytest.fixture
def registry(s3):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    registry.update(
        "r3-abcdef1234", commit=COMMIT, included_commits=[COMMIT], run_id=RUN,
        artifact={"bucket": BUCKET, "key": "shop/artifacts/r3.tar.gz", "sha256": "ab" * 32, "size": 2048},
        base_image={"id": "ami-0base", "source_image": "ami-0src", "baked": True, "version": "r3-abcdef1234"},
        application_image={"id": "ami-0app"},
        stages={"2-commit": stage("success", "2026-11-20T10:01:00+00:00", "2026-11-20T10:02:30+00:00"),
                "6-capacity": stage("failed", "2026-11-20T10:05:00+00:00", "2026-11-20T10:06:00+00:00",
                                    task="6-capacity.load_test_peak", error="p95 120 ms above 100 ms")},
        load_tests={"expected": {"passed": True, "users": 10, "throughput_rps": 2266.0, "p50_ms": 4, "p95_ms": 8,
                                 "p99_ms": 11, "failures": 0, "requests": 31771, "error_rate": 0.0,
                                 "reports": {"html": f"s3://{BUCKET}/shop/load-tests/r3/expected/report.html"}}},
        approvals={"production": {"decision": "approved", "by": "approver", "via": "required action",
                                  "at": "2026-11-21T09:58:00+00:00", "note": "Ship it"}},
        deployments=[{"result": "deployed", "started_at": "2026-11-21T09:59:00+00:00",
                      "at": "2026-11-21T10:00:00+00:00", "previous_version": None, "switch_seconds": 0.6}])
    registry.set_production("r3-abcdef1234")
    return registry


def client(s3, can_read=lambda user, dag_id: True, user=lambda: "someone"):
    configs = [SimpleNamespace(application="shop", pipeline_dag_id="shop_pipeline"),
               SimpleNamespace(application="empty", pipeline_dag_id="empty_pipeline")]
    registries = Registries(lambda: (configs, []), lambda c: ReleaseRegistry(s3, BUCKET, c.application), ttl=0)
    return TestClient(create_app(registries, user_dependency=user, can_read=can_read, root=lambda: "/ui"))


def test_the_release_list_and_json(s3, registry):
    api = client(s3)
    listing = api.get("/api/applications").json()["applications"]
    assert {a["application"]: (a["releases"], a["live_version"]) for a in listing} == {
        "empty": (0, None), "shop": (1, "r3-abcdef1234")}
    releases = api.get("/api/applications/shop/releases").json()
    (row,) = releases["releases"]
    assert row["production"] == "live" and row["stages"]["2-commit"] == "success"
    assert row["stages"]["6-capacity"] == "failed" and row["stages"]["1-baking"] == "not run"
    page = api.get("/applications/shop").text
    assert "r3-abcdef1234" in page and "Add the cart" in page and "Ann Example" in page


def test_a_release_traced_from_commit_to_production(s3, registry):
    api = client(s3)
    trace = api.get("/api/applications/shop/releases/r3-abcdef1234").json()
    assert trace["commit"]["sha"] == COMMIT["sha"] and trace["artifact"]["sha256"] == "ab" * 32
    assert trace["base_image"]["id"] == "ami-0base" and trace["application_image"]["id"] == "ami-0app"
    stages = {s["stage"]: s for s in trace["stages"]}
    assert stages["2-commit"]["seconds"] == 90.0
    assert stages["2-commit"]["link"] == f"/ui/dags/shop_pipeline/runs/{RUN}/tasks/group/2-commit"
    assert stages["6-capacity"]["link"] == f"/ui/dags/shop_pipeline/runs/{RUN}/tasks/6-capacity.load_test_peak"
    assert trace["approvals"][0]["by"] == "approver" and trace["deployments"][0]["result"] == "deployed"
    page = api.get("/applications/shop/releases/r3-abcdef1234").text
    for text in (COMMIT["sha"], "ab" * 32, "ami-0base", "ami-0app", "p95 120 ms above 100 ms", "Ship it",
                 "2266", "90.0 s", 'target="_top"'):
        assert text in page, text


def test_metrics_json_and_page(s3, registry):
    api = client(s3)
    figures = api.get("/api/applications/shop/metrics", params={"since": "2026-11-15T00:00:00Z",
                                                                "until": "2026-11-22T00:00:00Z"}).json()
    assert figures["deployment_frequency"]["deploys"] == 1
    assert figures["lead_time"]["median"] == 24.0  # committed 10:00 on the 20th, live 10:00 on the 21st
    assert figures["change_failure_rate"]["rate"] == 0.0
    assert figures["stages"]["6-capacity"]["pass_rate"] == 0.0
    page = api.get("/applications/shop/metrics", params={"days": 7, "until": "2026-11-22T00:00:00Z"}).text
    assert "Deployment frequency" in page and "24.0 h" in page and "<svg" in page


def test_an_application_without_releases_gets_a_clear_page(s3, registry):
    api = client(s3)
    assert "No releases yet" in api.get("/applications/empty").text
    assert "No releases yet" in api.get("/applications/empty/metrics").text
    assert api.get("/api/applications/empty/releases").json()["releases"] == []


@pytest.mark.parametrize("path, status, message", [
    ("/applications/nope", 404, "no application 'nope' that you may read"),
    ("/api/applications/nope/metrics", 404, "no application 'nope' that you may read"),
    ("/api/applications/shop/metrics?since=0001-01-01T00:00:00Z&until=9999-12-31T00:00:00Z", 422,
     "is longer than 3650 days"),
    ("/api/applications/shop/releases?limit=100000", 422, "less than or equal to 1000"),
    ("/api/applications/shop/releases/r9-0000000000", 404, "shop has no release 'r9-0000000000'"),
    ("/applications/shop/releases/latest", 404, "not a Deployline version: 'latest'"),
    ("/api/applications/shop/metrics?since=yesterday", 422, "bad window"),
    ("/api/applications/shop/metrics?since=2026-11-22T00:00:00Z&until=2026-11-21T00:00:00Z", 422,
     "is not after its start"),
    ("/api/applications/shop/metrics?days=0", 422, "greater than 0"),
    ("/pipelines/other_dag", 404, "other_dag belongs to no Deployline application"),
])
def test_bad_requests_say_what_was_wrong(s3, registry, path, status, message):
    response = client(s3).get(path)
    assert response.status_code == status and message in html.unescape(response.text)


def test_the_dag_tab_goes_to_the_application(s3, registry):
    response = client(s3).get("/pipelines/shop_pipeline", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"].endswith("/applications/shop")


def test_only_readers_of_the_pipeline_see_its_releases(s3, registry):
    api = client(s3, can_read=lambda user, dag_id: dag_id != "shop_pipeline")
    assert [a["application"] for a in api.get("/api/applications").json()["applications"]] == ["empty"]
    response = api.get("/api/applications/shop/releases")
    # The same answer as for an application that does not exist: no hint, and no list of the others.
    assert response.status_code == 404 and response.json()["detail"] == "no application 'shop' that you may read"


def test_no_user_no_data(s3, registry):
    def nobody():
        raise HTTPException(status_code=401, detail="Not authenticated")

    api = client(s3, user=nobody)
    assert api.get("/api/applications").status_code == 401
    # The API's description too: only for someone logged in.
    assert api.get("/openapi.json").status_code == 401 and api.get("/docs").status_code == 401
    assert client(s3).get("/openapi.json").json()["info"]["title"] == "Deployline delivery insight"
    assert "swagger" in client(s3).get("/docs").text.lower()
    page = api.get("/applications/shop")
    assert page.status_code == 401 and "Not authenticated" in page.text and "r3-abcdef1234" not in page.text


def test_the_releases_tab_shows_every_column_in_a_dag_page_frame(s3, registry):
    """Issue 18: the DAG page's Releases tab cut its Production column off at a 1600 px window.
    The tab's frame is about 1000 px wide there; the page is laid out in Chromium at that width."""
    from pathlib import Path

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")  # Debian's package (make test installs it as root)
    if not chromium.exists():
        pytest.skip(f"{chromium} is not installed")
    long_message = "Rework the checkout flow so that a cart with many items and coupons is priced once " * 2
    for revision in range(4, 9):
        registry.update(f"r{revision}-abcdef1234", commit=COMMIT | {"message": long_message.strip()},
                        stages={s: {"result": "upstream_failed"} for s in
                                ("1-baking", "2-commit", "3-acceptance", "5-exploratory", "6-capacity",
                                 "7-pre-production", "8-production")},
                        deployments=[{"result": "rolled_back", "at": "2026-11-21T10:00:00+00:00"}])
    page_html = client(s3).get("/applications/shop").text
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.set_content(page_html)
            layout = page.evaluate("""() => {
                const heads = [...document.querySelectorAll('table.releases th')];
                return {width: window.innerWidth, scroll: document.documentElement.scrollWidth,
                        wrap: document.querySelector('.wide').scrollWidth,
                        wrapWidth: document.querySelector('.wide').clientWidth,
                        last: heads[heads.length - 1].textContent,
                        right: heads[heads.length - 1].getBoundingClientRect().right};
            }""")
        finally:
            browser.close()
    assert layout["last"] == "Production"
    assert layout["right"] <= layout["width"], layout
    assert layout["scroll"] <= layout["width"] and layout["wrap"] <= layout["wrapWidth"], layout
