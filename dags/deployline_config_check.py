"""Surfaces broken pipeline configs as an Airflow DAG import error of this file.

It defines no DAG: each broken include/pipelines/*.yaml is listed here (file, field,
problem) while deployline_pipelines.py keeps loading every valid pipeline.
"""

from deployline.dag_factory import check_configs

check_configs()
