import textwrap

import pytest
from deployline.config import PipelineConfigError, load_all, load_pipeline_config
from deployline.dag_factory import check_configs

VALID = textwrap.dedent("""\
    application: shop
    repository:
      url: ${SHOP_REPO}
      branch: main
    polling:
      schedule: "*/5 * * * *"
    infrastructure_paths: ["infrastructure/**", "packer/*.json"]
    commit_stage:
      build: {command: make build, timeout: 60}
      unit_test: {command: make test}
      static_analysis: {command: make lint}
      artifact: dist/*.tar.gz
    aws:
      artifact_bucket: shop-artifacts
    """)


def write(tmp_path, text, name="shop.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_config_is_typed_and_expands_variables(tmp_path):
    config = load_pipeline_config(write(tmp_path, VALID), environ={"SHOP_REPO": "/srv/git/shop.git"})
    assert config.repository.url == "/srv/git/shop.git"
    assert config.commit_stage.build.timeout == 60
    assert config.commit_stage.unit_test.timeout == 900  # default
    assert config.aws.conn_id == "aws_default"
    assert config.pipeline_dag_id == "shop_pipeline"
    assert config.poll_dag_id == "shop_commit_poll"
    assert config.source_file.endswith("shop.yaml")


def test_shipped_demo_config_is_valid(project_root):
    config = load_pipeline_config(project_root / "include/pipelines/sample_service.yaml", environ={})
    assert config.application == "sample_service"
    assert config.repository.url == "/tmp/deployline-demo/sample-service.git"  # the ${VAR:-default}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("application: shop", "application: Shop!"), "application: String should match pattern"),
        (("  branch: main\n", "  branch: main\n  depth: 1\n"), "repository.depth: unknown field"),
        (("  artifact: dist/*.tar.gz\n", ""), "commit_stage.artifact: Field required"),
        (('"*/5 * * * *"', '"every five minutes"'), "polling.schedule: Value error, not a valid cron expression"),
        (("timeout: 60", "timeout: -1"), "commit_stage.build.timeout: Input should be greater than 0 (got -1)"),
        (("shop-artifacts", "Shop_Artifacts"), "aws.artifact_bucket: String should match pattern"),
        (('"packer/*.json"', '""'), "infrastructure_paths.1: Value error, empty glob"),
        (("${SHOP_REPO}", "${NOT_SET}"), "repository.url: environment variable ${NOT_SET} is not set"),
        (("aws:\n", "environments:\n  cloudformation:\n    service_role_arn: arn:aws:iam::123:role/cfn\naws:\n"),
         "environments.cloudformation.service_role_arn: Value error, not an IAM role ARN "
         "(arn:<partition>:iam::<12-digit account>:role/<path/name>) (got 'arn:aws:iam::123:role/cfn')"),
    ],
)
def test_each_invalid_field_is_named_with_file_and_problem(tmp_path, change, expected):
    path = write(tmp_path, VALID.replace(*change))
    with pytest.raises(PipelineConfigError) as err:
        load_pipeline_config(path, environ={"SHOP_REPO": "/srv/git/shop.git"})
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_cloudformation_service_role(tmp_path):
    environ = {"SHOP_REPO": "/srv/git/shop.git"}
    assert load_pipeline_config(write(tmp_path, VALID), environ=environ).environments.cloudformation \
        .service_role_arn is None
    with_role = VALID.replace("aws:\n", "environments:\n  cloudformation:\n    service_role_arn: ${CFN_ROLE:-}\naws:\n")
    path = write(tmp_path, with_role)
    # ${VAR:-} unset expands to "": no service role, as if the field were absent.
    assert load_pipeline_config(path, environ=environ).environments.cloudformation.service_role_arn is None
    for role in ("arn:aws:iam::123456789012:role/deployline-cloudformation",
                 "arn:aws-cn:iam::123456789012:role/cd/deployline-cloudformation"):
        config = load_pipeline_config(path, environ={**environ, "CFN_ROLE": role})
        assert config.environments.cloudformation.service_role_arn == role
    for wrong in ("arn:aws:iam::123456789012:user/deployer", "deployline-cloudformation",
                  "arn:aws:iam::123456789012:role/", "arn:aws:sts::123456789012:role/x"):
        with pytest.raises(PipelineConfigError, match="service_role_arn: Value error, not an IAM role ARN"):
            load_pipeline_config(path, environ={**environ, "CFN_ROLE": wrong})


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "application: shop\nrepository: [unclosed\n")
    expected = r"shop.yaml: malformed YAML at line 3, column 1: expected ',' or ']'"
    with pytest.raises(PipelineConfigError, match=expected):
        load_pipeline_config(path)


def test_not_a_mapping(tmp_path):
    with pytest.raises(PipelineConfigError, match="expected a mapping at the top level, got list"):
        load_pipeline_config(write(tmp_path, "- a\n- b\n"))


def test_application_must_match_file_name(tmp_path):
    path = write(tmp_path, VALID, name="store.yaml")
    with pytest.raises(PipelineConfigError, match="application: must match the file name 'store'"):
        load_pipeline_config(path, environ={"SHOP_REPO": "x"})


def test_workdir_must_stay_inside_the_checkout(tmp_path):
    path = write(tmp_path, VALID.replace("  build:", "  workdir: ../elsewhere\n  build:"))
    with pytest.raises(PipelineConfigError, match="commit_stage.workdir: Value error, must be a path inside"):
        load_pipeline_config(path, environ={"SHOP_REPO": "x"})


def test_a_broken_file_never_hides_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOP_REPO", "/srv/git/shop.git")
    monkeypatch.setenv("DEPLOYLINE_PIPELINES_DIR", str(tmp_path))
    write(tmp_path, VALID)
    write(tmp_path, VALID.replace("shop", "broken").replace("timeout: 60", "timeout: soon"), name="broken.yaml")
    configs, errors = load_all()
    assert [c.application for c in configs] == ["shop"]
    assert len(errors) == 1 and "broken.yaml" in str(errors[0])
    with pytest.raises(PipelineConfigError) as err:
        check_configs()
    assert "1 pipeline config(s) are invalid" in str(err.value)
    assert "broken.yaml: commit_stage.build.timeout: Input should be a valid integer" in str(err.value)


def test_self_service_defaults_must_fit_the_limits(tmp_path):
    text = VALID + "self_service: {default_ttl_hours: 100, max_ttl_hours: 72}\n"
    with pytest.raises(PipelineConfigError, match=r"self_service.default_ttl_hours \(100\) is above"):
        load_pipeline_config(write(tmp_path, text), environ={"SHOP_REPO": "x"})


def test_stages_6_to_8_settings(tmp_path):
    text = VALID.replace('schedule: "*/5 * * * *"', "schedule: null") + textwrap.dedent("""\
        capacity:
          expected: {users: 5, spawn_rate: 5, duration_seconds: 10, thresholds: {p95_ms: 100, min_rps: 20}}
        smoke_test: {command: "make smoke BASE_URL={base_url}"}
        production: {drain_seconds: 2}
        """)
    config = load_pipeline_config(write(tmp_path, text), environ={"SHOP_REPO": "x"})
    assert config.polling.schedule is None  # triggered by hand only
    assert config.capacity.expected.thresholds.p95_ms == 100
    assert config.capacity.expected.thresholds.max_error_rate == 0.01  # default
    assert config.capacity.peak.users == 40  # the default profile
    assert (config.production.drain_seconds, config.production.verify_seconds) == (2, 60)
    assert config.production_pool == "deployline_shop_production"


@pytest.mark.parametrize(("block", "expected"), [
    ("capacity: {expected: {users: 0, spawn_rate: 1, duration_seconds: 5}}",
     "capacity.expected.users: Input should be greater than or equal to 1 (got 0)"),
    ("capacity: {peak: {users: 5, spawn_rate: 1, duration_seconds: 5, thresholds: {max_error_rate: 2}}}",
     "capacity.peak.thresholds.max_error_rate: Input should be less than or equal to 1 (got 2)"),
    ("capacity: {expected: {users: 5, spawn_rate: 1, duration_seconds: 5, thresholds: {p90_ms: 5}}}",
     "capacity.expected.thresholds.p90_ms: unknown field"),
    ("production: {drain_seconds: -1}", "production.drain_seconds: Input should be greater than or equal to 0"),
    ("smoke_test: {command: ''}", "smoke_test.command: String should have at least 1 character"),
])
def test_bad_stage_settings_are_named(tmp_path, block, expected):
    path = write(tmp_path, VALID + block + "\n")
    with pytest.raises(PipelineConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_pipeline_config(path, environ={"SHOP_REPO": "x"})


@pytest.mark.parametrize(("change", "expected"), [
    (("timeout: 60", "timeout: true"), "commit_stage.build.timeout: Input should be a valid integer (got True)"),
    (("timeout: 60", 'timeout: "60"'), "commit_stage.build.timeout: Input should be a valid integer (got '60')"),
    (("aws:\n", "capacity: {expected: {users: 5, spawn_rate: 1, duration_seconds: 5, thresholds: {p95_ms: .inf}}}\n"
               "aws:\n"), "capacity.expected.thresholds.p95_ms: Input should be a finite number (got inf)"),
    (("aws:\n", "production: {verify_seconds: .nan}\naws:\n"),
     "production.verify_seconds: Input should be a finite number (got nan)"),
    (("${SHOP_REPO}", "https://deploy:ghp_secret@github.com/shop/shop.git"),
     "repository.url: Value error, credentials in the URL: put the login and token in the Airflow connection"),
    (("${SHOP_REPO}", "https://ghp_secret@github.com/shop/shop.git"), "repository.url: Value error, credentials"),
])
def test_no_coercion_no_infinity_no_credentials_in_urls(tmp_path, change, expected):
    """``timeout: true`` is not 1 s, ``.inf`` a threshold that never fails, a token in a URL shows everywhere."""
    path = write(tmp_path, VALID.replace(*change))
    with pytest.raises(PipelineConfigError) as err:
        load_pipeline_config(path, environ={"SHOP_REPO": "/srv/git/shop.git"})
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_ssh_urls_keep_their_user(tmp_path):
    for url in ("ssh://git@github.com/shop/shop.git", "git@github.com:shop/shop.git"):
        config = load_pipeline_config(write(tmp_path, VALID.replace("${SHOP_REPO}", url)), environ={})
        assert config.repository.url == url


def test_yaml_aliases_are_refused(tmp_path):
    """A few nested aliases expand to billions of nodes: every parse of the DAG files would pay."""
    bomb = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)])
    path = write(tmp_path, VALID + bomb + "\n")
    with pytest.raises(PipelineConfigError, match=r"YAML aliases \(\*name\) are not allowed"):
        load_pipeline_config(path, environ={"SHOP_REPO": "x"})


def test_a_config_file_has_a_size_limit(tmp_path):
    path = write(tmp_path, VALID + "#" + "x" * (256 * 1024) + "\n")
    with pytest.raises(PipelineConfigError, match=r"bytes, more than a pipeline config may have \(262144\)"):
        load_pipeline_config(path, environ={"SHOP_REPO": "x"})
