"""Settings every Deployline DAG shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

# Fixed and in the past: DAGs are triggered or scheduled from now on (catchup is off).
START_DATE = datetime(2024, 1, 1, tzinfo=UTC)


def default_args(**overrides) -> dict:
    return {
        "owner": "deployline",
        "retries": 0,
        "retry_delay": timedelta(seconds=20),
    } | overrides


def with_trigger_form(dag, params: dict):
    """Give ``dag`` its params (the trigger form) once its tasks exist, and return it.

    Airflow deep-copies a DAG's params into each task it creates, once per class of the
    operator's hierarchy (about four copies a task), then serializes and validates every copy.
    A task never needs its copy: when it runs, Airflow merges the DAG's params into its context
    first (``process_params``), and the trigger form and its validation read the DAG's.  Set
    after the tasks, the params cost once per DAG: about a fifth of the parse at 50 pipelines
    (docs/PERFORMANCE.md).
    """
    dag.params = params
    return dag
