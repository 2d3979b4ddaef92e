"""moto server for the embedded stack and the tests, with S3 conditional writes made atomic.

moto checks ``If-Match`` / ``If-None-Match`` and then writes, with no lock between the two, so
two writes at once can both pass the check; S3 itself decides atomically. The release
registry's concurrent updates rely on that, so every S3 write to moto is serialized here.
``python -m deployline.moto_atomic -H 127.0.0.1 -p 5055`` takes moto_server's arguments.
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


def main(argv: list[str] | None = None) -> None:
    make_conditional_puts_atomic()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
