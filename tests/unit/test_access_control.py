"""Only approvers decide: the approval gates' ``access_control``, enforced by the FAB auth manager.

tests/dags/test_dag_integrity.py::test_approval_gates checks the dict on the gate DAGs; this
test proves what it does once Airflow runs with the FAB auth manager (the Helm deployment,
or the README's "Only approvers decide"). tests/unit/fab_authorize.py, in a fresh interpreter
with FAB configured on an empty PostgreSQL database of its own, parses dags/deployline_pipelines.py with two
pipeline configs (the real sample config, whose approver role is ``ReleaseApprover``, and a
``billing`` copy whose approver role is ``BillingApprover``), writes the DAGs to the database
the way the DAG processor does (which syncs each DAG's ``access_control`` into FAB's
permission tables), and asks ``FabAuthManager.is_authorized_dag`` -- the check behind the
REST API and the UI -- what users with these roles may do:

* an approver (``Viewer`` + ``ReleaseApprover``) may decide on its application's gates:
  edit the gate DAG, mark its ``decision`` task (PUT on task instances) and answer its
  Required Action;
* the same approver may not decide anything on the pipeline DAG itself nor on another
  application's gate, and ``BillingApprover`` none of ``sample_service``'s: roles don't cross;
* ``Viewer``, and a custom role with the approver role's global grants that no gate names,
  may look but not decide: the gate's ``access_control`` alone makes an approver;
* FAB's built-in ``User`` role (and so ``Op`` and ``Admin``) may edit every DAG, gates
  included: that is why approvers start from ``Viewer`` (README).

Remove ``access_control`` from ``approvals.build_gate_dag`` and the approvers lose their
gates (this test fails); misname the role and the sync is an import error (it fails too).

The provider is installed for this test only: ``make demo`` and the end-to-end tests keep the
simple auth manager (last test).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("fab_authorize.py")
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"

GATE_PRODUCTION, GATE_EXPLORATORY = "sample_service_approve_production", "sample_service_approve_exploratory"
PIPELINE, OTHER_GATE = "sample_service_pipeline", "billing_approve_production"
DAGS = [GATE_PRODUCTION, GATE_EXPLORATORY, PIPELINE, OTHER_GATE]

USERS = {
    "dana": ["Viewer", "ReleaseApprover"],  # sample_service's approver
    "bill": ["Viewer", "BillingApprover"],  # billing's approver
    "vic": ["Viewer"],
    "olga": ["Viewer", "Deployer"],  # the approver role's global grants, named by no gate
    "uma": ["User"],
}
READ = {"read dag"}
DECIDE = {"read dag", "edit dag", "mark task", "answer required action"}
EXPECTED = {
    "dana": {GATE_PRODUCTION: DECIDE, GATE_EXPLORATORY: DECIDE, PIPELINE: READ, OTHER_GATE: READ},
    "bill": {GATE_PRODUCTION: READ, GATE_EXPLORATORY: READ, PIPELINE: READ, OTHER_GATE: DECIDE},
    "vic": dict.fromkeys(DAGS, READ),
    "olga": dict.fromkeys(DAGS, READ),
    "uma": dict.fromkeys(DAGS, DECIDE),
}


def authorize(tmp_path: Path) -> dict:
    from deployline import embedded

    stack = embedded.Stack()  # PostgreSQL, as under every Airflow we start
    try:
        database = embedded.start_database(stack, tmp_path / "postgres", tmp_path / "logs")
        return _authorize(tmp_path, database[embedded.DATABASE_URL])
    finally:
        stack.stop()


def _authorize(tmp_path: Path, database_url: str) -> dict:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    sample = (ROOT / "include/pipelines/sample_service.yaml").read_text()
    assert "approvals:" not in sample  # the sample relies on the default approver role, ReleaseApprover
    (pipelines / "sample_service.yaml").write_text(sample)
    (pipelines / "billing.yaml").write_text(
        sample.replace("application: sample_service", "application: billing")
        + "approvals:\n  approver_role: BillingApprover\n  production: {mode: sensor}\n")
    # FAB only in this interpreter: nothing of the test run's own Airflow configuration leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "DEPLOYLINE_"))} | {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__AUTH_MANAGER": FAB,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "PYTHONPATH": str(ROOT / "plugins"),
        "DEPLOYLINE_PIPELINES_DIR": str(pipelines),
    }
    spec = {"custom_roles": ["ReleaseApprover", "BillingApprover", "Deployer"], "users": USERS, "dags": DAGS}
    done = subprocess.run([sys.executable, str(SCRIPT), json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_only_approvers_decide_on_their_applications_gates(tmp_path):
    result = authorize(tmp_path)
    # The DAG processor's sync found every role the gates name: no import error, every DAG there.
    assert result["bag_import_errors"] == {} and result["import_errors"] == {}
    assert set(DAGS) <= set(result["dags"])
    allowed = {user: {dag_id: {check for check, yes in checks.items() if yes} for dag_id, checks in dags.items()}
               for user, dags in result["answers"].items()}
    assert allowed == EXPECTED
    assert result["access_control"][GATE_PRODUCTION] == {
        "ReleaseApprover": {"DAGs": ["can_edit", "can_read"], "DAG Runs": ["can_create", "can_read"]}}


def test_the_embedded_stack_keeps_the_simple_auth_manager(tmp_path, monkeypatch):
    # make demo and the end-to-end tests log in with the simple auth manager's users, whatever the shell says.
    from airflow.configuration import conf
    from deployline import embedded

    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", FAB)
    env = embedded.airflow_env(tmp_path / "airflow", 8080, "http://127.0.0.1:5000")
    # Airflow's default, which the FAB provider being installed does not change.
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == conf.get_default_value("core", "auth_manager")
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith(".SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin,approver:op,viewer:viewer"
