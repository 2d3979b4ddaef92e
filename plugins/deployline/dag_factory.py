"""Build every DAG of every pipeline config; the DAG files only call this."""

from __future__ import annotations

import logging

from deployline.config import PipelineConfigError, load_all

log = logging.getLogger(__name__)


def build_pipeline_dags(namespace: dict) -> list[str]:
    """Put the DAGs of every valid pipeline config into ``namespace`` (a DAG file's globals).

    Broken configs are skipped here, so they never hide the others; ``check_configs``
    reports them as an import error of its own DAG file.
    """
    from deployline.pipeline import build_pipeline_dag
    from deployline.polling import build_poll_dag

    configs, errors = load_all()
    for error in errors:
        log.warning("skipping pipeline config: %s", error)
    built = []
    for config in configs:
        for dag in (build_poll_dag(config), build_pipeline_dag(config)):
            namespace[dag.dag_id] = dag
            built.append(dag.dag_id)
    return built


def check_configs() -> None:
    """Raise one error that lists every broken pipeline config (file, field, problem)."""
    _, errors = load_all()
    if errors:
        listing = "\n".join(f"- {e}" for e in errors)
        raise PipelineConfigError(f"{len(errors)} pipeline config(s) are invalid:\n{listing}")
