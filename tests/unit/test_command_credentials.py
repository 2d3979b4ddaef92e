"""commit_stage.aws_role_arn: a build that needs AWS gets short-lived credentials of that role only."""

import json

import pytest
from deployline.commands import run_command
from deployline.commit_stage import _command_env
from deployline.config import load_pipeline_config
from moto import mock_aws
from test_config import VALID, write

ROLE = "arn:aws:iam::123456789012:role/shop-build"
COMMIT = {"version": "r3-abcdef0", "sha": "abcdef0123456789"}


@pytest.fixture
def connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "AKIAWORKERKEY", "password": "the-workers-secret",
         "extra": {"region_name": "us-east-1"}}))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-workers-secret")
    with mock_aws():
        yield


def config_with(tmp_path, role: str | None):
    text = VALID.replace("  artifact: dist/*.tar.gz\n", "  artifact: dist/*.tar.gz\n" + (
        f"  aws_role_arn: {role}\n" if role else ""))
    return load_pipeline_config(write(tmp_path, text), environ={"SHOP_REPO": "/srv/git/shop.git"})


def test_a_command_gets_the_roles_short_lived_credentials_never_the_workers(tmp_path, connection):
    env = _command_env(config_with(tmp_path, ROLE), COMMIT, "build")
    assert env["AWS_SESSION_TOKEN"] and env["AWS_ACCESS_KEY_ID"] != "AKIAWORKERKEY"
    assert env["AWS_SECRET_ACCESS_KEY"] != "the-workers-secret" and env["AWS_DEFAULT_REGION"] == "us-east-1"
    seen = run_command("env", tmp_path, 30, env=env)
    assert f"AWS_SESSION_TOKEN={env['AWS_SESSION_TOKEN']}" in seen
    assert not any("the-workers-secret" in line or "AIRFLOW_CONN" in line for line in seen)


def test_without_a_role_a_command_gets_no_aws_credentials(tmp_path, connection):
    env = _command_env(config_with(tmp_path, None), COMMIT, "build")
    assert not [key for key in env if key.startswith("AWS_")]
    assert env["DEPLOYLINE_VERSION"] == COMMIT["version"]


def test_the_role_must_be_a_role_arn(tmp_path):
    from deployline.config import PipelineConfigError

    with pytest.raises(PipelineConfigError, match="commit_stage.aws_role_arn: Value error, not an IAM role ARN"):
        config_with(tmp_path, "arn:aws:iam::123:user/me")
