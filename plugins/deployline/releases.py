"""The release registry: one JSON record per version, in the artifact bucket.

``s3://<bucket>/<app>/releases/<version>.json`` is the source of truth for what was
built, tested, approved and deployed; it outlives the Airflow database.

Version scheme: ``r<revision>-<short sha>``, where ``revision`` is the number of
commits in the branch's first-parent history up to the commit (``git rev-list
--count --first-parent``).  Versions sort by revision, so "newer" is a number
comparison, and the short sha keeps every version traceable to its commit.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from botocore.exceptions import ClientError

from deployline import artifacts
from deployline.artifacts import bucket_must_exist

WRITE_ATTEMPTS = 20
# A conditional write that lost: the object changed (412), or another conditional write to it is
# in flight (409), or it was created since we found none.
CONFLICTS = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})

_VERSION = re.compile(r"^r(?P<revision>\d+)-(?P<short>[0-9a-f]{7,40})$")


def make_version(revision: int, sha: str) -> str:
    return f"r{revision}-{sha[:10]}"


def revision_of(version: str) -> int:
    match = _VERSION.match(version)
    if not match:
        raise ValueError(f"not a Deployline version: {version!r} (expected r<revision>-<sha>)")
    return int(match["revision"])


# Stages whose failure may only mean that nobody decided in time: their verdicts are the
# approvals' decisions and production's result instead.
_GATED_STAGES = ("5-exploratory", "8-production")


def stopped_because(record: dict) -> str | None:
    """Why a release was judged unfit, or None: a rejected or refused approval, a failed stage, a
    rollback in production. Such a version is not offered to self-service, and neither its build
    nor its base image is reused by a later commit.

    An approval that timed out is no verdict (nobody looked), so it stops only its own run.
    """
    for gate, decided in sorted((record.get("approvals") or {}).items()):
        if decided.get("refused"):
            return f"{gate} approval refused"
        if decided.get("decision") == "rejected":
            return f"{gate} approval rejected"
    for stage, entry in sorted((record.get("stages") or {}).items()):
        if stage not in _GATED_STAGES and isinstance(entry, dict) and entry.get("result") == "failed":
            return f"{stage} failed"
    if (record.get("production") or {}).get("result") == "rolled_back":
        return "rolled back in production"
    return None


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _keep_start(old: dict | None, new: dict) -> dict:
    """A stage's result keeps the start time of the same run's attempt."""
    if old and old.get("started_at") and "started_at" not in new and old.get("run_id") == new.get("run_id"):
        return {"started_at": old["started_at"], **new}
    return new


@dataclass
class ReleaseRegistry:
    """Read and write release records through an ``S3Hook`` (or anything with its client)."""

    s3_client: object
    bucket: str
    application: str
    source: str = ""  # the pipeline config file, named when the bucket does not exist

    @classmethod
    def for_config(cls, config) -> ReleaseRegistry:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        hook = S3Hook(aws_conn_id=config.aws.conn_id, region_name=config.aws.region)
        return cls(hook.get_conn(), config.aws.artifact_bucket, config.application, config.source_file)

    @property
    def prefix(self) -> str:
        return f"{self.application}/releases/"

    def key(self, version: str) -> str:
        revision_of(version)  # refuse anything that is not a version
        return f"{self.prefix}{version}.json"

    def get(self, version: str) -> dict | None:
        return self._read(self.key(version))[0]

    def put(self, record: dict) -> dict:
        record = dict(record, updated_at=utcnow())
        self._write(self.key(record["version"]), record)
        return record

    def update(self, version: str, **fields) -> dict:
        """Merge ``fields`` into the record (creating it); dict values merge one level deep.

        Stages running side by side update the same record: each write is conditional on the
        version read (S3 conditional writes), and a lost race reads and merges again.  A stage's
        entry keeps the ``started_at`` that ``stage_started`` wrote for the same run.
        """

        def merged(record: dict | None) -> dict:
            record = record or {"version": version, "application": self.application}
            for name, value in fields.items():
                if name == "stages" and isinstance(value, dict):
                    value = {stage: _keep_start(record.get("stages", {}).get(stage), entry)
                             for stage, entry in value.items()}
                if isinstance(value, dict) and isinstance(record.get(name), dict):
                    record[name] = {**record[name], **value}
                else:
                    record[name] = value
            return dict(record, updated_at=utcnow())

        return self._read_modify_write(self.key(version), merged)

    def publish(self, version: str, path: Path, work: Path) -> tuple[artifacts.Artifact, bool]:
        """Build once, and no build swapped: put ``path`` in the store as ``version``'s artifact.

        The registry is the truth, never the object's metadata. The digest is claimed in the record
        (``artifact_claim``, a conditional write) before the upload, which is ``If-None-Match``; the
        record then keeps the S3 object version. A version published before keeps its first
        upload (a retry or a rerun). An object found at the key is hashed: it is taken only when
        it is the claimed build (an earlier try that uploaded, then died), else refused, naming
        both digests: a planted key or a replaced object. Returns the artifact and whether it was
        uploaded now. ``work`` is a folder for the download that hashes a found object.
        """
        key = artifacts.artifact_key(self.application, version, path.name)
        done = (self.get(version) or {}).get("artifact")
        if done and done.get("version_id") and done.get("key") == key:
            artifacts.require_version(self.s3_client, done)
            return artifacts.Artifact(self.bucket, key, done["sha256"], done["size"], done["version_id"]), False
        artifacts.require_versioning(self.s3_client, self.bucket, self.source)
        found = artifacts.stored(self.s3_client, self.bucket, key, work)
        if found is None:
            digest, size = artifacts.sha256_of(path), path.stat().st_size
            self.update(version, artifact_claim={"key": key, "sha256": digest, "size": size, "at": utcnow()})
            try:
                version_id = artifacts.upload_new(self.s3_client, self.bucket, key, path, digest, version)
                return artifacts.Artifact(self.bucket, key, digest, size, version_id), True
            except artifacts.ArtifactExists:
                found = artifacts.stored(self.s3_client, self.bucket, key, work)  # someone was quicker
        claim = (self.get(version) or {}).get("artifact_claim") or {}
        if found is None or claim.get("key") != key or claim.get("sha256") != found.sha256:
            claimed = f"claims {claim['sha256']}" if claim.get("key") == key else "claims no build for it"
            raise artifacts.ArtifactError(
                f"artifact s3://{self.bucket}/{key} is in the store already with sha256 "
                f"{found.sha256 if found else '(gone again)'}, but the release registry {claimed}: refusing a planted "
                "or replaced artifact")
        return found, False

    def stage_started(self, version: str, stage: str, run_id: str) -> dict:
        """Mark ``stage`` running in ``run_id`` from now (kept if it already runs in that run)."""

        def started(record: dict | None) -> dict:
            record = record or {"version": version, "application": self.application}
            entry = record.setdefault("stages", {}).get(stage) or {}
            if not (entry.get("run_id") == run_id and entry.get("result") == "running"):
                record["stages"][stage] = {"result": "running", "started_at": utcnow(), "run_id": run_id}
            return dict(record, updated_at=utcnow())

        return self._read_modify_write(self.key(version), started)

    def stage_skipped(self, version: str, stage: str, run_id: str, reason: str) -> dict:
        """A stage that started in ``run_id`` and then skipped (nothing to do) is recorded as skipped."""

        def skipped(record: dict | None) -> dict:
            record = record or {"version": version, "application": self.application}
            entry = record.setdefault("stages", {}).get(stage) or {}
            if entry.get("run_id") == run_id and entry.get("result") == "running":
                record["stages"][stage] = {**entry, "result": "skipped", "reason": reason[-500:],
                                           "finished_at": utcnow()}
            return dict(record, updated_at=utcnow())

        return self._read_modify_write(self.key(version), skipped)

    def add_deployment(self, version: str, attempt: dict, **fields) -> dict:
        """Append one production attempt (deployed or rolled back) to ``deployments``; set ``fields`` too.

        Once: an attempt with the same ``run_id``, ``result`` and ``at`` is already there when the same
        deploy is recorded again (a retried task, or a write S3 stored but whose answer was lost and
        that is merged again after the 412); it is not appended a second time, deploy counts stay right.
        """

        def same(other: dict) -> bool:
            return all(other.get(k) == attempt.get(k) for k in ("run_id", "result", "at"))

        def appended(record: dict | None) -> dict:
            record = record or {"version": version, "application": self.application}
            attempts = record.get("deployments", [])
            record["deployments"] = attempts if any(same(a) for a in attempts) else [*attempts, attempt]
            record.update(fields)
            return dict(record, updated_at=utcnow())

        return self._read_modify_write(self.key(version), appended)

    def _read(self, key: str) -> tuple[dict | None, str | None]:
        """The JSON object at ``key`` and its ETag, or (None, None)."""
        try:
            with bucket_must_exist(self.bucket, self.source):
                response = self.s3_client.get_object(Bucket=self.bucket, Key=key)
        except self.s3_client.exceptions.NoSuchKey:
            return None, None
        return json.loads(response["Body"].read()), response["ETag"]

    def _write(self, key: str, data: dict, **condition) -> None:
        with bucket_must_exist(self.bucket, self.source):
            self.s3_client.put_object(Bucket=self.bucket, Key=key, ContentType="application/json",
                                      Body=json.dumps(data, indent=2, sort_keys=True).encode(), **condition)

    def _read_modify_write(self, key: str, change) -> dict:
        for attempt in range(WRITE_ATTEMPTS):
            current, etag = self._read(key)
            data = change(current)
            try:
                self._write(key, data, **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}))
                return data
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in CONFLICTS:
                    raise
            time.sleep(random.uniform(0.05, 0.2 * (attempt + 1)))  # another writer won: read again
        raise RuntimeError(f"s3://{self.bucket}/{key}: still changed by other writers after "
                           f"{WRITE_ATTEMPTS} attempts")

    # ------------------------------------------------------------------ what runs in production

    @property
    def production_key(self) -> str:
        return f"{self.application}/production.json"

    def production(self) -> dict | None:
        """``{"version", "environment", "endpoint", "deployed_at", "run_id", "history": [...]}`` or None."""
        return self._read(self.production_key)[0]

    def set_production(self, version: str, **details) -> dict:
        """Record ``version`` as live; the previous entries stay in ``history`` (newest first, 100 kept)."""
        revision_of(version)

        def live(current: dict | None) -> dict:
            before = {k: v for k, v in (current or {}).items() if k not in ("history", "pending")}
            history = ([before] if before.get("version") else []) + (current or {}).get("history", [])
            return {"version": version, **details, "deployed_at": utcnow(), "history": history[:100]}

        return self._read_modify_write(self.production_key, live)

    def note_production_change(self, version: str, status: str, **details) -> dict:
        """Write a production change in progress into ``production.json`` (``pending``: ``switching``,
        ``verifying``, ``verified``) before it happens, where it outlives a killed worker; a
        ``rolled_back`` status removes it. ``set_production`` ends it."""
        revision_of(version)

        def noted(current: dict | None) -> dict:
            current = dict(current or {})
            if status == "rolled_back":
                if (current.get("pending") or {}).get("version") == version:
                    current.pop("pending")
            else:
                current["pending"] = {"version": version, "status": status, **details, "since": utcnow()}
            return current

        return self._read_modify_write(self.production_key, noted)

    def versions(self) -> list[str]:
        """Every recorded version, oldest first."""
        found = []
        paginator = self.s3_client.get_paginator("list_objects_v2")
        with bucket_must_exist(self.bucket, self.source):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix):].removesuffix(".json")
                    if _VERSION.match(name):
                        found.append(name)
        return sorted(found, key=revision_of)

    def records(self) -> list[dict]:
        return [r for r in (self.get(v) for v in self.versions()) if r]

    def _newest(self, before_revision: int | None, accept) -> dict | None:
        for version in reversed(self.versions()):
            if before_revision is not None and revision_of(version) >= before_revision:
                continue
            record = self.get(version)
            if record and accept(record):
                return record
        return None

    def last_good_base_image(self, before_revision: int | None = None) -> dict | None:
        """The base image of the newest candidate (it passed acceptance), else the newest baked one.

        Never an image whose baking version, or the candidate found, was rejected, failed or
        rolled back (``stopped_because``): an image that failed once is not released later.
        """
        verdicts: dict[str, bool] = {}

        def baked_by_a_good_version(image: dict) -> bool:
            baker = image.get("version")
            if not baker:  # recorded before images named their version: nothing to check
                return True
            if baker not in verdicts:
                record = self.get(baker)
                verdicts[baker] = bool(record) and stopped_because(record) is None
            return verdicts[baker]

        def usable(record: dict, candidate: bool) -> bool:
            image = record.get("base_image") or {}
            if not image.get("id") or (candidate and not record.get("candidate")):
                return False
            if not candidate and not image.get("baked"):
                return False
            return stopped_because(record) is None and baked_by_a_good_version(image)

        record = self._newest(before_revision, lambda r: usable(r, candidate=True))
        record = record or self._newest(before_revision, lambda r: usable(r, candidate=False))
        return record["base_image"] if record else None

    def last_published(self, before_revision: int | None = None) -> dict | None:
        """The newest record with a published artifact (older than ``before_revision`` if given),
        skipping versions that were rejected, failed or rolled back: their build is not reused."""
        return self._newest(before_revision, lambda r: r.get("artifact") and stopped_because(r) is None)
