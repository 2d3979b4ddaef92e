"""Airflow plugin: Deployline's delivery insight in the Airflow UI (releases, traces, DORA metrics).

The API server mounts ``deployline.insight_app`` at ``/deployline``; the UI gets a "Deployline"
entry in its navigation and a "Releases" tab on each pipeline's DAG page, both shown in the
Airflow UI's frame.  Everything is read from the release registry, not the Airflow database.
"""

from airflow.plugins_manager import AirflowPlugin


def _app():
    from deployline.insight_app import create_app

    return create_app()


class DeploylineInsightPlugin(AirflowPlugin):
    name = "deployline_insight"
    fastapi_apps = [{"app": _app(), "url_prefix": "/deployline", "name": "Deployline delivery insight"}]
    external_views = [
        {"name": "Deployline", "href": "deployline/", "url_route": "deployline", "destination": "nav",
         "nav_top_level": True},
        {"name": "Releases", "href": "deployline/pipelines/{DAG_ID}", "url_route": "deployline-releases",
         "destination": "dag"},
    ]
