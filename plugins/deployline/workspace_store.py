"""Workspaces in S3, so that any worker can run any task of ``2-commit``.

``checkout`` packs the commit's tree, ``build`` packs the workspace it built in; each is stored
under the run (``<app>/workspaces/<run>/<name>.tar.gz``) and its sha256, size and object version
travel in XCom, which is Airflow's record, not the bucket's. ``unit_test``, ``static_analysis``
and ``publish_artifact`` restore the very build on whatever worker they run on, after checking
that what they downloaded is what ``build`` stored. ``clean_workspace`` deletes the run's
snapshots. No task reads a folder another task wrote.

The snapshots hold the working tree, not ``.git`` (a checkout shares its objects with the
worker's git mirror); builds get the commit from ``DEPLOYLINE_COMMIT``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from deployline.artifacts import sha256_of

EXCLUDED = frozenset({".git", "__pycache__", ".pytest_cache", ".ruff_cache"})


class WorkspaceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Snapshot:
    bucket: str
    key: str
    sha256: str
    size: int
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Snapshot:
        try:
            return cls(**{k: data[k] for k in ("bucket", "key", "sha256", "size")}, version_id=data.get("version_id"))
        except (KeyError, TypeError) as exc:
            raise WorkspaceError(f"not a workspace snapshot: {data!r}") from exc


def run_prefix(application: str, run_folder: str) -> str:
    return f"{application}/workspaces/{run_folder}/"


def pack(folder: Path, dest: Path) -> Path:
    """``folder`` as a tar.gz at ``dest``: sorted entries, no owners or times, no ``.git`` or caches."""
    folder = Path(folder)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDED)
            base = Path(root)
            for name in sorted(dirs) + sorted(files):
                path = base / name
                arcname = str(path.relative_to(folder))
                if path.is_symlink() or path.is_file() or path.is_dir():
                    tar.add(path, arcname=arcname, recursive=False, filter=clean)
    return dest


def store(s3, bucket: str, key: str, folder: Path) -> Snapshot:
    """Pack ``folder`` and upload it to ``s3://bucket/key``; the snapshot's digest comes from
    the bytes packed here, never from the bucket."""
    with tempfile.TemporaryDirectory(prefix="deployline-pack-") as tmp:
        archive = pack(folder, Path(tmp) / "workspace.tar.gz")
        digest, size = sha256_of(archive), archive.stat().st_size
        with open(archive, "rb") as body:
            answer = s3.put_object(Bucket=bucket, Key=key, Body=body, ChecksumSHA256=_b64(digest))
    return Snapshot(bucket, key, digest, size, answer.get("VersionId"))


def restore(s3, snapshot: Snapshot | dict, dest: Path) -> Path:
    """Download ``snapshot`` (its object version when the bucket keeps versions), check its sha256
    and unpack it into ``dest`` (emptied first). A replaced or missing object is refused with an
    error that names the expected and the found digest."""
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.from_dict(snapshot)
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="deployline-restore-") as tmp:
        archive = Path(tmp) / "workspace.tar.gz"
        kwargs = {"VersionId": snap.version_id} if snap.version_id else {}
        try:
            s3.download_file(snap.bucket, snap.key, str(archive), ExtraArgs=kwargs or None)
        except Exception as exc:  # botocore's ClientError, or a 404 from download_file's HEAD
            raise WorkspaceError(f"workspace {snap.uri} (sha256 {snap.sha256}) could not be downloaded: {exc}. "
                                 "Was it removed by clean_workspace of this run? Clear the run's 2-commit "
                                 "from checkout to start it again.") from exc
        found = sha256_of(archive)
        if found != snap.sha256:
            raise WorkspaceError(f"workspace {snap.uri} was changed after it was stored: expected sha256 "
                                 f"{snap.sha256}, found {found}; refusing to use it")
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter="data")  # no absolute paths, no links out of dest
    return dest


def delete_run(s3, bucket: str, application: str, run_folder: str) -> int:
    """Delete every snapshot of one run (every version of each); returns how many objects went."""
    prefix, deleted = run_prefix(application, run_folder), 0
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        items = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                 for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if items:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": items, "Quiet": True})
            deleted += len(items)
    return deleted


def _b64(hex_digest: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(hex_digest)).decode()
