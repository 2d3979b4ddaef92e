import pytest
from deployline.sources import GitError, GitSource, UnknownCommit, redact
from gitrepo import Repo, git


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYLINE_WORK_DIR", str(tmp_path / "work"))
    return Repo(tmp_path / "repo")


def test_head_without_cloning(repo, tmp_path):
    sha = repo.commit({"app.py": "print(1)\n"}, "first")
    source = GitSource(str(repo.bare), "main")
    assert source.head() == sha
    assert not source.mirror_path.exists()  # a ref listing, no clone


def test_history_questions(repo):
    first = repo.commit({"app.py": "1\n", "infrastructure/provision.sh": "echo\n"}, "first")
    second = repo.commit({"app.py": "2\n"}, "second")
    third = repo.commit({"infrastructure/provision.sh": "echo hi\n", "docs/x.md": "x\n"}, "third")
    source = GitSource(str(repo.bare), "main")
    assert source.changed_paths(first, third) == ["app.py", "docs/x.md", "infrastructure/provision.sh"]
    assert source.changed_paths(None, first) == ["app.py", "infrastructure/provision.sh"]
    assert [c.sha for c in source.commits_between(first, third)] == [third, second]
    assert source.revision_number(first) == 1 and source.revision_number(third) == 3
    assert source.is_ancestor(first, third) and not source.is_ancestor(third, first)
    commit = source.resolve(second[:8])
    assert commit.sha == second and commit.message == "second" and commit.author == "Test Author"
    assert commit.committed_at[:2] == "20"


def test_empty_commit_changes_nothing(repo):
    first = repo.commit({"app.py": "1\n"})
    empty = repo.commit({}, "empty", allow_empty=True)
    assert GitSource(str(repo.bare), "main").changed_paths(first, empty) == []


def test_checkout_is_clean(repo, tmp_path):
    first = repo.commit({"app.py": "1\n"})
    repo.commit({"app.py": "2\n", "new.py": "x\n"})
    dest = tmp_path / "checkout"
    dest.mkdir()
    (dest / "leftover").write_text("from an earlier try")
    GitSource(str(repo.bare), "main").checkout(first, dest)
    assert (dest / "app.py").read_text() == "1\n"
    assert not (dest / "new.py").exists() and not (dest / "leftover").exists()
    assert git("status", "--porcelain", cwd=dest) == ""


def test_unknown_commit_and_branch(repo):
    repo.commit({"app.py": "1\n"})
    source = GitSource(str(repo.bare), "main")
    # UnknownCommit: resolve_commit fails at once, without retries (asking again cannot help).
    with pytest.raises(UnknownCommit, match=f"commit 'deadbeef' not found in repository {repo.bare}"):
        source.resolve("deadbeef")
    with pytest.raises(UnknownCommit, match="not a commit sha: 'main; rm -rf /'"):
        source.resolve("main; rm -rf /")
    with pytest.raises(GitError, match=f"branch 'release' not found in repository {repo.bare}"):
        GitSource(str(repo.bare), "release").head()


def test_unreachable_repository_names_the_url_without_credentials(monkeypatch):
    source = GitSource("https://deploy:s3cr3t-token@127.0.0.1:9/team/app.git", "main", timeout=20)
    with pytest.raises(GitError) as err:
        source.head()
    message = str(err.value)
    assert "git ls-remote failed for repository https://***@127.0.0.1:9/team/app.git" in message
    assert "s3cr3t" not in message


def test_credentials_from_a_connection_are_sent_but_never_shown():
    source = GitSource("https://127.0.0.1:9/team/app.git", "main", username="bot", password="tok-123", timeout=20)
    assert "tok-123" not in " ".join(source._auth_env.get("GIT_CONFIG_KEY_0", ""))
    assert source._auth_env["GIT_CONFIG_VALUE_0"].startswith("Authorization: Basic ")
    with pytest.raises(GitError) as err:
        source.head()
    assert "tok-123" not in str(err.value)
    assert source._auth_env["GIT_CONFIG_VALUE_0"].split()[-1] not in str(err.value)


def test_redact():
    assert redact("clone https://u:p@host/x.git and ssh://git@h/y") == "clone https://***@host/x.git and ssh://***@h/y"
    assert redact("/srv/git/x.git") == "/srv/git/x.git"


def test_a_git_revert_names_the_commit_it_reverts(repo):
    bad = repo.commit({"app.py": "broken\n"}, "Break the cart")
    git("revert", "--no-edit", bad, cwd=repo.work)
    git("push", "--quiet", "origin", "HEAD:main", cwd=repo.work)
    source = GitSource(str(repo.bare), "main")
    revert, original = source.commits_between(None, git("rev-parse", "HEAD", cwd=repo.work))
    assert revert.message == 'Revert "Break the cart"' and revert.reverts == (bad,)
    assert original.reverts == () and revert.to_dict()["reverts"] == [bad]


def test_only_commits_the_branch_reaches_are_on_it(repo):
    first = repo.commit({"app.py": "1\n"}, "first")
    git("checkout", "--quiet", "-b", "feature", cwd=repo.work)
    git("commit", "--quiet", "--allow-empty", "-m", "side", cwd=repo.work)
    side = git("rev-parse", "HEAD", cwd=repo.work)
    git("push", "--quiet", "origin", "feature", cwd=repo.work)
    source = GitSource(str(repo.bare), "main")
    assert source.on_branch(first) and not source.on_branch(side)
    git("checkout", "--quiet", "main", cwd=repo.work)
    git("merge", "--quiet", "--no-edit", "feature", cwd=repo.work)
    git("push", "--quiet", "origin", "main", cwd=repo.work)
    assert source.on_branch(side)  # merged: the branch reaches it now
