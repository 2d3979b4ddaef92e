"""Airflow DAGs of every pipeline in include/pipelines/ (see deployline.dag_factory)."""

from deployline.dag_factory import build_pipeline_dags

build_pipeline_dags(globals())
