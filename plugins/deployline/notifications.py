"""Messages to the application's SNS topic: approvals requested and decided, pipeline failures."""

from __future__ import annotations

import logging
from urllib.parse import quote

from airflow.sdk import BaseNotifier

from deployline import aws
from deployline.config import PipelineConfig
from deployline.python_tasks import task

log = logging.getLogger(__name__)


def topic_arn(config: PipelineConfig) -> str:
    """The configured topic, else ``deployline-<app>`` (create_topic is idempotent: it returns the existing one)."""
    if config.notification_topic_arn:
        return config.notification_topic_arn
    return aws.client(config, "sns").create_topic(Name=f"deployline-{config.application}")["TopicArn"]


def publish(config: PipelineConfig, subject: str, message: str) -> None:
    aws.client(config, "sns").publish(TopicArn=topic_arn(config), Subject=subject[:100], Message=message)


def topic_task(config: PipelineConfig):
    """A task that returns the topic ARN, for ``SnsPublishOperator(target_arn=...)``."""

    @task(task_id="notification_topic", retries=2)
    def notification_topic() -> str:
        return topic_arn(config)

    return notification_topic()


def links(config: PipelineConfig, run_id: str, version: str, gate: str) -> dict[str, str]:
    """Where a person looks: the pipeline run, the release record, a prefilled self-service launch."""
    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="http://localhost:8080").rstrip("/")
    return {
        "pipeline_run": f"{base}/dags/{config.pipeline_dag_id}/runs/{quote(run_id)}",
        "approval_run": f"{base}/dags/{config.application}_approve_{gate}/runs/{quote(run_id)}",
        "release_record": f"s3://{config.aws.artifact_bucket}/{config.application}/releases/{version}.json",
        "self_service": f"{base}/dags/{config.application}_self_service/trigger?version={quote(version)}",
    }


class PipelineFailureNotifier(BaseNotifier):
    """On a failed task: a message to the application's topic naming the run, the task and the error."""

    template_fields = ()

    def __init__(self, config: PipelineConfig):
        super().__init__()
        self.config = config

    def notify(self, context) -> None:
        ti = context["ti"]
        error = str(context.get("exception") or "")[-1500:]
        try:
            publish(self.config, f"{self.config.application}: {ti.task_id} failed",
                    f"Run {ti.run_id} of {ti.dag_id}: task {ti.task_id} failed (try {ti.try_number}).\n{error}")
        except Exception:  # a notification problem must not hide the failure itself
            log.exception("could not publish the failure of %s", ti.task_id)
