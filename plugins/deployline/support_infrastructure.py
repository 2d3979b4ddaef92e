"""``support_infrastructure``: stage 0, single-command launch or destroy of the shared infrastructure.

The same code as ``python -m deployline infra`` (``deployline.infrastructure``), with the
Airflow AWS connection.  The DAG reads nothing at parse time: the settings file
(``include/infrastructure.yaml``) is read when a run starts, and ``deployline.infrastructure``
(its pydantic models, CloudFormation and AWS code) is imported by the tasks, not by the parse.
"""

from __future__ import annotations

import logging

from airflow.sdk import DAG, Param, chain, get_current_context

from deployline.dag_defaults import START_DATE, default_args, with_trigger_form
from deployline.infrastructure_components import COMPONENTS
from deployline.infrastructure_operator import SupportInfrastructureOperator
from deployline.python_tasks import task

log = logging.getLogger(__name__)

DAG_ID = "support_infrastructure"

DOC = """\
## Stage 0: support infrastructure

Launch or destroy, in one run, the shared AWS resources every pipeline uses; one
CloudFormation stack per component, templates in `include/cloudformation/`, settings in
`include/infrastructure.yaml`:

| component | stack | what |
|---|---|---|
| `network` | `<prefix>-network` | VPC, public and private subnets in two availability zones |
| `artifact_store` | `<prefix>-artifact-store` | artifact bucket: versioned, encrypted, private, TLS only |
| `notifications` | `<prefix>-notifications` | the SNS topic |
| `ci_environment` | `<prefix>-ci-environment` | an instance running this project's `docker-compose.yaml` |

**Trigger** with `action` (`launch`, `destroy` or `status`) and `components`. Launch creates
what is missing, updates a stack whose template or settings changed, changes nothing
otherwise, and publishes every stack's outputs as SSM parameters (`/deployline/...`) where
pipelines and environments find them. `launch` and `destroy` go one stack after the
other and wait for each in the triggerer (deferred: no worker slot while CloudFormation
works); a failed stack fails the task at once with CloudFormation's reasons. Destroy
removes stacks and parameters in reverse order and **refuses** to remove an artifact
bucket that still holds release records, unless `force` is set. The same operations
without Airflow, for the first bootstrap: `python -m deployline infra up|down|status
[components]`.
"""


def build_support_infrastructure_dag() -> DAG:
    form = {
        "action": Param("launch", type="string", enum=["launch", "destroy", "status"], title="Action"),
        "components": Param(["all"], type="array", title="Components",
                            items={"type": "string", "enum": ["all", *COMPONENTS]},
                            description="all, or some of: " + ", ".join(COMPONENTS)),
        "force": Param(False, type="boolean", title="Force",
                       description="destroy: also delete an artifact bucket that still holds release records"),
    }
    with DAG(
        dag_id=DAG_ID,
        description="Stage 0: launch or destroy the shared infrastructure (network, artifact store, topic, CI)",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,  # two runs changing the same stacks at once would fight
        default_args=default_args(),
        tags=["deployline", "stage-0"],
        doc_md=DOC,
    ) as dag:

        @task(task_id="plan")
        def plan() -> dict:
            from deployline import infrastructure

            params = get_current_context()["params"]
            config = infrastructure.load_infrastructure_config()
            components = infrastructure.resolve_components(params["components"] or ["all"])
            if params["action"] == "destroy":
                components = list(reversed(components))
            log.info("%s %s (stacks %s-*, region %s, connection %s)", params["action"], ", ".join(components),
                     config.stack_prefix, config.region, config.conn_id)
            return {"action": params["action"], "components": components, "force": bool(params["force"])}

        @task.branch(task_id="choose_action")
        def choose_action(plan: dict) -> str:
            return {"launch": "launch", "destroy": "destroy", "status": "report_status"}[plan["action"]]

        @task(task_id="report_status")
        def report_status(plan: dict) -> list[dict]:
            from deployline import infrastructure

            config = infrastructure.load_infrastructure_config()
            found = infrastructure.status(infrastructure.clients_from_airflow(config), config, plan["components"])
            for item in found:
                log.info("%s", item.line())
            return [item.to_dict() for item in found]

        planned = plan()
        launch = SupportInfrastructureOperator(
            task_id="launch", action="launch", plan=planned,
            doc_md="Creates or updates each component's stack, dependencies first, and publishes its outputs in "
            "SSM; waits for every stack in the triggerer. Returns one result per component.")
        destroy = SupportInfrastructureOperator(
            task_id="destroy", action="destroy", plan=planned,
            doc_md="Deletes each component's stack and SSM parameters, dependents first; waits for every delete in "
            "the triggerer. Returns one result per component.")
        chain(planned, choose_action(planned), [launch, destroy, report_status(planned)])
    return with_trigger_form(dag, form)

