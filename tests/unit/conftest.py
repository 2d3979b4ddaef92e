import boto3
import psutil
import pytest
from deployline.environments.local import LocalDriver
from deployline.moto_atomic import make_conditional_puts_atomic
from moto import mock_aws

make_conditional_puts_atomic()  # moto checks a condition, then writes; S3 does both at once


@pytest.fixture
def s3(request, monkeypatch):
    """A moto S3 client (in process) with the test module's ``BUCKET`` created."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=request.module.BUCKET)
        yield client


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
