"""Build every DAG of every pipeline config; the DAG files only call this."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

from deployline.config import PipelineConfigError, load_all

log = logging.getLogger(__name__)


def build_pipeline_dags(namespace: dict) -> list[str]:
    """Put the DAGs of every valid pipeline config into ``namespace`` (a DAG file's globals).

    Broken configs are skipped here, so they never hide the others; ``check_configs``
    reports them as an import error of its own DAG file.  A task's process parses this file
    to run one task of one DAG (Airflow's parsing context names it): only that DAG is built.
    """
    from airflow.sdk import get_parsing_context

    configs, errors = load_all()
    for error in errors:
        log.warning("skipping pipeline config: %s", error)
    builders = dag_builders(configs)
    wanted = get_parsing_context().dag_id
    if wanted in builders:
        builders = {wanted: builders[wanted]}
    with _gc_paused():
        dags = [build() for build in builders.values()]
    for dag in dags:
        namespace[dag.dag_id] = dag
    return [dag.dag_id for dag in dags]


def dag_builders(configs: list) -> dict[str, Callable[[], object]]:
    """Every DAG of ``configs`` by its id, not built yet."""
    from deployline.approvals import GATES, build_gate_dag, gate_dag_id
    from deployline.delivery_metrics import DAG_ID as METRICS_DAG_ID
    from deployline.delivery_metrics import build_delivery_metrics_dag
    from deployline.pipeline import build_pipeline_dag
    from deployline.polling import build_poll_dag
    from deployline.self_service import REAPER_DAG_ID, build_reaper_dag, build_self_service_dag, self_service_dag_id

    builders = {REAPER_DAG_ID: partial(build_reaper_dag, configs),
                METRICS_DAG_ID: partial(build_delivery_metrics_dag, configs)}
    for config in configs:
        builders[config.poll_dag_id] = partial(build_poll_dag, config)
        builders[config.pipeline_dag_id] = partial(build_pipeline_dag, config)
        builders[self_service_dag_id(config)] = partial(build_self_service_dag, config)
        builders.update({gate_dag_id(config, gate): partial(build_gate_dag, config, gate) for gate in GATES})
    return builders


@contextmanager
def _gc_paused():
    """Builds DAGs with Python's cyclic garbage collector paused.

    Nearly every object made while building the DAGs stays alive (they are the DAGs), so the
    collector's passes find nothing, yet each full pass walks every object in the process,
    Airflow's included: at 50 pipelines that was about a tenth of the parse, in one process.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_configs() -> None:
    """Raise one error that lists every broken pipeline config (file, field, problem)."""
    _, errors = load_all()
    if errors:
        listing = "\n".join(f"- {e}" for e in errors)
        raise PipelineConfigError(f"{len(errors)} pipeline config(s) are invalid:\n{listing}")
