"""What the CloudFormation driver and the support infrastructure send to CloudFormation: shared by their tests."""

SERVICE_ROLE = "arn:aws:iam::123456789012:role/deployline-cloudformation"


def record_stack_changes(monkeypatch, cfn) -> list[tuple[str, str, str | None]]:
    """(operation, stack, RoleARN) of every create, update and delete made through ``cfn``."""
    calls = []
    for operation in ("create_stack", "update_stack", "delete_stack"):
        real = getattr(cfn, operation)

        def recorded(real=real, operation=operation, **kwargs):
            calls.append((operation, kwargs["StackName"], kwargs.get("RoleARN")))
            return real(**kwargs)

        monkeypatch.setattr(cfn, operation, recorded)
    return calls
