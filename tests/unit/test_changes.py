"""Classifying a change: by path, and against what the commit would reuse (describe_change)."""

import boto3
import pytest
from deployline.changes import classify, describe_change
from deployline.releases import ReleaseRegistry, make_version, stopped_because
from deployline.sources import GitSource
from gitrepo import Repo
from moto import mock_aws

GLOBS = ["infrastructure/**", "*.pkr.hcl"]


def test_application_only():
    result = classify(["src/app.py", "README.md"], GLOBS)
    assert result.kind == "application" and result.build and not result.bake


def test_infrastructure_only():
    result = classify(["infrastructure/provision.sh", "images/base.pkr.hcl"], GLOBS)
    assert result.kind == "infrastructure" and result.bake and not result.build
    assert result.infrastructure_paths == ["infrastructure/provision.sh", "images/base.pkr.hcl"]


def test_both():
    result = classify(["infrastructure/provision.sh", "src/app.py"], GLOBS)
    assert result.kind == "both" and result.bake and result.build
    assert result.application_paths == ["src/app.py"]


def test_nothing_changed():
    result = classify([], GLOBS)
    assert result.kind == "none" and not result.bake and not result.build


def test_globs_are_anchored_like_gitignore():
    # "infrastructure/**" is the top-level folder only when written with a leading slash
    assert classify(["src/infrastructure/x.py"], ["/infrastructure/**"]).kind == "application"
    assert classify(["infrastructure/x.py"], ["/infrastructure/**"]).kind == "infrastructure"


# ------------------------------------------ describe_change: against what the commit would reuse
# Real git, a registry in moto (issue 18: a rejected base image was released by a later commit).


INFRA = ["infrastructure/**"]


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYLINE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="bkt")
        yield Repo(tmp_path / "repo"), ReleaseRegistry(s3, "bkt", "shop")


def released(repo, registry, files, message, revision, *, baked=False, candidate=True, **fields):
    """Commit ``files`` and write the record a run of it would leave."""
    sha = repo.commit(files, message)
    version = make_version(revision, sha)
    record = {"commit": {"sha": sha}, "artifact": {"uri": f"s3://bkt/{version}.tgz"}, **fields}
    if baked:
        record["base_image"] = {"id": f"ami-{revision}", "baked": True, "version": version, "commit": sha}
    if candidate:
        record["candidate"] = {"artifact": record["artifact"]}
    registry.update(version, **record)
    return {"sha": sha, "revision": revision, "version": version}


def test_an_application_only_commit_after_a_good_image_reuses_it(world):
    repo, registry = world
    released(repo, registry, {"app.py": "1\n", "infrastructure/provision.sh": "a\n"}, "first", 1, baked=True)
    sha = repo.commit({"README.md": "docs\n"}, "readme")
    change = describe_change(GitSource(str(repo.bare), "main"), registry, {"sha": sha, "revision": 2}, INFRA)
    assert change.classification.kind == "application"
    assert [c.message for c in change.included] == ["readme"]


def test_an_image_rejected_at_exploratory_is_baked_again_and_its_change_is_released(world):
    repo, registry = world
    good = released(repo, registry, {"app.py": "1\n", "infrastructure/provision.sh": "a\n"}, "first", 1, baked=True)
    rejected = released(repo, registry, {"infrastructure/provision.sh": "b\n"}, "new provisioning", 2, baked=True,
                        approvals={"exploratory": {"decision": "rejected", "by": "qa"}})
    assert stopped_because(registry.get(rejected["version"])) == "exploratory approval rejected"
    sha = repo.commit({"README.md": "docs\n"}, "readme")
    change = describe_change(GitSource(str(repo.bare), "main"), registry, {"sha": sha, "revision": 3}, INFRA)

    # The rejected image is not reused: the commit bakes again, and releases the provisioning change.
    assert change.classification.bake and change.classification.infrastructure_paths == ["infrastructure/provision.sh"]
    assert change.image_version == good["version"]
    assert registry.last_good_base_image(before_revision=3)["id"] == "ami-1"
    assert [c.message for c in change.included] == ["readme", "new provisioning"]
    # Its build is not reused either: r2's own build was part of the rejected release.
    assert change.previous_version == good["version"]


def test_a_later_candidate_that_reused_a_rejected_image_does_not_make_it_usable(world):
    repo, registry = world
    released(repo, registry, {"app.py": "1\n", "infrastructure/provision.sh": "a\n"}, "first", 1, baked=True)
    bad = released(repo, registry, {"infrastructure/provision.sh": "b\n"}, "bad image", 2, baked=True,
                   stages={"6-capacity": {"result": "failed"}})
    # r3 went through acceptance on r2's image before r2 failed capacity.
    released(repo, registry, {"app.py": "2\n"}, "app", 3,
             base_image={"id": "ami-2", "baked": False, "version": bad["version"], "commit": bad["sha"]})
    assert registry.last_good_base_image(before_revision=4)["id"] == "ami-1"


def test_a_rolled_back_or_failed_version_is_never_reused(world):
    repo, registry = world
    released(repo, registry, {"app.py": "1\n", "infrastructure/provision.sh": "a\n"}, "first", 1, baked=True)
    rolled = released(repo, registry, {"app.py": "2\n"}, "broken app", 2, production={"result": "rolled_back"})
    assert stopped_because(registry.get(rolled["version"])) == "rolled back in production"
    sha = repo.commit({"infrastructure/provision.sh": "c\n"}, "infra only")
    change = describe_change(GitSource(str(repo.bare), "main"), registry, {"sha": sha, "revision": 3}, INFRA)
    # An infrastructure-only commit would have reused r2's build: it builds again instead.
    assert change.classification.kind == "both" and change.classification.application_paths == ["app.py"]
    assert registry.last_published(before_revision=3)["version"].startswith("r1-")


def test_the_first_commit_bakes_and_builds(world):
    repo, registry = world
    sha = repo.commit({"app.py": "1\n"}, "first")
    change = describe_change(GitSource(str(repo.bare), "main"), registry, {"sha": sha, "revision": 1}, INFRA)
    assert change.classification.kind == "both" and change.previous_version is None


def test_stopped_because_names_the_reason():
    assert stopped_because({}) is None
    assert stopped_because({"stages": {"3-acceptance": {"result": "success"}}}) is None
    # Nobody decided in time: no verdict on the build (the run stops, the version stays usable).
    assert stopped_because({"approvals": {"production": {"decision": "timed_out"}},
                            "stages": {"8-production": {"result": "failed"}}}) is None
    assert stopped_because({"approvals": {"production": {"decision": "rejected"}}}) == "production approval rejected"
    assert stopped_because({"approvals": {"exploratory": {"decision": "approved", "refused": "x"}}}) \
        == "exploratory approval refused"
    assert stopped_because({"stages": {"2-commit": {"result": "failed"}}}) == "2-commit failed"


def test_a_bake_lists_only_the_commits_since_the_last_usable_build(world):
    """Baking against an older image adds no commit that a usable release already had."""
    repo, registry = world
    first = released(repo, registry, {"app.py": "1\n", "infrastructure/provision.sh": "a\n"}, "first", 1,
                     baked=True)
    image = registry.get(first["version"])["base_image"]
    released(repo, registry, {"app.py": "2\n"}, "app two", 2, base_image=image | {"baked": False})
    released(repo, registry, {"app.py": "3\n"}, "app three", 3, base_image=image | {"baked": False})
    sha = repo.commit({"infrastructure/provision.sh": "b\n"}, "tune provisioning")
    change = describe_change(GitSource(str(repo.bare), "main"), registry, {"sha": sha, "revision": 4}, INFRA)
    assert change.classification.kind == "infrastructure"
    assert [c.message for c in change.included] == ["tune provisioning"]


def test_paths_of_one_commit_including_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYLINE_WORK_DIR", str(tmp_path / "work"))
    repo = Repo(tmp_path / "repo")
    root = repo.commit({"app.py": "1\n", "infrastructure/provision.sh": "a\n"}, "first")
    second = repo.commit({"app.py": "2\n", "README.md": "x\n"}, "second")
    source = GitSource(str(repo.bare), "main")
    assert source.paths_of(root) == ["app.py", "infrastructure/provision.sh"]
    assert source.paths_of(second) == ["README.md", "app.py"]
