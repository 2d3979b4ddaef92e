"""The one-slot deploy pools of every pipeline, made when a deployment starts (not by a task).

``deployline_<app>_preproduction`` and ``deployline_<app>_production`` keep two deploys of one
application from overlapping. They count deferred tasks (``include_deferred``): a deploy that
waits in the triggerer keeps its slot. ``python -m deployline pools`` writes them into
Airflow's database (run where Airflow's settings are: ``make demo``, the e2e tests and the
Compose init do); no task needs an admin login for it.
"""

from __future__ import annotations

from deployline.config import PipelineConfig


def deploy_pools(configs: list[PipelineConfig]) -> list[dict]:
    """The pools of ``configs``: name, slots (1), description, include_deferred (True)."""
    return [{"name": name, "slots": 1, "description": f"one {config.application} {what} deploy at a time",
             "include_deferred": True}
            for config in configs
            for name, what in ((config.preproduction_pool, "pre-production"), (config.production_pool, "production"))]


def ensure_pools(configs: list[PipelineConfig]) -> list[str]:
    """Create the pools of ``configs`` in Airflow's database, or bring them to one slot counting
    deferred tasks; returns their names."""
    from airflow.models.pool import Pool

    for pool in deploy_pools(configs):
        Pool.create_or_update_pool(pool["name"], pool["slots"], pool["description"], pool["include_deferred"])
    return [pool["name"] for pool in deploy_pools(configs)]


def pool_problems(existing: dict[str, dict], config: PipelineConfig) -> list[str]:
    """What is wrong with the deploy pools of ``config``, from ``GET /pools`` (name -> pool)."""
    problems = []
    for pool in deploy_pools([config]):
        found = existing.get(pool["name"])
        if found is None:
            problems.append(f"pool {pool['name']} does not exist")
        elif found.get("slots") != 1 or not found.get("include_deferred"):
            problems.append(f"pool {pool['name']} has {found.get('slots')} slot(s) and include_deferred "
                            f"{found.get('include_deferred')}, not 1 and true")
    return problems
