"""Airflow DAG ``support_infrastructure`` (stage 0): launch or destroy the shared infrastructure."""

# Imported once by the DAG processor's parent, not in every parse (see deployline_pipelines.py).
import airflow.providers.standard.decorators.python  # noqa: F401
import airflow.providers.standard.operators.python  # noqa: F401
import airflow.sdk.definitions.decorators  # noqa: F401
from deployline.support_infrastructure import build_support_infrastructure_dag

dag = build_support_infrastructure_dag()
