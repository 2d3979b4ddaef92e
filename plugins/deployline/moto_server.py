"""moto server for the embedded stack and the tests, with two gaps to AWS closed.

1. moto checks ``If-Match`` / ``If-None-Match`` and then writes, with no lock between the two,
   so two writes at once can both pass the check; S3 itself decides atomically. The release
   registry's concurrent updates rely on that, so every S3 write to moto is serialized here.
2. moto's CloudFormation ignores an ``AWS::S3::Bucket``'s ``VersioningConfiguration``, so the
   artifact store stack made an unversioned bucket, which publishing rightly refuses. Here the
   template's setting is applied, as CloudFormation does.

``python -m deployline.moto_server -H 127.0.0.1 -p 5055`` takes moto_server's arguments.
"""

from __future__ import annotations

import sys
import threading

_LOCK = threading.Lock()


def make_conditional_puts_atomic() -> None:
    """Serialize moto's S3 PutObject handling in this process (idempotent)."""
    from moto.s3.responses import S3Response

    original = S3Response.put_object
    if getattr(original, "deployline_atomic", False):
        return

    def put_object(self, *args, **kwargs):
        with _LOCK:
            return original(self, *args, **kwargs)

    put_object.deployline_atomic = True
    S3Response.put_object = put_object


def _template_versioning(bucket, cloudformation_json) -> None:
    status = ((cloudformation_json or {}).get("Properties", {})
              .get("VersioningConfiguration", {}).get("Status"))
    if status in ("Enabled", "Suspended"):
        bucket.versioning_status = status


def apply_bucket_versioning_from_templates() -> None:
    """Make moto's CloudFormation honour ``VersioningConfiguration`` (idempotent)."""
    from moto.s3.models import FakeBucket

    create = FakeBucket.create_from_cloudformation_json.__func__
    if getattr(create, "deployline_versioning", False):
        return
    update = FakeBucket.update_from_cloudformation_json.__func__

    def create_from_cloudformation_json(cls, resource_name, cloudformation_json, *args, **kwargs):
        bucket = create(cls, resource_name, cloudformation_json, *args, **kwargs)
        _template_versioning(bucket, cloudformation_json)
        return bucket

    def update_from_cloudformation_json(cls, original_resource, new_resource_name,
                                        cloudformation_json, *args, **kwargs):
        bucket = update(cls, original_resource, new_resource_name, cloudformation_json,
                        *args, **kwargs)
        _template_versioning(bucket, cloudformation_json)
        return bucket

    create_from_cloudformation_json.deployline_versioning = True
    FakeBucket.create_from_cloudformation_json = classmethod(create_from_cloudformation_json)
    FakeBucket.update_from_cloudformation_json = classmethod(update_from_cloudformation_json)


def close_gaps() -> None:
    """Everything above, in this process (idempotent)."""
    make_conditional_puts_atomic()
    apply_bucket_versioning_from_templates()


def main(argv: list[str] | None = None) -> None:
    close_gaps()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
