import boto3
import psutil
import pytest
from deployline.environments.local import LocalDriver
from deployline.moto_server import close_gaps
from deployline.releases import ReleaseRegistry
from moto import mock_aws

close_gaps()  # as on AWS: atomic conditional writes, versioned template buckets (moto_server)


@pytest.fixture
def s3(request, monkeypatch):
    """A moto S3 client (in process) with the test module's ``BUCKET`` created."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=request.module.BUCKET)
        client.put_bucket_versioning(Bucket=request.module.BUCKET, VersioningConfiguration={"Status": "Enabled"})
        yield client


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto as a server in this process, on a free port of 127.0.0.1: a test can hold an object
    (an image, a stack, a command) in a state by changing it in moto's backend."""
    from deployline.embedded import free_port
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def root(tmp_path):
    """The environments' root; afterwards every environment in it is torn down, even when a test failed."""
    root = tmp_path / "environments"
    yield root
    driver = LocalDriver(None, root=root)
    for state in root.glob("*/state.json"):  # environments and routers
        driver.teardown(state.parent.name)
    for process in psutil.process_iter(["cwd"]):  # belt and braces: anything still running in there
        if (process.info["cwd"] or "").startswith(str(root)):
            process.kill()


@pytest.fixture
def driver(s3, root):
    return LocalDriver(s3, root=root)


@pytest.fixture(scope="module")
def tarballs(request, tmp_path_factory):
    """The sample service built as the test module's versions ``V1`` and ``V2``."""
    from test_local_environments import build_artifact

    out = tmp_path_factory.mktemp("dist")
    return {version: build_artifact(out, version) for version in (request.module.V1, request.module.V2)}


@pytest.fixture
def published(request, s3, tarballs, tmp_path):
    """``tarballs`` published to the module's ``BUCKET``, under its ``APP`` (default ``shop``)."""
    registry = ReleaseRegistry(s3, request.module.BUCKET, getattr(request.module, "APP", "shop"))
    return {v: registry.publish(v, path, tmp_path / "publish")[0].to_dict() for v, path in tarballs.items()}
