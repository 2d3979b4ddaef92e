"""``@task`` and ``@task.branch`` as Deployline's DAGs use them, building plain PythonOperators.

Written like TaskFlow (decorate a function, call it with other tasks' outputs, ``.as_teardown``)
and run the same way: the operator is Airflow's ``PythonOperator`` (``BranchPythonOperator``)
with the call's arguments as ``op_args``/``op_kwargs``, a return annotation of a mapping type
pushes each key as its own XCom, and the docstring is the task's ``doc_md``, as with
``airflow.sdk.task``.  What it leaves out is the decorator's parse-time work: Airflow's
``@task`` inspects the function's signature five times and evaluates its return annotation for
every task it builds (here: once per function definition, by asking ``@task`` itself), which
makes a task twice as expensive to build as the operator itself
(0.33 against 0.17 ms).  Every pipeline config builds 53 of these in every parse of the DAG
folder (benchmarks/parse_time.py, docs/PERFORMANCE.md).  Only keyword arguments of the
operator are accepted (``task_id`` is required), and there is no ``expand``: no DAG maps tasks.
"""

from __future__ import annotations

from collections.abc import Callable

from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
from airflow.sdk import task as airflow_task

_returns_mapping: dict = {}  # function code -> bool, worked out once per definition, not per task


def _multiple_outputs(function: Callable) -> bool:
    """Whether ``@task`` would push each key of the result too (a return annotation of a
    mapping): asked of Airflow's own decorator, once per function definition."""
    code = function.__code__
    if code not in _returns_mapping:
        _returns_mapping[code] = airflow_task(function).multiple_outputs
    return _returns_mapping[code]


def _decorator(operator_class: type[PythonOperator], task_id: str, operator_args: dict):
    def decorate(function: Callable):
        def build(*args, **kwargs):
            operator = operator_class(
                task_id=task_id, python_callable=function, op_args=args, op_kwargs=kwargs,
                multiple_outputs=_multiple_outputs(function),
                **({"doc_md": function.__doc__} | operator_args),
            )
            return operator.output

        build.__name__, build.__doc__, build.__wrapped__ = function.__name__, function.__doc__, function
        return build

    return decorate


class _Task:
    def __call__(self, *, task_id: str, **operator_args) -> Callable:
        return _decorator(PythonOperator, task_id, operator_args)

    def branch(self, *, task_id: str, **operator_args) -> Callable:
        return _decorator(BranchPythonOperator, task_id, operator_args)


task = _Task()
