"""Answers who may do what on the pipelines' DAGs under the FAB auth manager; prints JSON.

Run by tests/unit/test_access_control.py in a fresh interpreter whose environment selects
the FAB auth manager, an empty SQLite database and the pipeline configs to load (so no
other test ever sees FAB configured). Every step is Airflow's or FAB's own code:

1. the schema: ``airflow.utils.db.initdb`` (what ``airflow db migrate`` does on an empty
   database, the FAB tables included through its DB manager);
2. the built-in roles: FAB's app factory (``create_app``), which syncs Admin, Op, User,
   Viewer and Public as the API server does;
3. custom roles as the README makes the approver role (``airflow roles create`` and ``roles
   add-perms``: edit on task instances, DAG runs and required actions, of no DAG yet);
4. the DAGs: dags/deployline_pipelines.py parsed into a ``DagBag`` and written to the
   database with ``sync_bag_to_db`` (as ``airflow dags reserialize`` does): it calls the DAG
   processor's ``update_dag_parsing_results_in_db``, which syncs each DAG's
   ``access_control`` into FAB's tables when the FAB auth manager is configured;
5. the answers: ``FabAuthManager.is_authorized_dag``, which the REST API's
   ``requires_access_dag`` calls, for users with the given roles.

argv[1]: JSON {"custom_roles": [...], "users": {name: [roles]}, "dags": [...]}; the last line
printed is {"answers": {user: {dag_id: {check: bool}}}, ...}.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Global grants of the approver role (README, "Only approvers decide"); FAB also needs edit on
# the DAG itself for any of them, and that only the gates' access_control gives.
APPROVER_GRANTS = [("can_edit", "Task Instances"), ("can_edit", "DAG Runs"), ("can_edit", "HITL Detail")]


def main(spec: dict) -> dict:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.errors import ParseImportError
    from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager
    from airflow.providers.fab.www.app import create_app
    from airflow.utils.db import initdb
    from airflow.utils.session import create_session

    initdb()
    app = create_app(enable_plugins=False)
    with app.app_context():
        sm = app.appbuilder.sm
        for name in spec["custom_roles"]:
            role = sm.add_role(name)
            for action, resource in APPROVER_GRANTS:
                sm.add_permission_to_role(role, sm.create_permission(action, resource))

        DagBundlesManager().sync_bundles_to_db()
        bag = DagBag(dag_folder=str(ROOT / "dags" / "deployline_pipelines.py"))
        sync_bag_to_db(bag, "dags-folder", None)
        with create_session() as session:
            import_errors = {e.filename: e.stacktrace for e in session.query(ParseImportError)}

        for name, roles in spec["users"].items():
            sm.add_user(name, name, "Test", f"{name}@example.invalid", role=[sm.find_role(r) for r in roles],
                        password="not-used")
        sm.session.expire_all()

        auth = FabAuthManager()
        checks = {
            "read dag": dict(method="GET"),
            "edit dag": dict(method="PUT"),
            "mark task": dict(method="PUT", access_entity=DagAccessEntity.TASK_INSTANCE),
            "answer required action": dict(method="PUT", access_entity=DagAccessEntity.HITL_DETAIL),
        }
        answers = {
            name: {
                dag_id: {
                    check: auth.is_authorized_dag(details=DagDetails(id=dag_id), user=sm.find_user(username=name),
                                                  **kwargs)
                    for check, kwargs in checks.items()
                }
                for dag_id in spec["dags"]
            }
            for name in spec["users"]
        }
        return {"dags": sorted(bag.dags), "bag_import_errors": bag.import_errors, "import_errors": import_errors,
                "access_control": {d: bag.dags[d].access_control for d in spec["dags"] if d in bag.dags},
                "answers": answers}


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print(json.dumps(result, default=sorted))
