"""Airflow DAG ``support_infrastructure`` (stage 0): launch or destroy the shared infrastructure."""

from deployline.support_infrastructure import build_support_infrastructure_dag

dag = build_support_infrastructure_dag()
