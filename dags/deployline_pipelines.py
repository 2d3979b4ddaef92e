"""Airflow DAGs of every pipeline in include/pipelines/ (see deployline.dag_factory)."""

# The Airflow modules the pipelines' DAGs are made of (deployline imports them), named here because
# the DAG processor imports a DAG file's own `airflow.*` imports once, in its long-lived parent
# ([dag_processor] parsing_pre_import_modules), instead of in every parse of the file: about
# 130 ms less per parse. tests/dags/test_dag_integrity.py checks that the list is complete.
import airflow.providers.amazon.aws.hooks.cloud_formation  # noqa: F401
import airflow.providers.amazon.aws.hooks.ec2  # noqa: F401
import airflow.providers.amazon.aws.hooks.ssm  # noqa: F401
import airflow.providers.amazon.aws.operators.sns  # noqa: F401
import airflow.providers.amazon.aws.triggers.base  # noqa: F401
import airflow.providers.standard.decorators.python  # noqa: F401
import airflow.providers.standard.operators.hitl  # noqa: F401
import airflow.providers.standard.operators.python  # noqa: F401
import airflow.providers.standard.operators.trigger_dagrun  # noqa: F401
import airflow.providers.standard.sensors.external_task  # noqa: F401
import airflow.providers.standard.triggers.temporal  # noqa: F401
import airflow.sdk.definitions.decorators  # noqa: F401
from deployline.dag_factory import build_pipeline_dags

build_pipeline_dags(globals())
