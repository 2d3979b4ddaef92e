"""The artifact store: the built distribution in S3 with its sha256, built once, verified on use."""

from __future__ import annotations

import glob as _glob
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


class ArtifactError(RuntimeError):
    pass


class MissingBucketError(ArtifactError):
    """The artifact bucket (the pipeline config's ``aws.artifact_bucket``) does not exist."""


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


@contextmanager
def bucket_must_exist(bucket: str, source: str = ""):
    """Turn S3's ``NoSuchBucket`` into an error that names the bucket and the config field."""
    try:
        yield
    except ClientError as exc:
        if _code(exc) != "NoSuchBucket":
            raise
        where = f"{source}: " if source else ""
        raise MissingBucketError(
            f"{where}aws.artifact_bucket: bucket {bucket!r} does not exist (S3 answered NoSuchBucket): "
            "correct the field, or create the bucket (stage 0: support_infrastructure, component artifact_store)"
        ) from exc


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_distribution(folder: Path, pattern: str) -> Path:
    """The one file ``pattern`` matches under ``folder``; anything else is an error naming the glob."""
    matches = sorted(Path(p) for p in _glob.glob(str(folder / pattern), recursive=True) if Path(p).is_file())
    if not matches:
        raise ArtifactError(
            f"commit_stage.artifact glob {pattern!r} matched no file in {folder} (did the build write it?)")
    if len(matches) > 1:
        names = ", ".join(str(m.relative_to(folder)) for m in matches)
        raise ArtifactError(
            f"commit_stage.artifact glob {pattern!r} matched {len(matches)} files, expected one: {names}")
    return matches[0]


@dataclass(frozen=True)
class Artifact:
    bucket: str
    key: str
    sha256: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def to_dict(self) -> dict:
        return {"bucket": self.bucket, "key": self.key, "sha256": self.sha256, "size": self.size, "uri": self.uri}


def artifact_key(application: str, version: str, filename: str) -> str:
    return f"{application}/artifacts/{version}/{filename}"


def publish(s3_client, bucket: str, application: str, version: str, path: Path,
            source: str = "") -> tuple[Artifact, bool]:
    """Upload ``path`` with its sha256 in the object metadata.

    Build once: a version already in the store is never overwritten (a retry or a
    rerun keeps the first upload).  Returns the artifact and whether it was uploaded now.
    ``source`` (the pipeline config file) is named when the bucket does not exist.
    """
    key = artifact_key(application, version, path.name)
    digest = sha256_of(path)
    with bucket_must_exist(bucket, source):
        existing = head(s3_client, bucket, key)
    if existing is not None:
        return existing, False
    with open(path, "rb") as body, bucket_must_exist(bucket, source):
        s3_client.put_object(
            Bucket=bucket,
            Key=key,
            Body=body,
            Metadata={"sha256": digest, "version": version},
            ChecksumAlgorithm="SHA256",
        )
    return Artifact(bucket, key, digest, path.stat().st_size), True


def head(s3_client, bucket: str, key: str) -> Artifact | None:
    try:
        meta = s3_client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in _NOT_FOUND:
            return None
        raise
    return Artifact(bucket, key, meta.get("Metadata", {}).get("sha256", ""), meta["ContentLength"])


def download_verified(s3_client, artifact: dict, dest: Path) -> Path:
    """Download the artifact and refuse it unless its sha256 matches the release record."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with bucket_must_exist(artifact["bucket"]):
            s3_client.download_file(artifact["bucket"], artifact["key"], str(dest))
    except ClientError as exc:
        dest.unlink(missing_ok=True)
        if _code(exc) in _NOT_FOUND:
            raise ArtifactError(f"artifact {artifact['uri']} is not in the artifact store (deleted or moved?): "
                                "nothing to run") from exc
        raise
    actual = sha256_of(dest)
    if actual != artifact["sha256"]:
        dest.unlink(missing_ok=True)
        raise ArtifactError(
            f"artifact {artifact['uri']} has sha256 {actual}, the release record says {artifact['sha256']}: "
            "refusing a tampered or replaced artifact"
        )
    return dest
