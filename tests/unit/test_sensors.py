import pytest
from deployline.sensors import GitCommitSensor, pipeline_run_id
from deployline.sources import GitError
from gitrepo import Repo


class FakeTaskInstance:
    """Answers get_dr_count from a set of existing pipeline run ids, as the API server would."""

    def __init__(self, existing_run_ids=()):
        self.existing = set(existing_run_ids)
        self.asked = []

    def get_dr_count(self, dag_id, run_ids=None, **_):
        self.asked.append((dag_id, tuple(run_ids)))
        return sum(1 for r in run_ids if r in self.existing)


def sensor(url, branch="main"):
    return GitCommitSensor(task_id="wait_for_commit", url=url, branch=branch, pipeline_dag_id="shop_pipeline",
                           poke_interval=1, timeout=5)


def test_a_new_commit_is_found_once(tmp_path):
    repo = Repo(tmp_path)
    sha = repo.commit({"a.py": "1\n"})
    ti = FakeTaskInstance()
    found = sensor(str(repo.bare)).poke({"ti": ti})
    assert found.is_done and found.xcom_value == {"commit": sha, "run_id": f"commit__{sha[:10]}"}
    assert ti.asked == [("shop_pipeline", (pipeline_run_id(sha),))]
    # Once the pipeline has a run for that commit, polling finds nothing new.
    assert sensor(str(repo.bare)).poke({"ti": FakeTaskInstance([pipeline_run_id(sha)])}) is False


def test_newest_commit_wins(tmp_path):
    repo = Repo(tmp_path)
    repo.commit({"a.py": "1\n"})
    newest = repo.commit({"a.py": "2\n"})
    assert sensor(str(repo.bare)).poke({"ti": FakeTaskInstance()}).xcom_value["commit"] == newest


def test_unreachable_repository_fails_the_poke_naming_the_url(tmp_path):
    missing = tmp_path / "gone.git"
    with pytest.raises(GitError, match=f"git ls-remote failed for repository {missing}"):
        sensor(str(missing)).poke({"ti": FakeTaskInstance()})


def test_reschedule_mode_by_default():
    assert sensor("/x").mode == "reschedule"
