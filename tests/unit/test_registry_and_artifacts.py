import hashlib
from pathlib import Path

import pytest
from deployline import artifacts
from deployline.releases import ReleaseRegistry, make_version, revision_of

BUCKET = "artifacts-test"


def test_version_scheme():
    assert make_version(12, "0123456789abcdef") == "r12-0123456789"
    assert revision_of("r12-0123456789") == 12
    assert sorted(["r10-aaaaaaa", "r9-bbbbbbb"], key=revision_of) == ["r9-bbbbbbb", "r10-aaaaaaa"]
    with pytest.raises(ValueError, match="not a Deployline version: '../etc'"):
        revision_of("../etc")


def test_registry_records_merge_and_order(s3):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    registry.update("r9-aaaaaaa", commit={"sha": "a" * 40}, stages={"classify_change": {"result": "both"}})
    registry.update("r9-aaaaaaa", stages={"2-commit": {"result": "success"}})
    registry.update("r10-bbbbbbb", commit={"sha": "b" * 40})
    record = registry.get("r9-aaaaaaa")
    assert record["stages"] == {"classify_change": {"result": "both"}, "2-commit": {"result": "success"}}
    assert record["application"] == "shop" and record["updated_at"]
    assert registry.versions() == ["r9-aaaaaaa", "r10-bbbbbbb"]
    assert registry.get("r11-ccccccc") is None
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 2


def test_last_published_skips_records_without_artifact(s3):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    assert registry.last_published() is None
    registry.update("r1-aaaaaaa", artifact={"key": "k1"})
    registry.update("r2-bbbbbbb", classification={"kind": "none"})
    registry.update("r3-ccccccc", artifact={"key": "k3"})
    assert registry.last_published()["version"] == "r3-ccccccc"
    assert registry.last_published(before_revision=3)["version"] == "r1-aaaaaaa"


def build(tmp_path, content: bytes) -> Path:
    dist = tmp_path / "dist"
    dist.mkdir(exist_ok=True)
    (dist / "shop-1.tar.gz").write_bytes(content)
    return artifacts.find_distribution(tmp_path, "dist/*.tar.gz")


def test_publish_with_sha256_build_once_and_verify(s3, tmp_path):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    path = build(tmp_path, b"release bytes")
    artifact, uploaded = registry.publish("r1-aaaaaaa", path, tmp_path / "work")
    assert uploaded and artifact.key == "shop/artifacts/r1-aaaaaaa/shop-1.tar.gz" and artifact.version_id
    assert artifact.sha256 == artifacts.sha256_of(path)
    # The digest was claimed in the registry before the upload.
    assert registry.get("r1-aaaaaaa")["artifact_claim"]["sha256"] == artifact.sha256
    registry.update("r1-aaaaaaa", artifact=artifact.to_dict())

    build(tmp_path, b"a different build")
    again, uploaded = registry.publish("r1-aaaaaaa", path, tmp_path / "work")
    assert not uploaded and again == artifact  # build once: the first upload stays

    got = artifacts.download_verified(s3, artifact.to_dict(), tmp_path / "dl" / "a.tgz")
    assert got.read_bytes() == b"release bytes"
    # Replaced, metadata and all: later stages still get the recorded version, the first build.
    s3.put_object(Bucket=BUCKET, Key=artifact.key, Body=b"tampered", Metadata={"sha256": "f" * 64})
    got = artifacts.download_verified(s3, artifact.to_dict(), tmp_path / "dl" / "b.tgz")
    assert got.read_bytes() == b"release bytes"
    # Without the version (a record written before issue 17), the bytes are compared: refused.
    with pytest.raises(artifacts.ArtifactError, match="refusing a tampered or replaced artifact"):
        artifacts.download_verified(s3, artifact.to_dict() | {"version_id": None}, tmp_path / "dl" / "c.tgz")
    assert not (tmp_path / "dl" / "c.tgz").exists()


def test_a_planted_key_is_refused_naming_both_digests(s3, tmp_path):
    """Someone writes the key first, with metadata claiming the digest of a real build."""
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    path = build(tmp_path, b"the real build")
    key = artifacts.artifact_key("shop", "r1-aaaaaaa", path.name)
    forged = hashlib.sha256(b"forged").hexdigest()
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"forged", Metadata={"sha256": artifacts.sha256_of(path)})
    with pytest.raises(artifacts.ArtifactError) as err:
        registry.publish("r1-aaaaaaa", path, tmp_path / "work")
    assert f"s3://{BUCKET}/{key} is in the store already with sha256 {forged}" in str(err.value)
    assert "the release registry claims no build for it: refusing a planted or replaced artifact" in str(err.value)
    assert "artifact" not in (registry.get("r1-aaaaaaa") or {})


def test_an_upload_whose_record_was_lost_is_taken_only_if_it_is_the_claimed_build(s3, tmp_path):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    path = build(tmp_path, b"the first build")
    first, _ = registry.publish("r1-aaaaaaa", path, tmp_path / "work")  # then the task died: no `artifact`
    build(tmp_path, b"the retry's rebuild")
    again, uploaded = registry.publish("r1-aaaaaaa", path, tmp_path / "work")
    assert not uploaded and again.sha256 == first.sha256 and again.version_id == first.version_id
    # Replaced between the tries: the claim does not match what is there.
    s3.put_object(Bucket=BUCKET, Key=first.key, Body=b"swapped", Metadata={"sha256": first.sha256})
    with pytest.raises(artifacts.ArtifactError, match=f"but the release registry claims {first.sha256}"):
        registry.publish("r1-aaaaaaa", path, tmp_path / "work")


def test_a_deleted_version_is_refused(s3, tmp_path):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    artifact, _ = registry.publish("r1-aaaaaaa", build(tmp_path, b"bytes"), tmp_path / "work")
    registry.update("r1-aaaaaaa", artifact=artifact.to_dict())
    s3.delete_object(Bucket=BUCKET, Key=artifact.key, VersionId=artifact.version_id)
    with pytest.raises(artifacts.ArtifactError, match=f"version {artifact.version_id} of artifact"):
        artifacts.download_verified(s3, artifact.to_dict(), tmp_path / "dl" / "a.tgz")
    with pytest.raises(artifacts.ArtifactError, match="is not in the artifact store any more"):
        registry.publish("r1-aaaaaaa", build(tmp_path, b"bytes"), tmp_path / "work")


def test_a_bucket_without_versioning_is_refused(s3, tmp_path):
    s3.create_bucket(Bucket="plain")
    with pytest.raises(artifacts.ArtifactError, match="bucket 'plain' has versioning off: turn it on"):
        ReleaseRegistry(s3, "plain", "shop").publish("r1-aaaaaaa", build(tmp_path, b"x"), tmp_path / "work")


def test_distribution_glob_must_match_one_file(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match=r"artifact glob 'dist/\*.whl' matched no file"):
        artifacts.find_distribution(tmp_path, "dist/*.whl")
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "a.whl").write_text("a")
    (tmp_path / "dist" / "b.whl").write_text("b")
    with pytest.raises(artifacts.ArtifactError, match="matched 2 files, expected one: dist/a.whl, dist/b.whl"):
        artifacts.find_distribution(tmp_path, "dist/*.whl")


def test_stages_updating_one_record_at_once_lose_nothing(s3):
    """1-baking and 2-commit finish together and both update the record: no field may be lost."""
    from concurrent.futures import ThreadPoolExecutor

    registry = ReleaseRegistry(s3, BUCKET, "shop")
    fields = [{f"field_{n}": n, "stages": {f"stage-{n}": {"result": "success"}}} for n in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda f: registry.update("r1-abcdef0", **f), fields))
    record = registry.get("r1-abcdef0")
    assert {f"field_{n}" for n in range(12)} <= set(record)
    assert set(record["stages"]) == {f"stage-{n}" for n in range(12)}


def test_production_pointer_keeps_history(s3):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    assert registry.production() is None
    registry.set_production("r1-abcdef0", endpoint="http://a")
    live = registry.set_production("r2-bcdef01", endpoint="http://a")
    assert live["version"] == "r2-bcdef01" and [h["version"] for h in live["history"]] == ["r1-abcdef0"]
    assert registry.production()["version"] == "r2-bcdef01"


def test_a_stage_keeps_its_start_time_for_the_same_run(s3):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    first = registry.stage_started("r4-abcdef1234", "2-commit", "run-1")["stages"]["2-commit"]
    assert first["result"] == "running" and first["run_id"] == "run-1"
    # A second first task of the same stage and run keeps the start.
    assert registry.stage_started("r4-abcdef1234", "2-commit", "run-1")["stages"]["2-commit"] == first
    done = registry.update("r4-abcdef1234", stages={"2-commit": {"result": "success", "run_id": "run-1",
                                                                 "finished_at": "2026-11-27T10:00:00+00:00"}})
    assert done["stages"]["2-commit"] == {"result": "success", "run_id": "run-1", "started_at": first["started_at"],
                                          "finished_at": "2026-11-27T10:00:00+00:00"}
    # Another run's result does not borrow this run's start; a new run starts afresh.
    other = registry.update("r4-abcdef1234", stages={"2-commit": {"result": "failed", "run_id": "run-2"}})
    assert "started_at" not in other["stages"]["2-commit"]
    again = registry.stage_started("r4-abcdef1234", "2-commit", "run-3")["stages"]["2-commit"]
    assert again["run_id"] == "run-3" and again["result"] == "running"


def test_production_attempts_are_appended(s3):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    registry.add_deployment("r5-abcdef1234", {"result": "rolled_back", "at": "t1"}, rollback={"phase": "verify"})
    record = registry.add_deployment("r5-abcdef1234", {"result": "deployed", "at": "t2"})
    assert [d["result"] for d in record["deployments"]] == ["rolled_back", "deployed"]
    assert record["rollback"] == {"phase": "verify"}


def test_a_stage_that_skips_after_starting_is_closed_as_skipped(s3):
    registry = ReleaseRegistry(s3, BUCKET, "shop")
    registry.stage_started("r8-abcdef1234", "3-acceptance", "run-1")
    # Another run's skip, or a stage already finished, is left alone.
    registry.stage_skipped("r8-abcdef1234", "3-acceptance", "run-0", "nothing to do")
    assert registry.get("r8-abcdef1234")["stages"]["3-acceptance"]["result"] == "running"
    record = registry.stage_skipped("r8-abcdef1234", "3-acceptance", "run-1", "nothing was built")
    entry = record["stages"]["3-acceptance"]
    assert (entry["result"], entry["reason"], entry["run_id"]) == ("skipped", "nothing was built", "run-1")
    assert entry["started_at"] <= entry["finished_at"]
