# Deployline's Airflow image: the official Apache Airflow image, git, the pinned requirements and
# the project (DAGs, the deployline library, pipeline configs, templates, the sample service).
#
#   docker compose build                                   # tags it deployline-airflow:3.3.2
#   docker build -t <registry>/deployline-airflow:3.3.2 .  # for the Helm chart (docs/DEPLOYMENT.md)
#
# The tag's Airflow version must equal the apache-airflow pin in requirements.txt, and its Python
# the Python the pins were resolved for (3.11); tests/unit/test_deployment_files.py checks both.
FROM apache/airflow:3.3.2-python3.11

# git: the commit stage clones and polls repositories (sources.py runs the git CLI).
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && apt-get autoremove -yqq --purge \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
USER airflow

# The official image wants "apache-airflow==${AIRFLOW_VERSION}" (set by the base image) on the
# pip command line, so that installing requirements never up- or downgrades Airflow itself.
# requirements.txt pins apache-airflow==3.3.2 too: both agree while the FROM tag and the pin agree,
# and if someone bumps only one of them pip stops here with a conflict instead of building an
# image with two ideas of the Airflow version.
COPY --chown=airflow:0 requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt

# Baked in so that the image runs on its own (Kubernetes); docker-compose.yaml mounts the same
# folders from the checkout over these for local work.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 include/ /opt/airflow/include/
# The work directory exists in the image so that a new named volume mounted there starts out
# owned by the airflow user.
RUN mkdir -p /opt/airflow/deployline

# plugins/ is on Airflow's import path already; PYTHONPATH makes `deployline` importable from
# plain `python` too (airflow-init, the CLI container).
ENV PYTHONPATH=/opt/airflow/plugins \
    DEPLOYLINE_PIPELINES_DIR=/opt/airflow/include/pipelines \
    DEPLOYLINE_WORK_DIR=/opt/airflow/deployline
