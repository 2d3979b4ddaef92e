"""Bad inputs that docs/RELIABILITY.md ("Bad input") lists and no other unit test covers.

Each test shows what the person who made the mistake sees: the error names what was wrong
(file, field, value, URL, bucket, S3 URI) and nothing is started on a bad input.
"""

import hashlib
import http.server
import json
import os
import subprocess
import threading
import types
from pathlib import Path

import botocore.endpoint
import psutil
import pytest
from airflow.exceptions import ParamValidationError
from airflow.serialization.serialized_objects import DagSerialization
from botocore.exceptions import ClientError
from deployline import artifacts, aws, embedded
from deployline.acceptance_stage import install_script
from deployline.config import PipelineConfigError, load_pipeline_config
from deployline.deployments import BEFORE_SWITCH, RolledBack
from deployline.pipeline import build_pipeline_dag
from deployline.releases import ReleaseRegistry
from deployline.self_service import build_self_service_dag
from deployline.sources import GitError, GitSource
from test_blue_green_local import V1, V2, deploy, spec, version_at
from test_config import VALID, write
from test_local_environments import BUCKET

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "include" / "pipelines" / "sample_service.yaml"
__all__ = ["BUCKET"]  # the s3 fixture creates the module's BUCKET


@pytest.fixture(scope="module")
def config():
    return load_pipeline_config(DEMO_CONFIG, environ={})


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# ---------------------------------------------------------------------- pipeline config: globs


@pytest.mark.parametrize(("change", "expected"), [
    (('"packer/*.json"', '"packer\\\\"'),
     r"infrastructure_paths.1: Value error, bad glob 'packer\\': Invalid git pattern"),
    (('"packer/*.json"', '"!"'), "infrastructure_paths.1: Value error, bad glob '!': Invalid git pattern"),
    (("artifact: dist/*.tar.gz", "artifact: /etc/*"),
     "commit_stage.artifact: Value error, must be a path inside the checkout, got '/etc/*'"),
    (("artifact: dist/*.tar.gz", "artifact: ../*.tar.gz"),
     "commit_stage.artifact: Value error, must be a path inside the checkout, got '../*.tar.gz'"),
])
def test_a_bad_glob_is_named_with_file_field_and_value(tmp_path, change, expected):
    path = write(tmp_path, VALID.replace(*change))
    with pytest.raises(PipelineConfigError) as err:
        load_pipeline_config(path, environ={"SHOP_REPO": "/srv/git/shop.git"})
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


# ---------------------------------------------------------------------- trigger forms


def server_params(dag):
    """The params as the API server holds them: it validates a trigger's conf against these."""
    return DagSerialization.from_dict(DagSerialization.to_dict(dag)).params


def trigger(params, conf: dict) -> dict:
    """What the API server does with a Trigger form or ``POST .../dagRuns`` (SerializedDAG.create_dagrun)."""
    return params.deep_merge(conf).validate()


@pytest.mark.parametrize("commit", ["main; rm -rf /", "HEAD~1", "abc", "a" * 41, "3f9c2a1 "])
def test_the_pipeline_form_refuses_a_commit_that_is_not_a_sha(config, commit):
    params = server_params(build_pipeline_dag(config))
    with pytest.raises(ParamValidationError) as err:
        trigger(params, {"commit": commit})
    assert str(err.value).startswith(f"Invalid input for param commit: {commit!r} does not match "
                                     "'^([0-9a-fA-F]{4,40})?$'")


def test_the_pipeline_form_takes_an_empty_or_hex_commit(config):
    params = server_params(build_pipeline_dag(config))
    assert trigger(params, {}) == {"commit": ""}
    assert trigger(params, {"commit": "3F9C2A1B"}) == {"commit": "3F9C2A1B"}
    assert trigger(params, {"commit": "a" * 40}) == {"commit": "a" * 40}


@pytest.mark.parametrize(("conf", "says"), [
    ({"owner": "alice smith"}, "Invalid input for param owner: 'alice smith' does not match"),
    ({"owner": "a" * 65}, "Invalid input for param owner: '" + "a" * 65 + "' is too long"),
    ({"owner": "alice", "action": "resize"}, "Invalid input for param action: 'resize' is not one of "
                                             "['launch', 'destroy']"),
    ({"owner": "alice", "version": "latest"}, "Invalid input for param version: 'latest' does not match"),
    ({"owner": "alice", "size": 0}, "Invalid input for param size: 0 is less than the minimum of 1"),
    ({"owner": "alice", "size": 4}, "Invalid input for param size: 4 is greater than the maximum of 3"),
    ({"owner": "alice", "size": 1.5}, "Invalid input for param size: 1.5 is not of type 'integer'"),
    ({"owner": "alice", "ttl_hours": 0}, "Invalid input for param ttl_hours: 0 is less than the minimum of 0.005"),
    ({"owner": "alice", "ttl_hours": 73}, "Invalid input for param ttl_hours: 73 is greater than the maximum of 72"),
])
def test_the_self_service_form_refuses_bad_fields(config, conf, says):
    params = server_params(build_self_service_dag(config))
    with pytest.raises(ParamValidationError) as err:
        trigger(params, conf)
    assert str(err.value).startswith(says)


def test_the_self_service_form_takes_an_owner_and_defaults(config):
    params = server_params(build_self_service_dag(config))
    # No owner: the run's triggering user owns it (validate_request); the form asks for nothing.
    assert trigger(params, {})["owner"] == ""
    assert trigger(params, {"owner": "alice"}) == {"action": "launch", "version": "", "owner": "alice", "size": 1,
                                                   "ttl_hours": 8}


# ---------------------------------------------------------------------- wrong git credentials


@pytest.fixture
def git_server():
    """An HTTP git remote that refuses every credential (401), and what it was sent."""
    seen = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_wrong_git_credentials_name_the_connection_never_the_secret(git_server, monkeypatch):
    host, seen = git_server
    monkeypatch.setenv("AIRFLOW_CONN_SHOP_GIT", json.dumps({"conn_type": "generic", "login": "bot",
                                                            "password": "wrong-t0ken"}))
    source = GitSource.connect(f"http://{host}/team/shop.git", "main", "shop_git")
    with pytest.raises(GitError) as err:
        source.head()
    message = str(err.value)
    assert message.startswith(f"git ls-remote failed for repository http://{host}/team/shop.git: ")
    assert "Authentication failed" in message
    assert "refused the credentials of Airflow connection 'shop_git' (repository.conn_id)" in message
    token = source._auth_env["GIT_CONFIG_VALUE_0"].split()[-1]
    assert f"Basic {token}" in seen  # the credentials were sent (in a header)...
    assert "wrong-t0ken" not in message and token not in message  # ...and never shown


def test_wrong_credentials_in_the_url_are_hidden(git_server):
    host, _ = git_server
    with pytest.raises(GitError) as err:
        GitSource(f"http://deploy:s3cr3t@{host}/team/shop.git", "main", timeout=20).head()
    message = str(err.value)
    assert f"failed for repository http://***@{host}/team/shop.git" in message
    assert "the repository refused the credentials in its URL (repository.url)" in message
    assert "s3cr3t" not in message


def test_no_credentials_for_a_private_repository(git_server):
    host, _ = git_server
    with pytest.raises(GitError, match="the repository needs credentials: set repository.conn_id"):
        GitSource(f"http://{host}/team/shop.git", "main", timeout=20).head()


# ---------------------------------------------------------------------- a missing bucket


def test_a_missing_bucket_names_the_bucket_and_the_config_field(s3, config, tmp_path):
    missing = config.model_copy(update={"aws": config.aws.model_copy(update={"artifact_bucket": "no-such-bkt"})})
    expected = (f"{missing.source_file}: aws.artifact_bucket: bucket 'no-such-bkt' does not exist "
                "(S3 answered NoSuchBucket): correct the field, or create the bucket")
    registry = ReleaseRegistry(s3, "no-such-bkt", missing.application, missing.source_file)
    # classify_change (the first task that reads the registry), then any record written
    with pytest.raises(artifacts.MissingBucketError) as err:
        registry.last_published(before_revision=1)
    assert str(err.value).startswith(expected)
    with pytest.raises(artifacts.MissingBucketError, match="bucket 'no-such-bkt' does not exist"):
        registry.update("r1-abcdef0", stages={"x": {"result": "failed"}})
    with pytest.raises(artifacts.MissingBucketError, match="bucket 'no-such-bkt' does not exist"):
        registry.get("r1-abcdef0")
    # 2-commit.publish_artifact
    dist = tmp_path / "shop-1.tar.gz"
    dist.write_bytes(b"release")
    with pytest.raises(artifacts.MissingBucketError) as err:
        ReleaseRegistry(s3, "no-such-bkt", "shop", missing.source_file).publish("r1-abcdef0", dist, tmp_path / "w")
    assert str(err.value).startswith(expected)
    # an environment's download
    with pytest.raises(artifacts.MissingBucketError, match="bucket 'no-such-bkt' does not exist"):
        artifacts.download_verified(s3, {"bucket": "no-such-bkt", "key": "k", "sha256": "0" * 64,
                                         "uri": "s3://no-such-bkt/k"}, tmp_path / "dl" / "a.tgz")


def test_the_registry_of_a_pipeline_names_its_config_file(s3, config, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws"}))
    missing = config.model_copy(update={"aws": config.aws.model_copy(update={"artifact_bucket": "no-such-bkt"})})
    with pytest.raises(artifacts.MissingBucketError, match=f"^{missing.source_file}: aws.artifact_bucket: "):
        ReleaseRegistry.for_config(missing).versions()


def test_an_artifact_missing_from_the_store_is_named(s3, tmp_path):
    artifact = {"bucket": BUCKET, "key": "shop/artifacts/r1-abcdef0/x.tgz", "sha256": "0" * 64,
                "uri": f"s3://{BUCKET}/shop/artifacts/r1-abcdef0/x.tgz"}
    with pytest.raises(artifacts.ArtifactError, match=f"artifact {artifact['uri']} is not in the artifact store"):
        artifacts.download_verified(s3, artifact, tmp_path / "a.tgz")
    assert not (tmp_path / "a.tgz").exists()


# ---------------------------------------------------------------------- a tampered artifact




def tamper(s3, artifact: dict) -> str:
    """Replace the object. The recorded object version would still give the tested bytes (see
    test_registry_and_artifacts), so the record loses its version, as one written before versioning:
    what is left is the sha256 check on every path, shown here."""
    body = b"a different release than the one tested"
    s3.put_object(Bucket=artifact["bucket"], Key=artifact["key"], Body=body)
    artifact["version_id"] = None
    return hashlib.sha256(body).hexdigest()


def test_the_refusal_names_the_uri_the_expected_and_the_actual_sha256(s3, published, tmp_path):
    artifact = published[V2]
    actual = tamper(s3, artifact)
    with pytest.raises(artifacts.ArtifactError) as err:
        artifacts.download_verified(s3, artifact, tmp_path / "a.tgz")
    assert str(err.value) == (f"artifact {artifact['uri']} has sha256 {actual}, the release record says "
                              f"{artifact['sha256']}: refusing a tampered or replaced artifact")


def test_an_in_place_update_refuses_a_tampered_artifact_and_keeps_the_old_version(s3, driver, published):
    name = "dl-shop-preproduction-tampered"
    first = driver.update(spec(published[V1], stage="preproduction", size=1, name=name))
    driver.wait_until_healthy(name, "/health", 30)
    running = children()
    tamper(s3, published[V2])
    with pytest.raises(artifacts.ArtifactError, match=f"artifact {published[V2]['uri']} has sha256 .*refusing"):
        driver.update(spec(published[V2], stage="preproduction", size=1, name=name))
    assert children() == running  # nothing new started, nothing stopped
    assert version_at(first.endpoint) == V1 and driver.get(name).version == V1
    assert not [p for p in (driver.root / name).iterdir() if V2 in p.name]  # no download left behind


def test_a_production_deploy_refuses_a_tampered_artifact_before_the_switch(s3, driver, published):
    live = deploy(driver, published[V1])
    running = children()
    tamper(s3, published[V2])
    with pytest.raises(RolledBack) as caught:
        deploy(driver, published[V2])
    assert caught.value.phase == BEFORE_SWITCH and caught.value.restored == V1
    assert "ArtifactError" in caught.value.reason and "refusing a tampered or replaced artifact" in caught.value.reason
    assert children() == running and version_at(live.endpoint) == V1
    assert [e.version for e in driver.list("shop")] == [V1]


def run_install(tmp_path: Path, artifact: dict, store: Path) -> subprocess.CompletedProcess:
    """The acceptance stage's install script, run by bash as SSM would on the builder.

    ``aws s3 cp`` is a stand-in that copies ``store`` (what the bucket holds); /tmp is the test's folder.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "aws").write_text(f'#!/bin/sh\ncp "{store}" "$5"\n')
    (bin_dir / "aws").chmod(0o755)
    provision = f'#!/bin/bash\necho "installed $1" > {tmp_path}/provisioned\n'
    script = install_script(V2, artifact, "PROVISION").replace("/tmp/", f"{tmp_path}/").replace("PROVISION", provision)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_the_application_image_refuses_a_tampered_artifact_before_provisioning(tmp_path, tarballs, published):
    artifact = published[V2]
    tampered = tmp_path / "tampered.tar.gz"
    tampered.write_bytes(b"a different release than the one tested")
    done = run_install(tmp_path, artifact, tampered)
    assert done.returncode == 1
    assert (f"artifact {artifact['uri']} has sha256 {artifacts.sha256_of(tampered)}, the release record says "
            f"{artifact['sha256']}: refusing a tampered or replaced artifact") in done.stderr
    assert not (tmp_path / "provisioned").exists()  # the provisioning script never ran
    assert not (tmp_path / f"deployline-{V2}.tar.gz").exists()

    done = run_install(tmp_path, artifact, tarballs[V2])  # the artifact that was tested
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "provisioned").read_text() == f"installed {tmp_path}/deployline-{V2}.tar.gz\n"


@pytest.mark.parametrize("sha256", ["", "not-a-digest", "0" * 63, "0" * 64 + "; reboot"])
def test_a_release_record_without_a_valid_sha256_installs_nothing(sha256):
    artifact = {"uri": "s3://bkt/shop/artifacts/r2/x.tgz", "sha256": sha256}
    with pytest.raises(artifacts.ArtifactError, match="s3://bkt/shop/artifacts/r2/x.tgz: the release record's "
                                                      "sha256 .* is not a sha256"):
        install_script(V2, artifact, "echo provision")


# ---------------------------------------------------------------------- throttling and 5xx answers

SLOW_DOWN = (503, "application/xml",
             b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (500, "application/xml",
            b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>")
THROTTLED = (400, "application/x-amz-json-1.1",
             json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode())
LISTING = (200, "application/xml", b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
           b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><KeyCount>0</KeyCount></ListBucketResult>')
PARAMETER = (200, "application/x-amz-json-1.1",
             json.dumps({"Parameter": {"Name": "/x", "Type": "String", "Value": "v"}}).encode())


@pytest.fixture
def flaky_aws(config, monkeypatch):
    """A local HTTP 'AWS' that gives the queued answers first, then ``ok``; the pipeline's connection points at it
    exactly as the embedded stack sets it up.  Backoff sleeps are recorded, not slept."""
    state = types.SimpleNamespace(queue=[], ok=None, requests=0, sleeps=[])

    class Flaky(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests += 1
            status, content_type, body = state.queue.pop(0) if state.queue else state.ok
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AIRFLOW_CONN_FLAKY_AWS", embedded.aws_connection_uri(endpoint))
    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=state.sleeps.append))
    state.config = config.model_copy(update={"aws": config.aws.model_copy(update={"conn_id": "flaky_aws"})})
    yield state
    server.shutdown()
    server.server_close()


def test_the_embedded_connection_sets_a_retry_policy():
    extra = json.loads(embedded.aws_connection_uri("http://127.0.0.1:5055"))["extra"]
    assert extra["config_kwargs"] == {"retries": {"mode": "standard", "max_attempts": 5}}


def test_s3_slow_down_answers_are_retried_with_backoff(flaky_aws):
    flaky_aws.queue, flaky_aws.ok = [SLOW_DOWN, SLOW_DOWN], LISTING
    registry = ReleaseRegistry.for_config(flaky_aws.config)  # as every stage builds it
    assert registry.s3_client.meta.config.retries == {"mode": "standard", "total_max_attempts": 6}
    assert registry.versions() == []
    assert flaky_aws.requests == 3 and len(flaky_aws.sleeps) == 2 and all(s > 0 for s in flaky_aws.sleeps)


def test_throttling_exceptions_are_retried_with_backoff(flaky_aws):
    flaky_aws.queue, flaky_aws.ok = [THROTTLED, THROTTLED], PARAMETER
    ssm = aws.ssm(flaky_aws.config)
    assert ssm.get_parameter(Name="/x")["Parameter"]["Value"] == "v"
    assert flaky_aws.requests == 3 and len(flaky_aws.sleeps) == 2 and all(s > 0 for s in flaky_aws.sleeps)


def test_after_the_last_attempt_the_error_says_what_and_how_often(flaky_aws):
    flaky_aws.ok = INTERNAL
    registry = ReleaseRegistry.for_config(flaky_aws.config)
    with pytest.raises(ClientError) as err:
        registry.versions()
    assert str(err.value) == ("An error occurred (InternalError) when calling the ListObjectsV2 operation "
                              "(reached max retries: 5): We encountered an internal error.")
    assert flaky_aws.requests == 6 and len(flaky_aws.sleeps) == 5
