"""deployline.python_tasks builds the tasks Airflow's @task would, as plain PythonOperators.

Each case builds the same functions with ``airflow.sdk.task`` and with ours, in two DAGs, and
compares what the scheduler and the task runner use: XCom handling, dependencies, arguments,
setup/teardown and trigger rules, docs.  Running them is covered end to end (every pipeline task).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import airflow.sdk
import pytest
from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
from airflow.sdk import DAG, TriggerRule, XComArg, chain
from deployline.python_tasks import task as deployline_task


def build(task) -> DAG:
    """A small DAG in the shape of a stage: setup, steps passing dicts, a branch, a teardown."""
    with DAG(f"shape_{id(task)}", schedule=None, start_date=datetime(2024, 1, 1)) as dag:

        @task(task_id="resolve", retries=2)
        def resolve() -> dict:
            """Which commit to build."""
            return {"sha": "abc", "version": "r1-abc"}

        @task(task_id="provision")
        def provision(commit: dict) -> dict[str, str]:
            return {"endpoint": "http://127.0.0.1"}

        @task(task_id="check")
        def check(commit: dict, endpoint: str, attempts: int = 3) -> str:
            return "ok"

        @task(task_id="counted")
        def counted(commit) -> Mapping:
            return {}

        @task(task_id="listed")
        def listed() -> list[dict]:
            return []

        @task(task_id="unresolvable")
        def unresolvable() -> NotImportedAnywhere:  # noqa: F821 (a TYPE_CHECKING-only name)
            return {}

        @task.branch(task_id="choose")
        def choose(commit: dict) -> list[str]:
            return ["check"]

        @task(task_id="teardown", trigger_rule=TriggerRule.ALL_DONE)
        def teardown(environment: dict) -> None:
            pass

        commit = resolve()
        environment = provision(commit)
        checked = check(commit, environment["endpoint"], attempts=5)
        chain(choose(commit), checked, counted(commit), listed(), unresolvable())
        checked >> teardown(environment).as_teardown(setups=environment)
    return dag


@pytest.fixture(scope="module")
def both():
    return build(airflow.sdk.task), build(deployline_task)


def argument(value):
    """An XComArg by what it pulls (task and key), anything else as it is."""
    if isinstance(value, XComArg):
        return [(operator.task_id, key) for operator, key in value.iter_references()]
    return value


def as_seen(operator) -> dict:
    return {
        "upstream": sorted(operator.upstream_task_ids),
        "downstream": sorted(operator.downstream_task_ids),
        "multiple_outputs": operator.multiple_outputs,
        "trigger_rule": operator.trigger_rule,
        "is_setup": operator.is_setup,
        "is_teardown": operator.is_teardown,
        "retries": operator.retries,
        "doc_md": operator.doc_md,
        "op_args": [argument(a) for a in operator.op_args],
        "op_kwargs": {k: argument(v) for k, v in operator.op_kwargs.items()},
        "callable": operator.python_callable.__name__,
    }


def test_the_tasks_are_those_airflow_task_builds(both):
    airflows, ours = both
    assert sorted(ours.task_dict) == sorted(airflows.task_dict)
    for task_id, operator in ours.task_dict.items():
        assert as_seen(operator) == as_seen(airflows.task_dict[task_id]), task_id


def test_a_return_annotation_of_a_mapping_pushes_each_key(both):
    _, ours = both
    pushes_keys = {task_id for task_id, operator in ours.task_dict.items() if operator.multiple_outputs}
    assert pushes_keys == {"resolve", "provision", "counted"}


def test_the_operators_are_airflows_python_operators(both):
    _, ours = both
    assert type(ours.task_dict["choose"]) is BranchPythonOperator
    assert {type(o) for t, o in ours.task_dict.items() if t != "choose"} == {PythonOperator}
    assert ours.task_dict["resolve"].doc_md == "Which commit to build."
    assert ours.task_dict["teardown"].trigger_rule == TriggerRule.ALL_DONE_SETUP_SUCCESS


def test_the_task_id_is_required():
    with pytest.raises(TypeError):
        deployline_task()
