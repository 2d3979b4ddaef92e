"""sample-service: the demo HTTP service delivered by the Deployline pipeline.

``__version__`` comes from the ``VERSION`` file that ``build.py`` writes next to
this module in the distribution tarball; in a source checkout it is ``"dev"``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def read_packaged_file(name: str, default: str) -> str:
    """Return the stripped content of a metadata file shipped in the package, or ``default``."""
    try:
        text = (_PACKAGE_DIR / name).read_text(encoding="utf-8").strip()
    except OSError:
        return default
    return text or default


__version__ = read_packaged_file("VERSION", "dev")

__all__ = ["__version__", "read_packaged_file"]
