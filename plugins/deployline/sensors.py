"""Sensors: a new commit on a branch."""

from __future__ import annotations

from collections.abc import Sequence

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from deployline.sources import GitSource


def pipeline_run_id(sha: str) -> str:
    """The pipeline run for a polled commit: one per commit, so a second trigger is a no-op."""
    return f"commit__{sha[:10]}"


class GitCommitSensor(BaseSensorOperator):
    """Waits until the branch head is a commit that has no ``pipeline_dag_id`` run yet.

    One ``git ls-remote`` per poke, no clone.  Whether a commit is new is derived from
    the pipeline's run ids (``commit__<short sha>``), so overlapping or retried polls
    cannot start a commit twice.  Pushes ``{"commit", "run_id"}`` to XCom.
    """

    template_fields: Sequence[str] = ("url", "branch")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        url: str,
        branch: str,
        pipeline_dag_id: str,
        git_conn_id: str | None = None,
        mode: str = "reschedule",
        **kwargs,
    ):
        super().__init__(mode=mode, **kwargs)
        self.url = url
        self.branch = branch
        self.git_conn_id = git_conn_id
        self.pipeline_dag_id = pipeline_dag_id

    def poke(self, context) -> bool | PokeReturnValue:
        source = GitSource.connect(self.url, self.branch, self.git_conn_id)
        sha = source.head()
        run_id = pipeline_run_id(sha)
        if context["ti"].get_dr_count(dag_id=self.pipeline_dag_id, run_ids=[run_id]):
            self.log.info("%s@%s is at %s, already built by run %s", source.display_url, self.branch, sha[:10], run_id)
            return False
        self.log.info("new commit %s on %s@%s", sha, source.display_url, self.branch)
        return PokeReturnValue(is_done=True, xcom_value={"commit": sha, "run_id": run_id})
