"""The ``delivery_metrics`` DAG: publish every application's delivery metrics to CloudWatch, daily.

One ``publish_<app>`` task per valid pipeline config reads the application's release records,
computes ``metrics.delivery_metrics`` over the window that ends at the run's
``data_interval_end`` and sends the figures with ``PutMetricData`` to the namespace
``Deployline/<app>``.  Turning figures into ``MetricData`` (``metric_data``), sending it in
batches (``send_metric_data``) and the log table (``summary_table``) are plain functions, so
they can be tested without Airflow.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from airflow.sdk import DAG, Param, get_current_context

from deployline import aws, metrics
from deployline.config import PipelineConfig
from deployline.dag_defaults import START_DATE, default_args, with_trigger_form
from deployline.python_tasks import task
from deployline.releases import ReleaseRegistry

log = logging.getLogger(__name__)

DAG_ID = "delivery_metrics"
NAMESPACE_PREFIX = "Deployline/"
DEFAULT_WINDOW_DAYS = 30
MAX_WINDOW_DAYS = 365
MAX_METRIC_DATA = 1000  # PutMetricData: at most 1000 MetricData per call

SECONDS_PER_HOUR = 3600.0
COUNT, SECONDS, PERCENT = "Count", "Seconds", "Percent"


def namespace(application: str) -> str:
    return f"{NAMESPACE_PREFIX}{application}"


def window_label(days: float) -> str:
    """The ``Window`` dimension's value: ``30d`` (``1.5d`` for a fractional window)."""
    return f"{days:g}d"


def _hours_to_seconds(hours: float | None) -> float | None:
    return None if hours is None else hours * SECONDS_PER_HOUR


def _percent(rate: float | None) -> float | None:
    return None if rate is None else rate * 100.0


def metric_data(figures: dict, timestamp: datetime) -> list[dict]:
    """``MetricData`` for ``PutMetricData`` from the figures of ``metrics.delivery_metrics``.

    Counts are always sent (0 included); any other figure that is None (no data in the window)
    is left out rather than sent as 0.  Every datum carries the dimension ``Window=<days>d``,
    the per-stage ones ``Stage=<stage>`` too.
    """
    window = [{"Name": "Window", "Value": window_label(figures["window"]["days"])}]
    frequency = figures["deployment_frequency"]
    lead = figures["lead_time"]
    failures = figures["change_failure_rate"]
    restore = figures["time_to_restore"]
    wanted: list[tuple[str, float | None, str, list[dict]]] = [
        ("DeploymentsPerDay", frequency["per_day"], COUNT, window),
        ("DeploymentsPerWeek", frequency["per_week"], COUNT, window),
        ("Deployments", frequency["deploys"], COUNT, window),
        ("LeadTimeMedian", _hours_to_seconds(lead["median"]), SECONDS, window),
        ("LeadTimeP90", _hours_to_seconds(lead["p90"]), SECONDS, window),
        ("ChangeFailureRate", _percent(failures["rate"]), PERCENT, window),
        ("FailedDeployments", failures["failed"], COUNT, window),
        ("TimeToRestoreMedian", _hours_to_seconds(restore["median"]), SECONDS, window),
        ("OpenIncidents", len(restore["open"]), COUNT, window),
    ]
    for stage, figures_of_stage in figures["stages"].items():
        dimensions = [{"Name": "Stage", "Value": stage}, *window]
        seconds = figures_of_stage["seconds"]
        wanted += [
            ("StagePassRate", _percent(figures_of_stage["pass_rate"]), PERCENT, dimensions),
            ("StageDurationMedian", seconds["median"], SECONDS, dimensions),
            ("StageDurationP90", seconds["p90"], SECONDS, dimensions),
        ]
    return [
        {"MetricName": name, "Dimensions": [dict(d) for d in dimensions], "Timestamp": timestamp,
         "Value": float(value), "Unit": unit}
        for name, value, unit, dimensions in wanted
        if value is not None or unit == COUNT  # a count of nothing is 0, never None
    ]


def send_metric_data(client, application: str, data: list[dict]) -> int:
    """``PutMetricData`` in batches of at most ``MAX_METRIC_DATA``; the number of data points sent."""
    for start in range(0, len(data), MAX_METRIC_DATA):
        client.put_metric_data(Namespace=namespace(application), MetricData=data[start:start + MAX_METRIC_DATA])
    return len(data)


def _number(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def summary_table(figures: dict) -> str:
    """A short table of the figures for the task log (``-``: no data in the window)."""
    frequency, lead = figures["deployment_frequency"], figures["lead_time"]
    failures, restore = figures["change_failure_rate"], figures["time_to_restore"]
    window = figures["window"]
    lines = [
        f"{figures['application']}: {window_label(window['days'])} window {window['start']} .. {window['end']}",
        f"  {'deployments':<22}{frequency['deploys']} ({frequency['per_day']:.2f}/day, "
        f"{frequency['per_week']:.2f}/week)",
        f"  {'lead time (h)':<22}median {_number(lead['median'])}, p90 {_number(lead['p90'])} "
        f"({lead['count']} commits)",
        f"  {'change failure rate':<22}{_number(_percent(failures['rate']), ' %')} "
        f"({failures['failed']} of {failures['deploys']} attempts)",
        f"  {'time to restore (h)':<22}median {_number(restore['median'])} ({restore['count']} restored, "
        f"{len(restore['open'])} open)",
        f"  {'stage':<22}{'pass rate':>10}{'median s':>10}{'p90 s':>10}{'passed':>8}{'failed':>8}",
    ]
    for stage, entry in figures["stages"].items():
        seconds = entry["seconds"]
        lines.append(f"  {stage:<22}{_number(_percent(entry['pass_rate']), ' %'):>10}"
                     f"{_number(seconds['median'], digits=0):>10}{_number(seconds['p90'], digits=0):>10}"
                     f"{entry['passed']:>8}{entry['failed']:>8}")
    return "\n".join(lines)


def publish(client, application: str, records: list[dict], window: metrics.Window) -> tuple[dict, int]:
    """Compute the figures of ``records`` over ``window`` and send them, stamped with the window's end."""
    figures = metrics.delivery_metrics(application, records, window)
    return figures, send_metric_data(client, application, metric_data(figures, window.end))


def window_ending(end: datetime | None, days: float) -> metrics.Window:
    """``days`` up to ``end`` (a run's ``data_interval_end``; None: now), as a plain UTC window."""
    end = datetime.fromtimestamp(end.timestamp(), UTC) if end else datetime.now(UTC)
    return metrics.Window(end - timedelta(days=days), end)


# ---------------------------------------------------------------------- the DAG

DOC = """\
## Delivery metrics

Every day, for every application ({apps}), one `publish_<app>` task reads the application's
release records from the registry (`s3://<artifact bucket>/<app>/releases/`), computes its
delivery metrics over the **window** of the last `window_days` days (a parameter, default
{default_days}, 1 to {max_days}) up to the run's `data_interval_end` (now when the run has none),
and publishes them to **CloudWatch**, namespace `Deployline/<app>`, stamped with the window's end:

| metric | unit | meaning |
|---|---|---|
| `Deployments` | Count | successful production deploys in the window |
| `DeploymentsPerDay`, `DeploymentsPerWeek` | Count | deployment frequency |
| `LeadTimeMedian`, `LeadTimeP90` | Seconds | commit to live, per commit put live in the window |
| `ChangeFailureRate` | Percent | failed production attempts (rolled back or reverted), 0 to 100 |
| `FailedDeployments` | Count | those failed attempts |
| `TimeToRestoreMedian` | Seconds | failure to the deploy that restored production |
| `OpenIncidents` | Count | failures not yet restored at the window's end |
| `StagePassRate` | Percent | per stage (dimension `Stage`): passed / (passed + failed) |
| `StageDurationMedian`, `StageDurationP90` | Seconds | per stage: time a stage took |

Every data point has the dimension `Window=<window_days>d` (e.g. `Window={default_days}d`), so
alarms and dashboards on different windows never mix. Counts are sent even when 0; any other
figure with no data in the window (no deploy, no restore, no stage run) is **left out**, not
sent as 0. Each data point is a daily snapshot of the whole window: graph or alarm on it with
the `Average` or `Maximum` statistic over one day, not `Sum`.

The task log shows a summary table; the task's XCom is the number of data points sent.
"""


def build_delivery_metrics_dag(configs: list[PipelineConfig]) -> DAG:
    form = {
        "window_days": Param(
            DEFAULT_WINDOW_DAYS, type="integer", minimum=1, maximum=MAX_WINDOW_DAYS, title="Window (days)",
            description=f"The metrics cover this many days up to the run's data interval end, 1 to "
                        f"{MAX_WINDOW_DAYS}; published with the dimension Window=<days>d.",
        ),
    }
    with DAG(
        dag_id=DAG_ID,
        description="Publishes the delivery metrics of every application to CloudWatch",
        schedule="@daily",
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=default_args(retries=1),
        tags=["deployline"],
        doc_md=DOC.format(apps=", ".join(f"`{c.application}`" for c in configs) or "none configured",
                          default_days=DEFAULT_WINDOW_DAYS, max_days=MAX_WINDOW_DAYS),
    ) as dag:
        for config in configs:
            _publish_task(config)
    return with_trigger_form(dag, form)


def _publish_task(config: PipelineConfig):
    @task(task_id=f"publish_{config.application}")
    def publish_metrics() -> int:
        ctx = get_current_context()
        window = window_ending(ctx.get("data_interval_end"), int(ctx["params"]["window_days"]))
        records = ReleaseRegistry.for_config(config).records()
        figures, sent = publish(aws.client(config, "cloudwatch"), config.application, records, window)
        log.info("%s\n%d data points sent to CloudWatch namespace %s", summary_table(figures), sent,
                 namespace(config.application))
        return sent

    return publish_metrics()
