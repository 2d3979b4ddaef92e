"""Local folders Deployline works in (git mirrors, checkouts), outside the DAGs folder."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

WORK_DIR_ENV = "DEPLOYLINE_WORK_DIR"


def work_dir() -> Path:
    """``$DEPLOYLINE_WORK_DIR``, else ``$AIRFLOW_HOME/deployline``."""
    explicit = os.environ.get(WORK_DIR_ENV)
    if explicit:
        return Path(explicit)
    airflow_home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(airflow_home) / "deployline"


def safe_name(name: str) -> str:
    """``name`` as one folder or S3 key segment. A name that had to change gets a digest of the
    original, so two names never share a folder (``commit:_x`` and ``commit__x`` used to)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "_"
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def workspace(application: str, run_id: str) -> Path:
    """The folder of one pipeline run's task on this worker; the same path on every retry."""
    return work_dir() / "workspaces" / safe_name(application) / safe_name(run_id)


def remove_workspace(application: str, run_id: str) -> bool:
    path = workspace(application, run_id)
    existed = path.exists()
    shutil.rmtree(path, ignore_errors=True)
    return existed
