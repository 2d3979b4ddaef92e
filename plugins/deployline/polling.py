"""``<app>_commit_poll``: look at the branch on a schedule, start one pipeline run per new commit."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, chain

from deployline.config import PipelineConfig
from deployline.dag_defaults import START_DATE, default_args
from deployline.sensors import GitCommitSensor
from deployline.sources import redact

DOC = """\
## {app}: commit polling

On schedule `{schedule}`, `wait_for_commit` lists the head of `{branch}` in `{url}`
(`git ls-remote`, no clone) every {poke}s for up to {timeout}s.  When the head has no
`{pipeline}` run yet, `trigger_pipeline` starts one with run id `commit__<short sha>`
and the commit in its conf; when several commits arrived since the last poll, the
newest is built and its run records all of them.  A run id per commit means
overlapping or retried polls never start a commit twice.  No new commit: the poll
ends as skipped.  An unreachable repository: the poll retries, then fails naming the URL.
"""

_FOUND = "ti.xcom_pull(task_ids='wait_for_commit')"



class TriggerPipelineOperator(TriggerDagRunOperator):
    """``TriggerDagRunOperator`` whose run ``note`` is a template too (the commit it was polled for):
    the provider's is not, and the UI showed the raw template in every polled run's header."""

    template_fields: Sequence[str] = (*TriggerDagRunOperator.template_fields, "note")

def build_poll_dag(config: PipelineConfig) -> DAG:
    polling = config.polling
    with DAG(
        dag_id=config.poll_dag_id,
        description=f"Polls {redact(config.repository.url)} for new commits of {config.application}",
        schedule=polling.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=default_args(retries=2, retry_delay=timedelta(seconds=15)),
        tags=["deployline", config.application],
        doc_md=DOC.format(
            app=config.application,
            schedule=polling.schedule or "none (trigger it by hand)",
            branch=config.repository.branch,
            url=redact(config.repository.url),
            poke=polling.poke_interval,
            timeout=polling.timeout,
            pipeline=config.pipeline_dag_id,
        ),
    ) as dag:
        found = GitCommitSensor(
            task_id="wait_for_commit",
            url=config.repository.url,
            branch=config.repository.branch,
            git_conn_id=config.repository.conn_id,
            pipeline_dag_id=config.pipeline_dag_id,
            poke_interval=polling.poke_interval,
            timeout=polling.timeout,
            soft_fail=True,
        )
        trigger = TriggerPipelineOperator(
            task_id="trigger_pipeline",
            trigger_dag_id=config.pipeline_dag_id,
            trigger_run_id="{{ " + _FOUND + "['run_id'] }}",
            conf={"commit": "{{ " + _FOUND + "['commit'] }}", "source": "{{ dag_run.run_id }}"},
            note="polled commit {{ " + _FOUND + "['commit'][:10] }} of " + config.repository.branch,
            # The run id is per commit: a commit already started is not started again.
            skip_when_already_exists=True,
        )
        chain(found, trigger)
    return dag
