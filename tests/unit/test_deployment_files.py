"""The deployment files, checked as files (no Docker, no cluster).

docker-compose.yaml, Dockerfile, .env.example, .dockerignore, deploy/helm/values.yaml and
docs/DEPLOYMENT.md must agree with each other and with requirements.txt: one Airflow version,
one Python, one moto version, the services and settings the pipeline relies on.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

AIRFLOW_SERVICES = [
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-environments-worker",
    "airflow-triggerer",
]
REQUIRED_SERVICES = ["postgres", "redis", "moto", "airflow-init", *AIRFLOW_SERVICES]
ONE_SHOT_SERVICES = {"airflow-init", "airflow-cli"}  # run and exit: no health check
PROJECT_MOUNTS = {"dags": "/opt/airflow/dags", "plugins": "/opt/airflow/plugins", "include": "/opt/airflow/include"}


# --- helpers ---------------------------------------------------------------------------------

def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def _requirements_python() -> str:
    match = re.search(r"Python (\d+\.\d+)", (ROOT / "requirements.txt").read_text())
    assert match, "requirements.txt should say which Python its pins were resolved for"
    return match.group(1)


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with nothing set: the defaults."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _env(service: dict) -> dict[str, str]:
    """The service's environment as Compose builds it: its env_file(s), then ``environment``."""
    from deployline.embedded_cluster import shared_settings

    merged = {}
    for env_file in service.get("env_file") or []:
        merged |= shared_settings(ROOT / env_file)
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return merged | {key: _interpolate(str(value)) for key, value in env.items()}


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a service's short-syntax volumes."""
    mounts = {}
    for entry in service.get("volumes") or []:
        parts = str(entry).split(":")
        source, target = parts[0], parts[1]
        mounts[target] = (source, parts[2] if len(parts) > 2 else "rw")
    return mounts


def _image_tag(image: str) -> tuple[str, str]:
    name, _, tag = _interpolate(image).rpartition(":")
    return (name, tag) if name else (tag, "")


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return _pins()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())


# --- docker-compose.yaml ----------------------------------------------------------------------

def test_compose_file_defines_the_deployline_services(services):
    missing = [name for name in REQUIRED_SERVICES if name not in services]
    assert not missing, f"docker-compose.yaml lacks {missing}"
    assert "debug" in services["airflow-cli"]["profiles"]


def test_compose_airflow_services_wait_for_healthy_postgres_redis_and_a_finished_init(services):
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    init_depends = services["airflow-init"]["depends_on"]
    assert init_depends["postgres"]["condition"] == "service_healthy"
    assert init_depends["redis"]["condition"] == "service_healthy"
    # the bucket is created in moto, so init waits for it (optional for a real AWS account)
    assert init_depends["moto"]["condition"] == "service_healthy"
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"


def test_compose_runs_the_celery_executor_against_postgres_redis_and_the_api_server(services):
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert any(str(port).endswith(":8080") for port in services["airflow-apiserver"]["ports"])
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        env = _env(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql"), name
        assert "@postgres/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
        assert "@postgres/" in env["AIRFLOW__CELERY__RESULT_BACKEND"], name
        assert re.match(r"redis://[^/]*@redis:6379/", env["AIRFLOW__CELERY__BROKER_URL"]), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false", name
        assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"].lower() == "false", name
        # one JWT secret for all components, or task tokens fail between them
        assert env["AIRFLOW__API_AUTH__JWT_SECRET_CMD"], name  # one secret, from the auth volume
    assert services["airflow-worker"]["command"].startswith("celery worker")
    assert "container_name" not in services["airflow-worker"], "a named container cannot be scaled"
    assert not services["airflow-worker"].get("ports"), "a published port cannot be scaled"


def test_compose_connections_default_to_moto_and_the_api_server(services):
    env = _env(services["airflow-worker"])

    aws = urlsplit(env["AIRFLOW_CONN_AWS_DEFAULT"])
    assert aws.scheme == "aws"
    extra = {key: values[0] for key, values in parse_qs(aws.query).items()}
    endpoint = urlsplit(extra["endpoint_url"])
    assert endpoint.hostname == "moto", "the default AWS connection should point at the moto service"
    assert str(endpoint.port) in " ".join(services["moto"]["healthcheck"]["test"])
    assert extra["region_name"]

    # deployline_api: written by airflow-init with the read-only login, never an admin in a task.
    assert "AIRFLOW_CONN_DEPLOYLINE_API" not in env
    users = dict(u.split(":") for u in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(","))
    assert users["reader"] == "viewer"
    init = services["airflow-init"]["command"][-1]
    assert "airflow connections add deployline_api --conn-type http --conn-host http://airflow-apiserver:8080" in init
    assert '--conn-login "$reader"' in init.replace("$$", "$")


def test_compose_generates_its_secrets_binds_loopback_and_makes_the_pools(services):
    """No secret anyone knows by default, no port open to the network by default, pools at start."""
    for name in AIRFLOW_SERVICES:
        env = _env(services[name])
        for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY"):
            assert key not in env and env[f"{key}_CMD"].startswith("cat /opt/airflow/auth/"), (name, key)
        assert "deployline-auth:/opt/airflow/auth:ro" in services[name]["volumes"] or name == "airflow-apiserver"
    init = services["airflow-init"]
    assert "secrets.token_urlsafe" in init["command"][-1] and "chmod 600 /opt/airflow/auth/*" in init["command"][-1]
    assert "python -m deployline pools" in init["command"][-1]
    for key in ("DEPLOYLINE_ADMIN_PASSWORD", "DEPLOYLINE_APPROVER_PASSWORD", "DEPLOYLINE_READER_PASSWORD"):
        assert init["environment"][key].endswith(":-}"), f"{key} has a default password"
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert port.startswith("${DEPLOYLINE_BIND_ADDRESS:-127.0.0.1}:"), (name, port)


def test_compose_sets_the_deployline_variables(services):
    mounts = _mounts(services["airflow-worker"])
    for name in AIRFLOW_SERVICES:
        env = _env(services[name])
        for var in ("DEPLOYLINE_WORK_DIR", "DEPLOYLINE_PIPELINES_DIR", "DEPLOYLINE_ARTIFACT_BUCKET"):
            assert env.get(var), f"{name}: {var}"
        assert env["DEPLOYLINE_PIPELINES_DIR"].startswith(PROJECT_MOUNTS["include"] + "/"), name
    env = _env(services["airflow-worker"])
    assert env["DEPLOYLINE_WORK_DIR"] == "/opt/airflow/deployline"
    pipelines = ROOT / "include" / Path(env["DEPLOYLINE_PIPELINES_DIR"]).relative_to(PROJECT_MOUNTS["include"])
    assert pipelines.is_dir() and list(pipelines.glob("*.yaml")), pipelines
    assert str(Path(env["DEPLOYLINE_DEMO_REPO"]).parent) in mounts


def test_compose_and_helm_use_the_shared_airflow_settings(services, helm_values):
    """deploy/airflow.env is the one source: Compose reads it, Helm repeats it, the Celery cluster of
    make test-distributed starts with it (deployline.embedded_cluster)."""
    from deployline.embedded_cluster import SETTINGS_FILE, shared_settings

    shared = shared_settings()
    assert shared and all(key.startswith(("AIRFLOW__", "PYTHON")) for key in shared)
    for name in AIRFLOW_SERVICES:
        assert services[name]["env_file"] == [str(SETTINGS_FILE.relative_to(ROOT))], name
        env = services[name].get("environment") or {}
        assert not set(shared) & set(env), f"{name} overrides {set(shared) & set(env)}: change deploy/airflow.env"
    helm = {item["name"]: item["value"] for item in helm_values["env"] if "value" in item}
    missing = {k: v for k, v in shared.items() if helm.get(k) != v}
    assert not missing, f"deploy/helm/values.yaml env lacks or differs from deploy/airflow.env: {missing}"


def test_compose_long_running_services_have_healthchecks(services):
    for name, service in services.items():
        if name in ONE_SHOT_SERVICES:
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_mounts_project_folders_that_exist(services):
    for name in AIRFLOW_SERVICES:
        mounts = _mounts(services[name])
        for folder, target in PROJECT_MOUNTS.items():
            assert target in mounts, f"{name} does not mount ./{folder}"
            source, mode = mounts[target]
            assert (ROOT / source).resolve() == ROOT / folder, f"{name}: {source} -> {target}"
            assert (ROOT / folder).is_dir()
            assert mode == "ro", f"{name} should mount ./{folder} read-only"
        assert mounts["/opt/airflow/logs"][0] == "./logs", name
    init = _mounts(services["airflow-init"])
    for folder in ("plugins", "include"):  # it imports deployline and seeds include/sample-service
        assert init[PROJECT_MOUNTS[folder]][0] == f"./{folder}"


def test_compose_workers_share_nothing_but_git_and_the_environments_host_keeps_its_state(compose, services):
    # Any task on any worker: no work folder shared between workers (issue 16).
    work_dir = _env(services["airflow-worker"])["DEPLOYLINE_WORK_DIR"]
    assert work_dir not in _mounts(services["airflow-worker"]), "a scalable worker's work dir is its own"
    repo = Path(_env(services["airflow-worker"])["DEPLOYLINE_DEMO_REPO"]).parent
    source, mode = _mounts(services["airflow-worker"])[str(repo)]
    assert source in compose["volumes"] and mode == "ro", "the demo repository stands in for a git server"
    assert _mounts(services["airflow-init"])[str(repo)][0] == source, "airflow-init seeds it"
    host = services["airflow-environments-worker"]
    assert host["command"].split("--queues ")[1].split(",")[0] == "deployline_local_environments"
    assert "default" in services["airflow-worker"]["command"]
    state, mode = _mounts(host)[work_dir]
    assert state in compose["volumes"] and mode == "rw", "the local environments' state outlives a restart"


def test_compose_builds_the_deployline_image_from_the_dockerfile(services, pins):
    for name in [*AIRFLOW_SERVICES, "airflow-init", "airflow-cli"]:
        service = services[name]
        build = service["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").resolve() == ROOT / "Dockerfile", name
        image, tag = _image_tag(service["image"])
        assert image == "deployline-airflow", name
        assert tag.split("-")[0] == pins["apache-airflow"], f"{name}: tag {tag}"


def test_compose_third_party_images_are_pinned(services, pins):
    for name in ("postgres", "redis", "moto"):
        image, tag = _image_tag(services[name]["image"])
        assert tag and tag != "latest", f"{name}: pin the image ({services[name]['image']})"
        assert re.match(r"\d", tag), f"{name}: {tag} is not a version"
    assert _image_tag(services["postgres"]["image"])[1].split(".")[0] == "16"
    moto_image, moto_tag = _image_tag(services["moto"]["image"])
    assert moto_image == "motoserver/moto"
    assert moto_tag == pins["moto"], "the moto image must be the moto version of requirements.txt"


# --- Dockerfile, .env.example, .dockerignore --------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_base_image_matches_the_requirements_pins(pins):
    froms = [rest for keyword, rest in _dockerfile() if keyword == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"apache/airflow:(\d+\.\d+\.\d+)-python(\d+\.\d+)", froms[0])
    assert match, f"FROM {froms[0]}: expected apache/airflow:<version>-python<major.minor>"
    assert match.group(1) == pins["apache-airflow"], "the FROM tag's Airflow must be the pinned apache-airflow"
    assert match.group(2) == _requirements_python(), "the image's Python must be the one requirements.txt is for"


def test_dockerfile_installs_git_and_the_requirements_as_the_airflow_user():
    instructions = _dockerfile()
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    assert any("apt-get install" in run and re.search(r"\bgit\b", run) for run in runs)
    pip = [run for run in runs if "pip install" in run]
    assert len(pip) == 1
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in pip[0] and "-r /requirements.txt" in pip[0]
    assert "--no-cache-dir" in pip[0]
    users = [(index, rest) for index, (keyword, rest) in enumerate(instructions) if keyword == "USER"]
    pip_index = next(index for index, (keyword, rest) in enumerate(instructions) if rest == pip[0])
    user_at_pip = [rest for index, rest in users if index < pip_index][-1]
    assert user_at_pip == "airflow", "pip must run as the airflow user"
    assert users[-1][1] == "airflow", "the image must end as the airflow user"
    copies = " ".join(rest for keyword, rest in instructions if keyword == "COPY")
    assert "requirements.txt" in copies
    for folder in PROJECT_MOUNTS:
        assert f"{folder}/ /opt/airflow/{folder}/" in copies, f"{folder}/ is not baked into the image"


def test_env_example_sets_airflow_uid_and_the_logins():
    settings = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["AIRFLOW_UID"] == "50000"
    for key in ("DEPLOYLINE_ADMIN_USERNAME", "DEPLOYLINE_APPROVER_USERNAME", "DEPLOYLINE_READER_USERNAME"):
        assert key in settings, key
    assert not any(key.endswith("PASSWORD") for key in settings), "no password in .env.example: they are generated"
    compose_text = (ROOT / "docker-compose.yaml").read_text()
    for key in settings:
        assert "${" + key in compose_text, f"{key} in .env.example is not used by docker-compose.yaml"


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for pattern in (".git", ".venv", ".demo", ".env"):
        assert pattern in patterns, pattern
    for needed in ("dags", "plugins", "include", "requirements.txt"):
        assert needed not in patterns, f"{needed} is needed by the Dockerfile"


# --- deploy/helm/values.yaml ------------------------------------------------------------------

def test_helm_values_run_the_deployline_image_with_the_kubernetes_executor(helm_values, services, pins):
    assert helm_values["executor"] == "KubernetesExecutor"
    assert helm_values["airflowVersion"] == pins["apache-airflow"]
    image = helm_values["images"]["airflow"]
    assert image["repository"].rsplit("/", 1)[-1] == "deployline-airflow"
    assert str(image["tag"]) == _image_tag(services["airflow-worker"]["image"])[1]
    assert helm_values["triggerer"]["enabled"] is True
    assert helm_values["apiServer"]["enabled"] is True
    assert helm_values["dagProcessor"]["enabled"] is True
    assert helm_values["dags"]["gitSync"]["enabled"] is False, "the DAGs are baked into the image"


def test_helm_values_take_connections_from_secrets_and_share_no_work_dir(helm_values):
    secrets = {entry["envName"]: entry for entry in helm_values["secret"]}
    for conn in ("AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_DEPLOYLINE_API"):
        assert secrets[conn]["secretName"] and secrets[conn]["secretKey"], conn
    env = {entry["name"]: entry.get("value") for entry in helm_values["env"]}
    plaintext = [name for name in env if re.search(r"AIRFLOW_CONN_|SECRET|PASSWORD|ACCESS_KEY", name)]
    assert not plaintext, f"credentials in plain values: {plaintext}"
    assert env["DEPLOYLINE_WORK_DIR"] and env["DEPLOYLINE_PIPELINES_DIR"] and env["DEPLOYLINE_ARTIFACT_BUCKET"]

    # Task pods share no volume: any task runs in any pod (workspaces in S3, issue 16).
    workers = helm_values["workers"]
    assert not workers.get("extraVolumes") and not workers.get("extraVolumeMounts")
    all_mounts = {mount["mountPath"] for mount in helm_values["volumeMounts"]}
    assert env["DEPLOYLINE_PIPELINES_DIR"] in all_mounts
    assert helm_values["postgresql"]["enabled"] is False and helm_values["data"]["metadataSecretName"]


# --- docs/DEPLOYMENT.md -----------------------------------------------------------------------

def test_deployment_doc_covers_compose_and_helm():
    doc = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    for phrase in (
        'echo "AIRFLOW_UID=$(id -u)" > .env',
        "docker compose build",
        "docker compose up -d",
        "--scale airflow-worker=3",
        "http://localhost:8080",
        "deployline_<app>_production",
        "deployline_<app>_preproduction",
        "helm repo add apache-airflow https://airflow.apache.org",
        "-f deploy/helm/values.yaml",
    ):
        assert phrase in doc, phrase
