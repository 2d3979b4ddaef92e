import boto3
import pytest
from moto import mock_aws


@pytest.fixture
def s3(request, monkeypatch):
    """A moto S3 client (in process) with the test module's ``BUCKET`` created."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=request.module.BUCKET)
        yield client
