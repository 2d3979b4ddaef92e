"""Local folders Deployline works in (git mirrors, checkouts), outside the DAGs folder."""

from __future__ import annotations

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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def workspace(application: str, run_id: str) -> Path:
    """The checkout one pipeline run builds in; the same path on every retry of the run."""
    return work_dir() / "workspaces" / _safe(application) / _safe(run_id)


def remove_workspace(application: str, run_id: str) -> bool:
    path = workspace(application, run_id)
    existed = path.exists()
    shutil.rmtree(path, ignore_errors=True)
    return existed
