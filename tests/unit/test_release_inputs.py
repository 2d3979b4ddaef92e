"""Which base image and artifact a version is tested with (acceptance's select_inputs)."""

import boto3
import pytest
from deployline.acceptance_stage import select_release_inputs
from deployline.releases import ReleaseRegistry
from moto import mock_aws


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="bkt")
        s3.put_bucket_versioning(Bucket="bkt", VersioningConfiguration={"Status": "Enabled"})
        yield ReleaseRegistry(s3, "bkt", "shop")


def commit(revision):
    return {"version": f"r{revision}-{revision:07d}", "revision": revision}


def art(version):
    return {"uri": f"s3://b/shop/artifacts/{version}/x.tgz", "sha256": version}


def test_first_release_uses_what_it_baked_and_built(registry):
    registry.update("r1-0000001", base_image={"id": "ami-1", "baked": True}, artifact=art("r1"),
                    artifact_version="r1-0000001")
    inputs = select_release_inputs(registry, commit(1))
    assert inputs == {"base_image": {"id": "ami-1", "baked": True}, "artifact": art("r1"),
                      "artifact_version": "r1-0000001"}


def test_infrastructure_only_reuses_the_last_artifact(registry):
    registry.update("r1-0000001", base_image={"id": "ami-1", "baked": True}, artifact=art("r1"), candidate={"x": 1})
    registry.update("r2-0000002", base_image={"id": "ami-2", "baked": True})
    inputs = select_release_inputs(registry, commit(2))
    assert inputs["base_image"]["id"] == "ami-2"
    assert inputs["artifact"] == art("r1") and inputs["artifact_version"] == "r1-0000001"


def test_application_only_reuses_the_base_image_of_the_last_candidate(registry):
    registry.update("r1-0000001", base_image={"id": "ami-1", "baked": True}, artifact=art("r1"), candidate={"x": 1})
    # r2 baked an image but failed acceptance: not "good" while a candidate's image exists
    registry.update("r2-0000002", base_image={"id": "ami-2", "baked": True})
    registry.update("r3-0000003", artifact=art("r3"))
    inputs = select_release_inputs(registry, commit(3))
    assert inputs["base_image"]["id"] == "ami-1"
    assert inputs["artifact"] == art("r3") and inputs["artifact_version"] == "r3-0000003"


def test_without_a_candidate_the_newest_baked_image_is_used(registry):
    registry.update("r1-0000001", base_image={"id": "ami-1", "baked": True}, artifact=art("r1"))
    registry.update("r2-0000002", base_image={"id": "ami-1", "baked": False})  # a reuse is not a bake
    registry.update("r3-0000003", artifact=art("r3"))
    assert registry.last_good_base_image(before_revision=3)["id"] == "ami-1"


def test_nothing_to_test_with_is_a_clear_error(registry):
    registry.update("r1-0000001", artifact=art("r1"))
    with pytest.raises(RuntimeError, match="no base image for r1-0000001: nothing was baked or built before it"):
        select_release_inputs(registry, commit(1))
    with pytest.raises(RuntimeError, match="no base image and no artifact for r5-0000005"):
        select_release_inputs(ReleaseRegistry(registry.s3_client, "bkt", "other"), commit(5))
