"""AWS clients for a pipeline, through the amazon provider's hooks and the config's connection."""

from __future__ import annotations

from deployline.config import PipelineConfig


def _args(config: PipelineConfig) -> dict:
    return {"aws_conn_id": config.aws.conn_id, "region_name": config.aws.region}


def s3(config: PipelineConfig):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(**_args(config)).get_conn()


def ec2(config: PipelineConfig):
    from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

    return EC2Hook(api_type="client_type", **_args(config)).conn


def ssm(config: PipelineConfig):
    from airflow.providers.amazon.aws.hooks.ssm import SsmHook

    return SsmHook(**_args(config)).conn


def cloudformation(config: PipelineConfig):
    from airflow.providers.amazon.aws.hooks.cloud_formation import CloudFormationHook

    return CloudFormationHook(**_args(config)).get_conn()


def client(config: PipelineConfig, service: str):
    """Services the provider has no dedicated hook for (autoscaling, elbv2)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(client_type=service, **_args(config)).get_conn()


def environment_driver(config: PipelineConfig):
    """The environment driver the config chooses, with its clients."""
    settings = config.environments
    if settings.driver == "local":
        from deployline.environments.local import LocalDriver

        return LocalDriver(s3(config), settings.local)
    from deployline.environments.cloudformation import CloudFormationDriver

    return CloudFormationDriver(
        cloudformation(config), ssm(config), client(config, "autoscaling"), client(config, "elbv2"),
        settings.cloudformation, health_path=settings.health_path,
    )


def command_credentials(config: PipelineConfig, role_arn: str, session: str, seconds: int = 900) -> dict[str, str]:
    """Short-lived credentials of ``role_arn`` for one command (AssumeRole with the pipeline's
    connection), as the environment variables the AWS SDKs and CLI read; never the connection's own."""
    from airflow.providers.amazon.aws.hooks.sts import StsHook

    hook = StsHook(**_args(config))
    answer = hook.conn.assume_role(RoleArn=role_arn, RoleSessionName=session[:64], DurationSeconds=seconds)
    credentials = answer["Credentials"]
    env = {"AWS_ACCESS_KEY_ID": credentials["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"],
           "AWS_SESSION_TOKEN": credentials["SessionToken"], "AWS_DEFAULT_REGION": config.aws.region,
           "AWS_REGION": config.aws.region}
    endpoint = hook.conn_config.endpoint_url  # moto, or a VPC endpoint: where the role's credentials work
    return env | ({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})
