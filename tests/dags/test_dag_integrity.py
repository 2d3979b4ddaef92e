import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("parse_dags.py")


def parse(tmp_path, pipelines_dir=None, script=SCRIPT, extra_env=None) -> dict:
    env = os.environ | (extra_env or {}) | {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(ROOT / "plugins"),
    }
    env.pop("DEPLOYLINE_PIPELINES_DIR", None)
    if pipelines_dir:
        env["DEPLOYLINE_PIPELINES_DIR"] = str(pipelines_dir)
    done = subprocess.run([sys.executable, str(script), str(ROOT / "dags")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    return parse(tmp_path_factory.mktemp("parse"))


def test_every_dag_imports_without_errors(parsed):
    assert parsed["import_errors"] == {}
    assert {"sample_service_commit_poll", "sample_service_pipeline", "sample_service_approve_exploratory",
            "sample_service_approve_production"} <= set(parsed["dags"])


def test_parsing_makes_no_network_git_or_aws_call(parsed):
    assert parsed["events"] == []  # nor writes or removes a file


def test_parsing_reads_no_file_but_the_pipeline_configs(parsed):
    configs = {str(p) for p in (ROOT / "include/pipelines").glob("*.yaml")}
    assert configs and set(parsed["files_read"]) == configs


@pytest.mark.parametrize("dag_id", ["sample_service_pipeline", "sample_service_approve_production",
                                    "self_service_reaper"])
def test_a_task_process_builds_only_the_dag_of_its_task(tmp_path, parsed, dag_id):
    """A task's process parses the DAG file with Airflow's parsing context naming its DAG."""
    found = parse(tmp_path, extra_env={"_AIRFLOW_PARSING_CONTEXT_DAG_ID": dag_id,
                                       "_AIRFLOW_PARSING_CONTEXT_TASK_ID": "any"})
    assert found["import_errors"] == {}
    assert set(found["dags"]) == {dag_id, "support_infrastructure"}  # the stage-0 file has one DAG
    assert found["dags"][dag_id] == parsed["dags"][dag_id]  # the same DAG as a full parse builds


def test_dag_files_name_the_airflow_modules_their_parse_needs(tmp_path):
    # The DAG processor imports a file's own `airflow.*` imports once, in its parent; an Airflow
    # module that only deployline imports is imported again in every parse of the file.
    found = parse(tmp_path, script=SCRIPT.with_name("airflow_imports_at_parse.py"))
    assert set(found) == {p.name for p in (ROOT / "dags").glob("*.py")}
    missing = {name: modules for name, modules in found.items() if modules}
    assert not missing, f"import these (or the modules that import them) at the top of the DAG file: {missing}"


def test_poll_dag_shape(parsed):
    dag = parsed["dags"]["sample_service_commit_poll"]
    assert dag["schedule"] and dag["doc_md"] and dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert tasks["wait_for_commit"]["type"] == "GitCommitSensor"
    assert tasks["wait_for_commit"]["mode"] == "reschedule"
    assert tasks["trigger_pipeline"]["type"] == "TriggerPipelineOperator"  # its note is templated too
    assert tasks["trigger_pipeline"]["upstream"] == ["wait_for_commit"]


def test_pipeline_dag_shape_follows_the_design(parsed):
    dag = parsed["dags"]["sample_service_pipeline"]
    assert dag["schedule"] is None and dag["doc_md"] and dag["params"] == ["commit"]
    assert dag["max_active_runs"] >= 16  # runs waiting (deferred) for approvals must not hold back new commits
    # every stage explains itself in the UI
    assert dag["groups"] == {"1-baking": True, "2-commit": True, "3-acceptance": True, "5-exploratory": True,
                             "6-capacity": True, "7-pre-production": True, "8-production": True}
    tasks = dag["tasks"]
    assert tasks["classify_change"]["upstream"] == ["resolve_commit"]
    assert tasks["classify_change"]["type"] == "BranchPythonOperator"
    assert tasks["2-commit.checkout"]["upstream"] == ["classify_change", "resolve_commit"]
    assert tasks["2-commit.checkout"]["is_setup"]
    assert tasks["2-commit.build"]["upstream"] == ["2-commit.checkout", "resolve_commit"]
    for step in ("2-commit.unit_test", "2-commit.static_analysis"):
        assert tasks[step]["upstream"] == ["2-commit.build", "resolve_commit"]
    # publish_artifact restores the build itself (from S3, checked): any worker can run it.
    assert tasks["2-commit.publish_artifact"]["upstream"] == [
        "2-commit.build", "2-commit.static_analysis", "2-commit.unit_test", "resolve_commit"]
    teardown = tasks["2-commit.clean_workspace"]
    assert teardown["is_teardown"] and teardown["trigger_rule"] == "all_done_setup_success"
    assert teardown["upstream"] == ["2-commit.checkout", "2-commit.publish_artifact"]


def test_baking_and_acceptance_follow_the_design(parsed):
    tasks = parsed["dags"]["sample_service_pipeline"]["tasks"]
    assert tasks["1-baking.resolve_base_image"]["upstream"] == ["classify_change"]
    assert tasks["1-baking.launch_builder"]["is_setup"]
    assert tasks["1-baking.wait_for_base_image"]["type"] == "AmiAvailableSensor"
    assert tasks["1-baking.terminate_builder"]["is_teardown"]
    assert "1-baking.launch_builder" in tasks["1-baking.terminate_builder"]["upstream"]
    # Acceptance starts when what ran before it succeeded: baking, the commit stage, or both.
    entry = tasks["3-acceptance.select_inputs"]
    assert entry["trigger_rule"] == "none_failed_min_one_success"
    assert set(entry["upstream"]) == {"1-baking.record_base_image", "2-commit.publish_artifact", "resolve_commit"}
    assert tasks["3-acceptance.provision_environment"]["is_setup"]
    assert tasks["3-acceptance.teardown_environment"]["is_teardown"]
    assert set(tasks["3-acceptance.teardown_environment"]["upstream"]) == {
        "3-acceptance.provision_environment", "3-acceptance.acceptance_test"}
    assert tasks["3-acceptance.launch_image_builder"]["is_setup"]
    assert tasks["3-acceptance.terminate_image_builder"]["is_teardown"]
    assert tasks["3-acceptance.wait_for_application_image"]["type"] == "AmiAvailableSensor"
    assert "3-acceptance.acceptance_test" in tasks["3-acceptance.launch_image_builder"]["upstream"]


def test_a_broken_config_is_an_import_error_and_the_others_still_load(tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    good = (ROOT / "include/pipelines/sample_service.yaml").read_text()
    (pipelines / "sample_service.yaml").write_text(good)
    (pipelines / "billing.yaml").write_text(
        good.replace("application: sample_service", "application: billing")
        .replace('schedule: "* * * * *"', 'schedule: "every minute"'))
    (pipelines / "orders.yaml").write_text(textwrap.dedent("""\
        application: orders
        repository: {url: /srv/git/orders.git}
        """))
    parsed = parse(tmp_path, pipelines)
    assert {dag_id for dag_id in parsed["dags"] if dag_id.startswith(("billing", "orders"))} == set()
    assert {"sample_service_commit_poll", "sample_service_pipeline"} <= set(parsed["dags"])
    assert [Path(p).name for p in parsed["import_errors"]] == ["deployline_config_check.py"]
    error = next(iter(parsed["import_errors"].values()))
    assert "2 pipeline config(s) are invalid" in error
    assert f"{pipelines}/billing.yaml: polling.schedule: Value error, not a valid cron expression" in error
    assert f"{pipelines}/orders.yaml: commit_stage: Field required; aws: Field required" in error


# Every task that starts, changes, checks, tests or stops a local environment (processes on one
# host's loopback) runs on that host's queue; everything else may run on any worker (issue 16).
ENVIRONMENT_HOST_TASKS = {
    "sample_service_pipeline": {
        "3-acceptance.provision_environment", "3-acceptance.wait_until_healthy", "3-acceptance.acceptance_test",
        "3-acceptance.teardown_environment",
        "6-capacity.provision_environment", "6-capacity.wait_until_healthy", "6-capacity.load_test_expected",
        "6-capacity.load_test_peak", "6-capacity.teardown_environment",
        "7-pre-production.update_environment", "7-pre-production.smoke_test",
        "8-production.ensure_production_address", "8-production.deploy", "8-production.clean_up_environments",
    },
    "sample_service_self_service": {"provision_environment", "wait_until_healthy", "smoke_test",
                                    "remove_failed_launch", "destroy_environment"},
    "self_service_reaper": {"reap_sample_service"},
}


def test_local_environment_tasks_go_to_the_environment_host_queue_and_nothing_else_does(parsed):
    for dag_id, dag in parsed["dags"].items():
        on_host = {t for t, task in dag["tasks"].items() if task["queue"] == "deployline_local_environments"}
        assert on_host == ENVIRONMENT_HOST_TASKS.get(dag_id, set()), dag_id
        others = {task["queue"] for t, task in dag["tasks"].items() if t not in on_host}
        assert others <= {"default"}, dag_id


def test_the_cloudformation_driver_needs_no_environment_host(tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "sample_service.yaml").write_text(
        (ROOT / "include/pipelines/sample_service.yaml").read_text().replace("driver: local", "driver: cloudformation"))
    found = parse(tmp_path, pipelines)
    assert found["import_errors"] == {}
    queues = {task["queue"] for dag in found["dags"].values() for task in dag["tasks"].values()}
    assert queues == {"default"}


@pytest.mark.parametrize("gate", ["exploratory", "production"])
def test_approval_gates(parsed, gate):
    dag = parsed["dags"][f"sample_service_approve_{gate}"]
    assert dag["schedule"] is None and dag["doc_md"]
    # Only the approver role may decide, once the FAB auth manager enforces access_control.
    assert dag["access_control"] == {"ReleaseApprover": {"DAG Runs": ["can_create", "can_read"],
                                                         "DAGs": ["can_edit", "can_read"]}}
    tasks = dag["tasks"]
    # The demo config's mode: hitl (Airflow's ApprovalOperator, withdrawn when the run cannot go on).
    assert tasks["decision"]["type"] == "WithdrawableApprovalOperator"
    assert tasks["record_decision"]["upstream"] == ["decision"]
    assert tasks["record_decision"]["trigger_rule"] == "all_done"


def test_the_tasks_that_withdraw_a_request_exist_in_the_pipeline(parsed):
    from deployline.approvals import AWAIT_TASK, GATE_STAGES, WITHDRAWS

    tasks = parsed["dags"]["sample_service_pipeline"]["tasks"]
    for gate, stage in GATE_STAGES.items():
        assert f"{stage}.{AWAIT_TASK}" in tasks
        assert [t for t in WITHDRAWS.get(gate, ()) if t not in tasks] == []
    assert WITHDRAWS["exploratory"] and all(t.startswith("6-capacity.") for t in WITHDRAWS["exploratory"])
    # Every 6-capacity task but the teardown: a failed teardown does not stop the release.
    assert set(WITHDRAWS["exploratory"]) == {t for t in tasks if t.startswith("6-capacity.")} - {
        "6-capacity.teardown_environment"}


def test_exploratory_stage_asks_and_waits_without_a_worker_slot(parsed):
    tasks = parsed["dags"]["sample_service_pipeline"]["tasks"]
    assert tasks["5-exploratory.describe_release"]["upstream"] == ["3-acceptance.record_candidate", "resolve_commit"]
    assert tasks["5-exploratory.request_approval"]["type"] == "TriggerDagRunOperator"
    wait = tasks["5-exploratory.await_approval"]
    assert wait["type"] == "AwaitApprovalSensor" and wait["deferrable"] and wait["retries"] == 2
    assert wait["trigger_rule"] == "none_failed_min_one_success"
    assert wait["upstream"] == ["3-acceptance.record_candidate", "5-exploratory.request_approval"]
    assert tasks["5-exploratory.notify_approval_requested"]["type"] == "SnsPublishOperator"


def test_capacity_runs_beside_exploratory_and_always_tears_down(parsed):
    tasks = parsed["dags"]["sample_service_pipeline"]["tasks"]
    # Both start from the candidate: neither waits for the other.
    assert "3-acceptance.record_candidate" in tasks["6-capacity.provision_environment"]["upstream"]
    assert not any(t.startswith("5-") for t in tasks["6-capacity.provision_environment"]["upstream"])
    assert tasks["6-capacity.provision_environment"]["is_setup"]
    assert tasks["6-capacity.load_test_peak"]["upstream"] == [
        "6-capacity.load_test_expected", "6-capacity.wait_until_healthy", "resolve_commit"]
    teardown = tasks["6-capacity.teardown_environment"]
    assert teardown["is_teardown"] and teardown["trigger_rule"] == "all_done_setup_success"
    assert set(teardown["upstream"]) == {"6-capacity.provision_environment", "6-capacity.load_test_peak"}


def test_pre_production_is_the_fan_in_of_exploratory_and_capacity(parsed):
    tasks = parsed["dags"]["sample_service_pipeline"]["tasks"]
    entry = tasks["7-pre-production.check_release_ready"]
    # A failure or rejection on either side stops the release; it waits for both sides (all_success
    # would skip the rest, and end the run as a success, as soon as the load tests stop for a rejection).
    assert entry["trigger_rule"] == "none_failed_min_one_success"
    assert {"5-exploratory.await_approval", "6-capacity.record_capacity"} <= set(entry["upstream"])
    for name in ("update_environment", "smoke_test"):
        assert tasks[f"7-pre-production.{name}"]["pool"] == "deployline_sample_service_preproduction"


def test_production_asks_then_deploys_in_a_one_slot_pool(parsed):
    tasks = parsed["dags"]["sample_service_pipeline"]["tasks"]
    assert "7-pre-production.smoke_test" in tasks["8-production.describe_release"]["upstream"]
    assert tasks["8-production.request_approval"]["type"] == "TriggerDagRunOperator"
    wait = tasks["8-production.await_approval"]
    assert wait["type"] == "AwaitApprovalSensor" and wait["deferrable"] and wait["retries"] == 2
    verify = tasks["8-production.verify_approval"]  # the gate's own decision, not the sensor's state
    assert "8-production.await_approval" in verify["upstream"] and verify["retries"] == 4
    address = tasks["8-production.ensure_production_address"]
    assert address["upstream"] == ["8-production.verify_approval"] and address["is_setup"]
    deploy = tasks["8-production.deploy"]
    assert "8-production.ensure_production_address" in deploy["upstream"]
    assert deploy["pool"] == address["pool"] == "deployline_sample_service_production"
    clean_up = tasks["8-production.clean_up_environments"]
    # A teardown of the address, not of the deploy: it runs when the deploy failed or was killed.
    assert clean_up["is_teardown"] and clean_up["pool"] == deploy["pool"]
    assert clean_up["trigger_rule"] == "all_done_setup_success"
    assert set(clean_up["upstream"]) == {"8-production.deploy", "8-production.ensure_production_address"}


# Every wait on AWS happens in the triggerer: these tasks defer while a stack or an SSM command is in progress.
STACK_WAITS = ("3-acceptance.provision_environment", "3-acceptance.teardown_environment",
               "6-capacity.provision_environment", "6-capacity.teardown_environment",
               "7-pre-production.update_environment", "8-production.ensure_production_address",
               "8-production.clean_up_environments")
SSM_WAITS = ("1-baking.provision_builder", "3-acceptance.install_artifact")


def test_waits_on_aws_hold_no_worker_slot(parsed):
    tasks = parsed["dags"]["sample_service_pipeline"]["tasks"]
    for name in STACK_WAITS:
        assert tasks[name]["type"] == "StackOperator" and tasks[name]["deferrable"], name
    for name in SSM_WAITS:
        assert tasks[name]["type"] == "ProvisionInstanceOperator" and tasks[name]["deferrable"], name
    # The blue/green deploy: green's stack, its health behind the load balancer, the drain, blue's removal.
    deploy = tasks["8-production.deploy"]
    assert deploy["type"] == "BlueGreenDeployOperator" and deploy["deferrable"]
    assert tasks["1-baking.provision_builder"]["upstream"] == ["1-baking.launch_builder", "resolve_commit"]
    assert set(tasks["3-acceptance.install_artifact"]["upstream"]) == {
        "3-acceptance.launch_image_builder", "3-acceptance.select_inputs", "resolve_commit"}
    assert tasks["3-acceptance.provision_environment"]["retries"] == 1
    assert tasks["7-pre-production.update_environment"]["upstream"] == [
        "3-acceptance.record_candidate", "7-pre-production.check_pools", "resolve_commit"]


def test_support_infrastructure_dag(parsed):
    dag = parsed["dags"]["support_infrastructure"]
    assert dag["schedule"] is None and dag["doc_md"] and dag["max_active_runs"] == 1
    assert dag["params"] == ["action", "components", "force"]
    tasks = dag["tasks"]
    assert tasks["choose_action"]["upstream"] == ["plan"]
    for name in ("launch", "destroy", "report_status"):
        assert tasks[name]["upstream"] == ["choose_action", "plan"]
    for name in ("launch", "destroy"):  # one stack after the other, each waited for in the triggerer
        assert tasks[name]["type"] == "SupportInfrastructureOperator" and tasks[name]["deferrable"]


def test_delivery_metrics_dag_publishes_every_application_daily(parsed):
    dag = parsed["dags"]["delivery_metrics"]
    assert dag["schedule"] == "@daily" and dag["doc_md"] and dag["params"] == ["window_days"]
    applications = sorted(p.stem for p in (ROOT / "include/pipelines").glob("*.yaml"))
    assert applications and sorted(dag["tasks"]) == [f"publish_{app}" for app in applications]
    assert all(task["upstream"] == [] for task in dag["tasks"].values())  # one application never holds back another
