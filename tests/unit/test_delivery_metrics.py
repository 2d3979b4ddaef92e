"""The delivery_metrics DAG: figures into CloudWatch MetricData, publishing into moto, the DAG's shape."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from deployline import delivery_metrics as dm
from deployline.config import load_pipeline_config
from deployline.metrics import STAGES, Window
from moto import mock_aws

ROOT = Path(__file__).resolve().parents[2]
APP = "sample_service"
WHEN = datetime(2025, 3, 1, tzinfo=UTC)


def stage(pass_rate=None, median=None, p90=None, passed=0, failed=0):
    return {"passed": passed, "failed": failed, "superseded": 0, "pass_rate": pass_rate,
            "seconds": {"count": passed + failed, "median": median, "p90": p90}}


def figures(**changes):
    """A hand-made result of ``metrics.delivery_metrics``: 30 days, 3 deploys, one of them failed."""
    base = {
        "application": APP,
        "window": {"start": "2025-01-30T00:00:00+00:00", "end": "2025-03-01T00:00:00+00:00", "days": 30.0},
        "releases": 4,
        "deployment_frequency": {"deploys": 3, "per_day": 0.1, "per_week": 0.7},
        "lead_time": {"count": 4, "median": 2.0, "p90": 5.5, "unit": "hours"},
        "change_failure_rate": {"deploys": 4, "failed": 1, "rate": 0.25},
        "time_to_restore": {"count": 1, "median": 0.5, "p90": 0.5, "unit": "hours", "restored": [], "open": [{}]},
        "stages": {name: stage() for name in STAGES} | {
            "2-commit": stage(pass_rate=0.75, median=120.0, p90=300.0, passed=3, failed=1)},
        "daily": [],
    }
    return base | changes


def by_key(data):
    return {(d["MetricName"], next((x["Value"] for x in d["Dimensions"] if x["Name"] == "Stage"), None)): d
            for d in data}


def test_metric_data_names_units_dimensions_and_conversions():
    data = by_key(dm.metric_data(figures(), WHEN))
    expected = {
        ("DeploymentsPerDay", None): (0.1, "Count"),
        ("DeploymentsPerWeek", None): (0.7, "Count"),
        ("Deployments", None): (3.0, "Count"),
        ("LeadTimeMedian", None): (7200.0, "Seconds"),  # hours -> seconds
        ("LeadTimeP90", None): (19800.0, "Seconds"),
        ("ChangeFailureRate", None): (25.0, "Percent"),  # rate -> percent
        ("FailedDeployments", None): (1.0, "Count"),
        ("TimeToRestoreMedian", None): (1800.0, "Seconds"),
        ("OpenIncidents", None): (1.0, "Count"),
        ("StagePassRate", "2-commit"): (75.0, "Percent"),
        ("StageDurationMedian", "2-commit"): (120.0, "Seconds"),
        ("StageDurationP90", "2-commit"): (300.0, "Seconds"),
    }
    # stages without data in the window send nothing
    assert {key: d["Unit"] for key, d in data.items()} == {key: unit for key, (_, unit) in expected.items()}
    assert {key: d["Value"] for key, d in data.items()} == pytest.approx({k: v for k, (v, _) in expected.items()})
    for (_, stage_name), datum in data.items():
        assert datum["Timestamp"] == WHEN
        assert {"Name": "Window", "Value": "30d"} in datum["Dimensions"]
        if stage_name:
            assert datum["Dimensions"] == [{"Name": "Stage", "Value": stage_name}, {"Name": "Window", "Value": "30d"}]
        else:
            assert datum["Dimensions"] == [{"Name": "Window", "Value": "30d"}]


def test_metric_data_leaves_out_missing_figures_but_sends_zero_counts():
    empty = figures(
        window={"start": "2025-02-22T00:00:00+00:00", "end": "2025-03-01T00:00:00+00:00", "days": 7.0},
        deployment_frequency={"deploys": 0, "per_day": 0.0, "per_week": 0.0},
        lead_time={"count": 0, "median": None, "p90": None, "unit": "hours"},
        change_failure_rate={"deploys": 0, "failed": 0, "rate": None},
        time_to_restore={"count": 0, "median": None, "p90": None, "unit": "hours", "restored": [], "open": []},
        stages={name: stage() for name in STAGES},
    )
    data = dm.metric_data(empty, WHEN)
    assert {d["MetricName"]: d["Value"] for d in data} == {
        "DeploymentsPerDay": 0.0, "DeploymentsPerWeek": 0.0, "Deployments": 0.0, "FailedDeployments": 0.0,
        "OpenIncidents": 0.0}
    assert all(d["Dimensions"] == [{"Name": "Window", "Value": "7d"}] for d in data)


def test_a_zero_rate_is_sent_as_zero_percent():
    data = by_key(dm.metric_data(figures(change_failure_rate={"deploys": 2, "failed": 0, "rate": 0.0}), WHEN))
    assert data[("ChangeFailureRate", None)]["Value"] == 0.0


def test_data_is_sent_in_batches_within_the_api_limit():
    calls = []

    class Client:
        def put_metric_data(self, **kwargs):
            calls.append(kwargs)

    data = [{"MetricName": "M", "Value": float(i)} for i in range(2 * dm.MAX_METRIC_DATA + 1)]
    assert dm.send_metric_data(Client(), APP, data) == len(data)
    assert [len(c["MetricData"]) for c in calls] == [1000, 1000, 1]
    assert {c["Namespace"] for c in calls} == {"Deployline/sample_service"}
    assert [d for c in calls for d in c["MetricData"]] == data
    calls.clear()
    assert dm.send_metric_data(Client(), APP, []) == 0 and calls == []


def test_window_ends_at_the_data_interval_end_or_now():
    window = dm.window_ending(WHEN, 30)
    assert (window.start, window.end) == (WHEN - timedelta(days=30), WHEN)
    before = datetime.now(UTC)
    window = dm.window_ending(None, 1)
    assert before <= window.end <= datetime.now(UTC) and window.days == 1


# ---------------------------------------------------------------------- publishing into moto


def one_deploy(now):
    """One release: committed 3 hours before it went live 2 hours ago; its commit stage took 90 s."""
    committed, live = now - timedelta(hours=5), now - timedelta(hours=2)
    return [{
        "version": "r1-abcdef1234",
        "application": APP,
        "commit": {"sha": "abcdef1234" + "0" * 30, "committed_at": committed.isoformat()},
        "stages": {"2-commit": {"result": "success", "started_at": (committed + timedelta(minutes=1)).isoformat(),
                                "finished_at": (committed + timedelta(minutes=1, seconds=90)).isoformat()}},
        "deployments": [{"result": "deployed", "at": live.isoformat(), "run_id": "run-1", "previous_version": None}],
    }]


@pytest.fixture
def cloudwatch(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.client("cloudwatch", region_name="us-east-1")


def test_publish_one_deploy_into_cloudwatch(cloudwatch):
    end = datetime.now(UTC).replace(microsecond=0)
    window = Window(end - timedelta(days=30), end)
    figures_sent, sent = dm.publish(cloudwatch, APP, one_deploy(end), window)
    assert figures_sent["deployment_frequency"]["deploys"] == 1

    listed = cloudwatch.list_metrics(Namespace="Deployline/sample_service")["Metrics"]
    assert len(listed) == sent
    names = {(m["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"]))) for m in listed}
    window_only = (("Window", "30d"),)
    commit_stage = (("Stage", "2-commit"), ("Window", "30d"))
    assert names == {
        ("DeploymentsPerDay", window_only), ("DeploymentsPerWeek", window_only), ("Deployments", window_only),
        ("LeadTimeMedian", window_only), ("LeadTimeP90", window_only), ("ChangeFailureRate", window_only),
        ("FailedDeployments", window_only), ("OpenIncidents", window_only),  # no restore: no TimeToRestoreMedian
        ("StagePassRate", commit_stage), ("StageDurationMedian", commit_stage), ("StageDurationP90", commit_stage),
    }

    def read(name, dimensions):
        points = cloudwatch.get_metric_statistics(
            Namespace="Deployline/sample_service", MetricName=name, Dimensions=dimensions,
            StartTime=end - timedelta(hours=1), EndTime=end + timedelta(hours=1), Period=3600,
            Statistics=["Maximum", "SampleCount"])["Datapoints"]
        assert len(points) == 1 and points[0]["SampleCount"] == 1
        return points[0]["Maximum"], points[0]["Unit"]

    window_dimension = [{"Name": "Window", "Value": "30d"}]
    stage_dimensions = [{"Name": "Stage", "Value": "2-commit"}, *window_dimension]
    assert read("Deployments", window_dimension) == (1.0, "Count")
    assert read("DeploymentsPerWeek", window_dimension) == (pytest.approx(7 / 30), "Count")
    assert read("LeadTimeMedian", window_dimension) == (3 * 3600.0, "Seconds")
    assert read("ChangeFailureRate", window_dimension) == (0.0, "Percent")
    assert read("FailedDeployments", window_dimension) == (0.0, "Count")
    assert read("OpenIncidents", window_dimension) == (0.0, "Count")
    assert read("StagePassRate", stage_dimensions) == (100.0, "Percent")
    assert read("StageDurationMedian", stage_dimensions) == (90.0, "Seconds")


def test_summary_table_shows_the_figures():
    table = dm.summary_table(figures())
    assert table.splitlines()[0].startswith("sample_service: 30d window")
    assert "3 (0.10/day, 0.70/week)" in table
    assert "median 2.0, p90 5.5" in table and "25.0 % (1 of 4 attempts)" in table
    commit_row = next(line for line in table.splitlines() if "2-commit" in line)
    assert commit_row.split() == ["2-commit", "75.0", "%", "120", "300", "3", "1"]
    assert next(line for line in table.splitlines() if "1-baking" in line).split() == ["1-baking", "-", "-", "-",
                                                                                        "0", "0"]


# ---------------------------------------------------------------------- the DAG


@pytest.fixture(scope="module")
def config():
    return load_pipeline_config(ROOT / "include/pipelines/sample_service.yaml", environ={})


def test_dag_shape(config):
    other = config.model_copy(update={"application": "billing"})
    dag = dm.build_delivery_metrics_dag([config, other])
    assert dag.dag_id == "delivery_metrics" and str(dag.schedule) == "@daily" and not dag.catchup
    assert set(dag.tags) == {"deployline"} and "Deployline/<app>" in dag.doc_md and "window_days" in dag.doc_md
    assert sorted(dag.task_dict) == ["publish_billing", "publish_sample_service"]
    param = dag.params.get_param("window_days")
    assert (param.schema["type"], param.schema["minimum"], param.schema["maximum"]) == ("integer", 1, 365)
    assert param.schema["title"] and param.description and dag.params["window_days"] == 30
    assert dm.build_delivery_metrics_dag([]).task_dict == {}


def test_the_task_reads_the_registry_and_publishes_over_the_run_window(config, cloudwatch, monkeypatch):
    end = datetime.now(UTC).replace(microsecond=0)

    class Registry:
        def records(self):
            return one_deploy(end)

    monkeypatch.setattr(dm.ReleaseRegistry, "for_config", classmethod(lambda cls, c: Registry()))
    monkeypatch.setattr(dm.aws, "client", lambda c, service: cloudwatch if service == "cloudwatch" else None)
    monkeypatch.setattr(dm, "get_current_context",
                        lambda: {"data_interval_end": end, "params": {"window_days": 7}})
    task = dm.build_delivery_metrics_dag([config]).task_dict["publish_sample_service"]
    sent = task.python_callable()
    listed = cloudwatch.list_metrics(Namespace="Deployline/sample_service")["Metrics"]
    assert sent == len(listed) == 11
    assert {d["Value"] for m in listed for d in m["Dimensions"] if d["Name"] == "Window"} == {"7d"}
