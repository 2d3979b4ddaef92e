"""Baking AMIs: a builder instance, provisioned through SSM Run Command, imaged, then terminated.

Plain boto3 clients are passed in, so the same functions serve tasks, the CLI and tests.
Every step is safe to retry: the builder is found by its ``deployline:builder=<key>``
tag before a new one is launched (and ``run_instances`` carries a ``ClientToken``
derived from the key, then from the key and the terminated builder it names, when a
stage is rerun after its teardown), and an image is found by its name before a new one
is created, so a retried task never makes a second instance or AMI.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any

from botocore.exceptions import ClientError, WaiterError
from botocore.parsers import ResponseParserError

log = logging.getLogger(__name__)

BUILDER_TAG = "deployline:builder"
AMI_ID = re.compile(r"^ami-[0-9a-f]{8,17}$")
SSM_PREFIX = "resolve:ssm:"
# AMI names: 3-128 characters of letters, digits and ( ) [ ] . / - ' @ _ and space.
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9()\[\]./\-'@_ ]{3,128}$")

# Image states that will never become ``available``.
BROKEN_IMAGE_STATES = frozenset({"failed", "invalid", "deregistered", "error", "missing"})
_MISSING_IMAGE_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable", "InvalidAMIID.Malformed"})

# SSM command invocation statuses (GetCommandInvocation).
SSM_SUCCESS = "Success"
SSM_IN_PROGRESS = frozenset({"Pending", "InProgress", "Delayed"})
# Anything else is terminal: Failed, Cancelled, TimedOut, Cancelling, Undeliverable,
# Terminated, InvalidPlatform, AccessDenied, ...
_OUTPUT_TAIL = 2000
# Builders one key may have launched and seen terminated (its stage cleared and rerun that often).
MAX_RELAUNCHES = 20


class ImageError(RuntimeError):
    """Baking an image failed; the message says which step, which resource and why."""


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# --------------------------------------------------------------------------- base image


def resolve_base_image(ssm_client, spec: str) -> str:
    """An AMI id for ``spec``: ``ami-...`` as is, ``resolve:ssm:<parameter>`` read from SSM."""
    spec = spec.strip()
    if AMI_ID.match(spec):
        return spec
    if not spec.startswith(SSM_PREFIX):
        raise ImageError(f"base image {spec!r}: expected an AMI id (ami-...) or resolve:ssm:<parameter>")
    parameter = spec[len(SSM_PREFIX) :]
    if not parameter:
        raise ImageError(f"base image {spec!r}: no SSM parameter named after {SSM_PREFIX!r}")
    try:
        value = ssm_client.get_parameter(Name=parameter)["Parameter"]["Value"]
    except ClientError as exc:
        if _error_code(exc) in ("ParameterNotFound", "ParameterVersionNotFound"):
            raise ImageError(f"base image: SSM parameter {parameter} does not exist") from exc
        raise ImageError(f"base image: cannot read SSM parameter {parameter}: {exc}") from exc
    value = value.strip()
    if not AMI_ID.match(value):
        raise ImageError(f"base image: SSM parameter {parameter} holds {value!r}, not an AMI id")
    return value


# --------------------------------------------------------------------------- builder instance


def client_token(key: str) -> str:
    """The ``run_instances`` idempotency token for a builder key (at most 64 ASCII characters)."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
    return f"deployline-{digest}"


def _builder_filter(key: str, states: list[str]) -> list[dict[str, Any]]:
    return [
        {"Name": f"tag:{BUILDER_TAG}", "Values": [key]},
        {"Name": "instance-state-name", "Values": states},
    ]


def _find_builders(ec2_client, key: str, states: list[str]) -> list[dict]:
    paginator = ec2_client.get_paginator("describe_instances")
    instances = []
    for page in paginator.paginate(Filters=_builder_filter(key, states)):
        for reservation in page["Reservations"]:
            instances.extend(reservation["Instances"])
    return sorted(instances, key=lambda i: (i.get("LaunchTime") or 0, i["InstanceId"]))


def _root_volume(ec2_client, image_id: str) -> dict[str, Any] | None:
    """The base image's root EBS mapping as ``{"DeviceName", "VolumeSize"?}`` (None if not EBS-backed)."""
    try:
        images = ec2_client.describe_images(ImageIds=[image_id])["Images"]
    except ClientError as exc:
        if _error_code(exc) in _MISSING_IMAGE_CODES:
            raise ImageError(f"base image {image_id} does not exist or is not visible to this account") from exc
        raise
    if not images:
        raise ImageError(f"base image {image_id} does not exist or is not visible to this account")
    image = images[0]
    if image.get("State") not in (None, "available"):
        raise ImageError(f"base image {image_id} is {image.get('State')}, not available")
    device = image.get("RootDeviceName")
    if image.get("RootDeviceType", "ebs") != "ebs" or not device:
        return None
    root: dict[str, Any] = {"DeviceName": device}
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == device and mapping.get("Ebs", {}).get("VolumeSize"):
            # Same size as the AMI's snapshot (moto insists on a size or a snapshot id).
            root["VolumeSize"] = mapping["Ebs"]["VolumeSize"]
    return root


def launch_builder(
    ec2_client,
    *,
    key: str,
    image_id: str,
    instance_type: str,
    subnet_id: str | None = None,
    instance_profile: str | None = None,
    tags: dict[str, str] | None = None,
    encrypt_root: bool = True,
    waiter_delay: int = 5,
    waiter_max_attempts: int = 60,
) -> str:
    """The builder instance for ``key``, launched unless one is already pending or running.

    IMDSv2 only; the root volume is encrypted (account default EBS key) and deleted with the
    instance; instance and volumes carry ``deployline:builder=<key>`` plus ``tags``.
    Waits until the instance is running and returns its id.
    """
    if not key:
        raise ImageError("builder key must not be empty")
    existing = _find_builders(ec2_client, key, ["pending", "running"])
    if existing:
        instance_id = existing[0]["InstanceId"]
        if len(existing) > 1:
            log.warning("several builders for %s: %s; using %s", key, [i["InstanceId"] for i in existing], instance_id)
        log.info("reusing builder %s for %s (%s)", instance_id, key, existing[0]["State"]["Name"])
    else:
        all_tags = {"Name": f"deployline-builder {key}"[:255], **(tags or {}), BUILDER_TAG: key}
        request: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token(key),
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": _tag_list(all_tags)},
                {"ResourceType": "volume", "Tags": _tag_list(all_tags)},
            ],
        }
        root = _root_volume(ec2_client, image_id)
        if encrypt_root and root:
            ebs = {"Encrypted": True, "DeleteOnTermination": True}
            if "VolumeSize" in root:
                ebs["VolumeSize"] = root["VolumeSize"]
            request["BlockDeviceMappings"] = [{"DeviceName": root["DeviceName"], "Ebs": ebs}]
        if subnet_id:
            request["SubnetId"] = subnet_id
        if instance_profile:
            field = "Arn" if instance_profile.startswith("arn:") else "Name"
            request["IamInstanceProfile"] = {field: instance_profile}
        for _ in range(MAX_RELAUNCHES):
            try:
                instance = ec2_client.run_instances(**request)["Instances"][0]
            except ClientError as exc:
                if _error_code(exc) == "IdempotentParameterMismatch":
                    raise ImageError(
                        f"builder {key}: an earlier launch with this key used other parameters; use a new key"
                    ) from exc
                raise ImageError(f"builder {key}: run_instances failed: {exc}") from exc
            instance_id = instance["InstanceId"]
            state = instance.get("State", {}).get("Name")
            if state not in ("shutting-down", "terminated"):
                break
            # The ClientToken returned an earlier launch, terminated since (AWS keeps a token for 24 h
            # after that): the stage was cleared and rerun after its teardown. The next token follows
            # from that instance, so a retry of this launch walks to the same new instance.
            log.info("builder %s for %s was %s; launching the next one", instance_id, key, state)
            request["ClientToken"] = client_token(f"{key}#{instance_id}")
        else:
            raise ImageError(f"builder {key}: {MAX_RELAUNCHES} launches with this key ended; use a new key")
        if state in ("stopping", "stopped"):
            raise ImageError(f"builder {key}: its instance {instance_id} is already {state}; use a new key")
        log.info("launched builder %s for %s from %s", instance_id, key, image_id)
    try:
        ec2_client.get_waiter("instance_running").wait(
            InstanceIds=[instance_id],
            WaiterConfig={"Delay": waiter_delay, "MaxAttempts": waiter_max_attempts},
        )
    except WaiterError as exc:
        raise ImageError(f"builder {instance_id} for {key} did not reach running: {exc}") from exc
    return instance_id


def terminate_builders(ec2_client, *, key: str) -> list[str]:
    """Terminate every builder instance tagged ``deployline:builder=<key>``; returns their ids."""
    instances = _find_builders(ec2_client, key, ["pending", "running", "stopping", "stopped"])
    ids = [i["InstanceId"] for i in instances]
    if ids:
        ec2_client.terminate_instances(InstanceIds=ids)
        log.info("terminated builders %s for %s", ids, key)
    return ids


# --------------------------------------------------------------------------- provisioning


def _provision_commands(script: str, token: str) -> list[str]:
    """Shell lines that write ``script`` to a file and run it, so its ``#!`` line is honoured."""
    path = f"/tmp/deployline-provision-{token}.sh"
    delimiter = f"DEPLOYLINE_PROVISION_{token.upper()}"
    return [
        "set -e",
        f"cat > {path} <<'{delimiter}'",
        *script.splitlines(),
        delimiter,
        f"chmod 700 {path}",
        f"{path}",
    ]


def _tail(text: str | None, limit: int = _OUTPUT_TAIL) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def send_provisioning(
    ssm_client,
    instance_id: str,
    script: str,
    timeout: int,
    comment: str = "",
    *,
    poll_interval: float = 5.0,
    delivery_timeout: int = 600,
) -> str:
    """Send ``script`` to the builder with SSM ``AWS-RunShellScript``; returns the command id.

    A builder whose SSM agent has not registered yet is retried for ``delivery_timeout`` seconds
    (the agent registers a little after the instance is running).
    """
    delivery_deadline = time.monotonic() + delivery_timeout
    while True:
        command_id = try_send_provisioning(ssm_client, instance_id, script, timeout, comment,
                                           delivery_timeout=delivery_timeout)
        if command_id:
            return command_id
        if time.monotonic() > delivery_deadline:
            raise ImageError(f"provisioning {instance_id}: its SSM agent did not register in {delivery_timeout}s")
        log.info("SSM agent on %s not registered yet; retrying", instance_id)
        time.sleep(poll_interval)


def try_send_provisioning(ssm_client, instance_id: str, script: str, timeout: int, comment: str = "", *,
                          delivery_timeout: int = 600) -> str | None:
    """One ``send_provisioning`` try: the command id, or None while the instance's SSM agent is not
    registered (``InvalidInstanceId``); any other refusal raises ImageError."""
    token = hashlib.sha256(f"{instance_id}\0{script}".encode()).hexdigest()[:12]
    request = {
        "InstanceIds": [instance_id],
        "DocumentName": "AWS-RunShellScript",
        "Parameters": {"commands": _provision_commands(script, token), "executionTimeout": [str(int(timeout))]},
        "TimeoutSeconds": max(30, min(int(delivery_timeout), 2592000)),
        "Comment": comment[:100],
    }
    try:
        command_id = ssm_client.send_command(**request)["Command"]["CommandId"]
    except ClientError as exc:
        if _error_code(exc) != "InvalidInstanceId":
            raise ImageError(f"provisioning {instance_id}: send_command failed: {exc}") from exc
        return None
    log.info("provisioning %s: SSM command %s", instance_id, command_id)
    return command_id


def command_invocation(ssm_client, command_id: str, instance_id: str) -> dict:
    """GetCommandInvocation; ``{"Status": "Pending"}`` while SSM does not know the invocation yet."""
    try:
        return ssm_client.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    except ClientError as exc:
        # Right after send_command the invocation may not exist yet.
        if _error_code(exc) != "InvocationDoesNotExist":
            raise ImageError(f"provisioning {instance_id}: command {command_id}: {exc}") from exc
        return {"Status": "Pending"}


def invocation_failure(instance_id: str, command_id: str, invocation: dict) -> str:
    """Why a finished invocation failed: its status, details, exit code and the tail of stderr (or stdout)."""
    status = invocation.get("Status", "")
    details = invocation.get("StatusDetails") or status
    code = invocation.get("ResponseCode")
    tail = _tail(invocation.get("StandardErrorContent")) or _tail(invocation.get("StandardOutputContent")) \
        or "(no output)"
    return f"provisioning {instance_id}: command {command_id} ended {status} ({details}, exit code {code}): {tail}"


def provisioning_result(ssm_client, command_id: str, instance_id: str, waited: float | None = None,
                        invocation: dict | None = None) -> dict:
    """``{"command_id", "status", "output"}`` of a finished command; :class:`ImageError` for any other status.

    A command still in progress (``waited`` seconds after it was sent: the wait gave up) is cancelled.
    ``invocation``: its GetCommandInvocation answer when the caller has it (else it is asked for).
    """
    invocation = invocation or command_invocation(ssm_client, command_id, instance_id)
    status = invocation.get("Status", "")
    if status in SSM_IN_PROGRESS:
        try:
            ssm_client.cancel_command(CommandId=command_id, InstanceIds=[instance_id])
        except Exception:  # best effort: the command is given up on either way
            log.warning("could not cancel SSM command %s", command_id, exc_info=True)
        after = f" after {waited:g}s" if waited is not None else ""
        raise ImageError(f"provisioning {instance_id}: command {command_id} still {status}{after}")
    if status != SSM_SUCCESS:
        raise ImageError(invocation_failure(instance_id, command_id, invocation))
    return {"command_id": command_id, "status": status, "output": invocation.get("StandardOutputContent", "") or ""}


def run_provisioning(
    ssm_client,
    instance_id: str,
    script: str,
    timeout: int,
    comment: str = "",
    *,
    poll_interval: float = 5.0,
    delivery_timeout: int = 600,
) -> dict:
    """Run ``script`` on the builder with SSM ``AWS-RunShellScript`` and wait here for the result.

    Returns ``{"command_id", "status", "output"}`` on success.  Any other terminal status
    raises :class:`ImageError` with the status and the tail of stderr (or stdout).
    A builder whose SSM agent has not registered yet is retried for ``delivery_timeout`` seconds.
    (The pipeline's tasks wait in the triggerer instead: ``ssm_commands.ProvisionInstanceOperator``.)
    """
    command_id = send_provisioning(ssm_client, instance_id, script, timeout, comment, poll_interval=poll_interval,
                                   delivery_timeout=delivery_timeout)
    deadline = time.monotonic() + timeout + delivery_timeout
    while (invocation := command_invocation(ssm_client, command_id, instance_id)).get("Status") in SSM_IN_PROGRESS:
        if time.monotonic() > deadline:
            break
        time.sleep(poll_interval)
    return provisioning_result(ssm_client, command_id, instance_id, waited=timeout, invocation=invocation)


# --------------------------------------------------------------------------- images


def _images_named(ec2_client, name: str) -> list[dict]:
    images = ec2_client.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
    return sorted(images, key=lambda i: i.get("CreationDate", ""), reverse=True)


def _usable(image: dict) -> bool:
    return image.get("State") not in BROKEN_IMAGE_STATES


def _snapshot_ids(image: dict) -> list[str]:
    return [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")]


def _create(ec2_client, instance_id: str, name: str, description: str, tag_specs: list, no_reboot: bool) -> str:
    return ec2_client.create_image(
        InstanceId=instance_id,
        Name=name,
        Description=description,
        NoReboot=no_reboot,
        TagSpecifications=tag_specs,
    )["ImageId"]


def create_image(
    ec2_client,
    *,
    instance_id: str,
    name: str,
    tags: dict[str, str],
    description: str = "",
    no_reboot: bool = False,
) -> str:
    """The id of the AMI called ``name``: an existing usable one, else one made from the builder.

    Image and snapshots are tagged with ``tags``.  A failed image of the same name is
    deregistered first (it holds the name).  Returns once ``describe_images`` sees the image;
    it may still be ``pending`` (wait with :class:`deployline.image_readiness.AmiAvailableSensor`).
    """
    if not _IMAGE_NAME.match(name):
        raise ImageError(f"image name {name!r}: 3-128 letters, digits, spaces and ( ) [ ] . / - ' @ _")
    for image in _images_named(ec2_client, name):
        if _usable(image):
            log.info("image %s already exists as %s (%s)", name, image["ImageId"], image.get("State"))
            return image["ImageId"]
        log.warning("deregistering %s image %s to reuse its name %s", image.get("State"), image["ImageId"], name)
        ec2_client.deregister_image(ImageId=image["ImageId"])

    tag_list = _tag_list(tags)
    image_spec = [{"ResourceType": "image", "Tags": tag_list}] if tag_list else []
    snapshot_spec = [{"ResourceType": "snapshot", "Tags": tag_list}] if tag_list else []
    tag_snapshots_later = False
    try:
        image_id = _create(ec2_client, instance_id, name, description, image_spec + snapshot_spec, no_reboot)
    except ClientError as exc:
        if _error_code(exc) == "InvalidAMIName.Duplicate":
            return _existing_after_race(ec2_client, name, exc)
        server_error = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
        if not (server_error and snapshot_spec):
            raise ImageError(f"create_image {name} from {instance_id} failed: {exc}") from exc
        image_id = _create_without_snapshot_tags(ec2_client, instance_id, name, description, image_spec, no_reboot, exc)
        tag_snapshots_later = True
    except (NotImplementedError, ResponseParserError) as exc:
        # Emulators (moto) reject snapshot TagSpecifications on CreateImage.
        if not snapshot_spec:
            raise
        image_id = _create_without_snapshot_tags(ec2_client, instance_id, name, description, image_spec, no_reboot, exc)
        tag_snapshots_later = True

    ec2_client.get_waiter("image_exists").wait(ImageIds=[image_id], WaiterConfig={"Delay": 2, "MaxAttempts": 30})
    if tag_snapshots_later:
        image = ec2_client.describe_images(ImageIds=[image_id])["Images"][0]
        snapshots = _snapshot_ids(image)
        if snapshots:
            ec2_client.create_tags(Resources=snapshots, Tags=tag_list)
    log.info("image %s is %s (from %s)", name, image_id, instance_id)
    return image_id


def _create_without_snapshot_tags(ec2_client, instance_id, name, description, image_spec, no_reboot, error) -> str:
    log.warning("create_image %s with snapshot tags failed (%s); tagging the snapshots afterwards", name, error)
    found = [i for i in _images_named(ec2_client, name) if _usable(i)]
    if found:  # the failed-looking call did create it
        return found[0]["ImageId"]
    return _create(ec2_client, instance_id, name, description, image_spec, no_reboot)


def _existing_after_race(ec2_client, name: str, exc: ClientError) -> str:
    found = [i for i in _images_named(ec2_client, name) if _usable(i)]
    if not found:
        raise ImageError(f"image name {name} is taken by an image this account cannot use: {exc}") from exc
    return found[0]["ImageId"]


def image_state(ec2_client, image_id: str) -> tuple[str, str]:
    """``(state, reason)`` of an AMI; ``("missing", ...)`` when EC2 does not know it (any more)."""
    try:
        images = ec2_client.describe_images(ImageIds=[image_id])["Images"]
    except ClientError as exc:
        if _error_code(exc) in _MISSING_IMAGE_CODES:
            return "missing", exc.response.get("Error", {}).get("Message", "") or _error_code(exc)
        raise
    if not images:
        return "missing", f"{image_id} is not returned by DescribeImages (deregistered?)"
    image = images[0]
    reason = (image.get("StateReason") or {}).get("Message", "")
    return image.get("State", "unknown"), reason


def find_images(ec2_client, tags: dict[str, str], *, state: str | None = "available") -> list[dict]:
    """Images owned by this account carrying all ``tags`` (and in ``state``), newest first."""
    filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
    if state:
        filters.append({"Name": "state", "Values": [state]})
    images: list[dict] = []
    paginator = ec2_client.get_paginator("describe_images")
    for page in paginator.paginate(Owners=["self"], Filters=filters):
        images.extend(page["Images"])
    return sorted(images, key=lambda i: (i.get("CreationDate", ""), i.get("Name", "")), reverse=True)
