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
    version_id: str | None = None  # the S3 object version the registry records: later stages get that one

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def to_dict(self) -> dict:
        return {"bucket": self.bucket, "key": self.key, "sha256": self.sha256, "size": self.size, "uri": self.uri,
                "version_id": self.version_id}


class ArtifactExists(ArtifactError):
    """``upload_new`` found an object at the key already (``If-None-Match``)."""


def artifact_key(application: str, version: str, filename: str) -> str:
    return f"{application}/artifacts/{version}/{filename}"


def require_versioning(s3_client, bucket: str, source: str = "") -> None:
    """Refuse a bucket without versioning: an overwritten artifact could not be told from the first."""
    with bucket_must_exist(bucket, source):
        status = s3_client.get_bucket_versioning(Bucket=bucket).get("Status")
    if status != "Enabled":
        raise ArtifactError(
            f"{source + ': ' if source else ''}aws.artifact_bucket: bucket {bucket!r} has versioning "
            f"{status or 'off'}: turn it on (the artifact_store stack does; or `aws s3api put-bucket-versioning "
            f"--bucket {bucket} --versioning-configuration Status=Enabled`)")


def upload_new(s3_client, bucket: str, key: str, path: Path, digest: str, version: str) -> str:
    """Upload ``path`` only if nothing is at ``key`` (``If-None-Match: *``); returns its S3 VersionId."""
    try:
        with open(path, "rb") as body:
            response = s3_client.put_object(
                Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", ChecksumAlgorithm="SHA256",
                # Informational only: the registry's digest is the truth, never this metadata.
                Metadata={"sha256": digest, "version": version})
    except ClientError as exc:
        if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            raise ArtifactExists(f"s3://{bucket}/{key} exists already") from exc
        raise
    if not response.get("VersionId") or response["VersionId"] == "null":
        raise ArtifactError(f"s3://{bucket}/{key}: S3 gave no VersionId: is versioning on for bucket {bucket!r}?")
    return response["VersionId"]


def stored(s3_client, bucket: str, key: str, folder: Path) -> Artifact | None:
    """What is at ``key`` now, by its bytes (downloaded and hashed: metadata proves nothing), or None."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / "stored"
    try:
        response = s3_client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in _NOT_FOUND:
            return None
        raise
    digest, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for block in response["Body"].iter_chunks(1 << 20):
            digest.update(block)
            size += len(block)
            out.write(block)
    dest.unlink()
    return Artifact(bucket, key, digest.hexdigest(), size, response.get("VersionId"))


def require_version(s3_client, artifact: dict) -> None:
    """The object version the registry records is still in the store."""
    try:
        s3_client.head_object(Bucket=artifact["bucket"], Key=artifact["key"], VersionId=artifact["version_id"])
    except ClientError as exc:
        if _code(exc) in (*_NOT_FOUND, "NoSuchVersion", "400", "405"):
            raise ArtifactError(f"artifact {artifact['uri']} version {artifact['version_id']} is not in the artifact "
                                "store any more (deleted?): build a new version") from exc
        raise


def download_verified(s3_client, artifact: dict, dest: Path) -> Path:
    """Download the artifact (the object version the registry records) and refuse it unless its sha256
    matches the release record."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    version = artifact.get("version_id")
    try:
        with bucket_must_exist(artifact["bucket"]):
            s3_client.download_file(artifact["bucket"], artifact["key"], str(dest),
                                    ExtraArgs={"VersionId": version} if version else None)
    except ClientError as exc:
        dest.unlink(missing_ok=True)
        if _code(exc) in (*_NOT_FOUND, "NoSuchVersion", "400"):
            what = f"version {version} of artifact {artifact['uri']}" if version else f"artifact {artifact['uri']}"
            raise ArtifactError(f"{what} is not in the artifact store (deleted or moved?): nothing to run") from exc
        raise
    actual = sha256_of(dest)
    if actual != artifact["sha256"]:
        dest.unlink(missing_ok=True)
        raise ArtifactError(
            f"artifact {artifact['uri']} has sha256 {actual}, the release record says {artifact['sha256']}: "
            "refusing a tampered or replaced artifact"
        )
    return dest
