
"""2-commit's workspaces in S3: any worker restores the very build, checked by its sha256 (issue 16)."""

import dataclasses
import os

import pytest
from deployline import workspace_store
from deployline.workdirs import safe_name, workspace
from deployline.workspace_store import Snapshot, WorkspaceError

BUCKET = "ws-bucket"
KEY = "shop/workspaces/commit__abc/build.tar.gz"


def make_tree(folder):
    (folder / "src" / "pkg").mkdir(parents=True)
    (folder / "src" / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (folder / "dist").mkdir()
    (folder / "dist" / "shop-1.tar.gz").write_bytes(b"\x1f\x8b built bytes")
    (folder / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(folder / "run.sh", 0o755)
    (folder / ".git").mkdir()
    (folder / ".git" / "objects").write_text("the worker's own mirror")
    (folder / "src" / "pkg" / "__pycache__").mkdir()
    (folder / "src" / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"cache")
    return folder


def test_a_stored_workspace_is_restored_elsewhere_byte_for_byte(s3, tmp_path):
    built = make_tree(tmp_path / "worker-a" / "build")
    snapshot = workspace_store.store(s3, BUCKET, KEY, built)
    assert snapshot.size > 0 and len(snapshot.sha256) == 64
    # The digest is of the bytes packed on this worker, not what S3 says.
    assert workspace_store.store(s3, BUCKET, KEY + ".2", built).sha256 == snapshot.sha256  # reproducible

    other = workspace_store.restore(s3, snapshot.to_dict(), tmp_path / "worker-b" / "unit_test")
    assert (other / "dist" / "shop-1.tar.gz").read_bytes() == b"\x1f\x8b built bytes"
    assert (other / "src" / "pkg" / "__init__.py").read_text() == "VALUE = 1\n"
    assert os.access(other / "run.sh", os.X_OK)
    assert not (other / ".git").exists() and not (other / "src" / "pkg" / "__pycache__").exists()


def test_a_replaced_workspace_is_refused_naming_both_digests(s3, tmp_path):
    snapshot = workspace_store.store(s3, BUCKET, KEY, make_tree(tmp_path / "build"))
    forged = make_tree(tmp_path / "forged")
    (forged / "dist" / "shop-1.tar.gz").write_bytes(b"something else")
    workspace_store.store(s3, BUCKET, KEY, forged)  # the same key, other bytes
    unversioned = dataclasses.replace(snapshot, version_id=None)  # as a bucket without versioning gives it
    with pytest.raises(WorkspaceError) as refused:
        workspace_store.restore(s3, unversioned, tmp_path / "test")
    assert snapshot.sha256 in str(refused.value) and "found" in str(refused.value) and KEY in str(refused.value)


def test_a_versioned_bucket_gives_back_the_stored_version(s3, tmp_path):
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    snapshot = workspace_store.store(s3, BUCKET, KEY, make_tree(tmp_path / "build"))
    assert snapshot.version_id
    forged = make_tree(tmp_path / "forged")
    (forged / "run.sh").write_text("#!/bin/sh\nexfiltrate\n")
    workspace_store.store(s3, BUCKET, KEY, forged)
    restored = workspace_store.restore(s3, snapshot, tmp_path / "test")
    assert "echo hi" in (restored / "run.sh").read_text()


def test_a_deleted_workspace_says_what_to_do_and_delete_run_removes_every_version(s3, tmp_path):
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    tree = make_tree(tmp_path / "build")
    source = workspace_store.store(s3, BUCKET, "shop/workspaces/commit__abc/source.tar.gz", tree)
    build = workspace_store.store(s3, BUCKET, KEY, tree)
    workspace_store.store(s3, BUCKET, KEY, tree)  # a retried build: a second version
    other_run = workspace_store.store(s3, BUCKET, "shop/workspaces/commit__def/build.tar.gz", tree)
    assert workspace_store.delete_run(s3, BUCKET, "shop", "commit__abc") == 3
    assert s3.list_object_versions(Bucket=BUCKET, Prefix="shop/workspaces/commit__abc/").get("Versions") is None
    for gone in (source, build):
        with pytest.raises(WorkspaceError, match="could not be downloaded.*clean_workspace"):
            workspace_store.restore(s3, gone, tmp_path / "test")
    workspace_store.restore(s3, other_run, tmp_path / "other")  # another run's is untouched


def test_an_unversioned_bucket_is_cleaned_too(s3, tmp_path):
    workspace_store.store(s3, BUCKET, KEY, make_tree(tmp_path / "build"))
    assert workspace_store.delete_run(s3, BUCKET, "shop", "commit__abc") == 1
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_an_archive_with_a_path_out_of_the_workspace_is_not_unpacked(s3, tmp_path):
    import io
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=data.getvalue())
    from deployline.artifacts import sha256_of

    (tmp_path / "a.tgz").write_bytes(data.getvalue())
    snapshot = Snapshot(BUCKET, KEY, sha256_of(tmp_path / "a.tgz"), len(data.getvalue()))
    with pytest.raises(tarfile.OutsideDestinationError):
        workspace_store.restore(s3, snapshot, tmp_path / "deep" / "ws")
    assert not (tmp_path / "escaped.txt").exists()


def test_run_ids_that_differ_never_share_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("DEPLOYLINE_WORK_DIR", str(tmp_path))
    names = ["commit:_x", "commit__x", "commit/_x", "manual__2026-01-01T00:00:00+00:00", "..", "."]
    folders = {workspace("shop", name) for name in names}
    assert len(folders) == len(names)
    assert all(f.parent == tmp_path / "workspaces" / "shop" for f in folders)
    assert safe_name("commit__x") == "commit__x"  # a name that is already safe stays readable
    assert safe_name("commit:_x").startswith("commit__x-")
