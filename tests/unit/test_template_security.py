"""Security of the CloudFormation templates (include/cloudformation/*.yaml), issue 8.

- cfn-lint: no errors in any template (warnings allowed).
- checkov (its own venv, .venv-checkov, which `make test` and `make test-unit` create from
  requirements-checkov.txt): no failed check. Offline checkov cannot tell severities (that needs
  a Prisma Cloud API key), so every failed check counts; the only exceptions are checks skipped
  in the templates themselves with `# checkov:skip=CKV_AWS_xxx:reason`, each with a reason. The
  test lists them. Without .venv-checkov (plain `pytest`) that test is skipped.
- Three rules read from the templates, so they hold without checkov: IMDSv2 required wherever an
  instance or launch template is defined (and encrypted EBS volumes), every bucket encrypted and
  public-access-blocked, no ingress from 0.0.0.0/0 or ::/0 except ports 80/443 on an
  internet-facing load balancer's security group. moto's CloudFormation ignores most of these
  properties (MetadataOptions, the public access block, load balancer attributes), so the
  deployment tests cannot show them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cfnlint.decode import decode

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = ROOT / "include" / "cloudformation"
TEMPLATES = sorted(TEMPLATE_DIR.glob("*.yaml"))
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"

WORLD = ("0.0.0.0/0", "::/0")
PUBLIC_LISTENER_PORTS = {80, 443}
# checkov's own pattern for inline suppressions (checkov.common.comment.enum.COMMENT_REGEX).
SKIP_COMMENT = re.compile(
    r"(checkov:skip=|bridgecrew:skip=|cortex:skip=) *([A-Za-z_\d-]+(?:,[A-Za-z_\d-]+)*)?(:[^\n]*)?")


def load(path: Path) -> dict:
    template, matches = decode(str(path))
    assert template is not None and not matches, f"{path.name} does not parse: {matches}"
    return template


def resources(template: dict, *types: str) -> list[tuple[str, dict]]:
    return [(name, r.get("Properties") or {}) for name, r in (template.get("Resources") or {}).items()
            if r.get("Type") in types]


def referenced_resource(value) -> str | None:
    """The logical id behind {"Ref": X} or {"Fn::GetAtt": [X, ...]} (or "X.Attr")."""
    if isinstance(value, dict) and len(value) == 1:
        (function, argument), = value.items()
        if function == "Ref" and isinstance(argument, str):
            return argument
        if function == "Fn::GetAtt":
            return argument[0] if isinstance(argument, list) else str(argument).split(".")[0]
    return None


# ------------------------------------------------------------------------------ the three rules


def _imds_v2(options) -> bool:
    return isinstance(options, dict) and options.get("HttpTokens") == "required"


def _unencrypted_mappings(mappings) -> list[str]:
    return [str(m.get("DeviceName")) for m in mappings or []
            if isinstance(m, dict) and "Ebs" in m and m["Ebs"].get("Encrypted") is not True]


def instance_problems(template: dict) -> list[str]:
    """IMDSv2 required and EBS volumes encrypted wherever an instance or launch template is defined."""
    problems = []
    templates_here = {name for name, _ in resources(template, "AWS::EC2::LaunchTemplate")}
    for name, props in resources(template, "AWS::EC2::LaunchTemplate"):
        data = props.get("LaunchTemplateData") or {}
        if not _imds_v2(data.get("MetadataOptions")):
            problems.append(f"{name}: LaunchTemplateData.MetadataOptions.HttpTokens is not 'required' (IMDSv2)")
        for device in _unencrypted_mappings(data.get("BlockDeviceMappings")):
            problems.append(f"{name}: EBS volume {device} not encrypted")
    for name, props in resources(template, "AWS::EC2::Instance", "AWS::AutoScaling::LaunchConfiguration"):
        # An instance launched from a launch template of this template inherits its (checked) options.
        launch_template = (props.get("LaunchTemplate") or {}).get("LaunchTemplateId")
        inherits = referenced_resource(launch_template) in templates_here and "MetadataOptions" not in props
        if not inherits and not _imds_v2(props.get("MetadataOptions")):
            problems.append(f"{name}: MetadataOptions.HttpTokens is not 'required' (IMDSv2)")
        for device in _unencrypted_mappings(props.get("BlockDeviceMappings")):
            problems.append(f"{name}: EBS volume {device} not encrypted")
    for name, props in resources(template, "AWS::EC2::Volume"):
        if props.get("Encrypted") is not True:
            problems.append(f"{name}: volume not encrypted")
    return problems


def bucket_problems(template: dict) -> list[str]:
    """Every bucket encrypted (SSE by default) and with all four public access blocks on."""
    problems = []
    for name, props in resources(template, "AWS::S3::Bucket"):
        rules = (props.get("BucketEncryption") or {}).get("ServerSideEncryptionConfiguration") or []
        algorithms = [(r.get("ServerSideEncryptionByDefault") or {}).get("SSEAlgorithm") for r in rules]
        if not algorithms or not all(a in ("AES256", "aws:kms", "aws:kms:dsse") for a in algorithms):
            problems.append(f"{name}: no default server-side encryption (BucketEncryption)")
        block = props.get("PublicAccessBlockConfiguration") or {}
        missing = [k for k in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
                   if block.get(k) is not True]
        if missing:
            problems.append(f"{name}: PublicAccessBlockConfiguration lacks {', '.join(missing)}")
    return problems


def _may_be_world(template: dict, value) -> str | None:
    """Why a CidrIp / CidrIpv6 value may be the whole internet, or None when it cannot be."""
    if isinstance(value, str):
        try:
            return value if ipaddress.ip_network(value, strict=False).prefixlen == 0 else None
        except ValueError:
            return f"unparsable {value!r}"
    if isinstance(value, dict) and len(value) == 1:
        (function, argument), = value.items()
        if function == "Fn::If":
            return _may_be_world(template, argument[1]) or _may_be_world(template, argument[2])
        if function == "Ref" and argument in (template.get("Parameters") or {}):
            parameter = template["Parameters"][argument]
            if "Default" in parameter and _may_be_world(template, parameter["Default"]):
                return f"parameter {argument} defaults to {parameter['Default']}"
            pattern = parameter.get("AllowedPattern")
            allowed = parameter.get("AllowedValues")
            if allowed is not None:
                worlds = [v for v in allowed if _may_be_world(template, v)]
                return f"parameter {argument} allows {worlds[0]}" if worlds else None
            if pattern is None or any(re.fullmatch(pattern, w) for w in WORLD):
                return f"parameter {argument} accepts the world (AllowedPattern {pattern!r})"
            return None
    return f"cannot tell what {value!r} is"


def _port(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def ingress_problems(template: dict) -> list[str]:
    """No ingress from 0.0.0.0/0 or ::/0, except TCP 80/443 on an internet-facing load balancer's group."""
    public_lb_groups = set()
    for _, props in resources(template, "AWS::ElasticLoadBalancingV2::LoadBalancer"):
        if props.get("Scheme", "internet-facing") == "internet-facing":
            public_lb_groups |= {referenced_resource(g) for g in props.get("SecurityGroups") or []}
    # Load balancer groups must not be shared with instances: the exception is for the load balancer only.
    instance_groups = set()
    for _, props in resources(template, "AWS::EC2::LaunchTemplate", "AWS::EC2::Instance"):
        data = props.get("LaunchTemplateData", props)
        for key in ("SecurityGroupIds", "SecurityGroups"):
            groups = data.get(key)
            instance_groups |= {referenced_resource(g) for g in (groups if isinstance(groups, list) else [])}

    rules = [(name, rule) for name, props in resources(template, "AWS::EC2::SecurityGroup")
             for rule in props.get("SecurityGroupIngress") or []]
    rules += [(referenced_resource(props.get("GroupId")) or name, props)
              for name, props in resources(template, "AWS::EC2::SecurityGroupIngress")]
    problems = []
    for group, rule in rules:
        for key in ("CidrIp", "CidrIpv6"):
            if key not in rule:
                continue
            why = _may_be_world(template, rule[key])
            if why is None:
                continue
            port_from, port_to = _port(rule.get("FromPort")), _port(rule.get("ToPort"))
            allowed = (group in public_lb_groups and group not in instance_groups
                       and str(rule.get("IpProtocol")) in ("tcp", "6")
                       and port_from == port_to and port_from in PUBLIC_LISTENER_PORTS)
            if not allowed:
                problems.append(f"{group}: ingress {rule.get('IpProtocol')} {rule.get('FromPort')}-{rule.get('ToPort')}"
                                f" open to the world ({key}: {why})")
    return problems


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_instances_require_imdsv2_and_encrypted_volumes(path):
    assert instance_problems(load(path)) == []


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_buckets_are_encrypted_and_private(path):
    assert bucket_problems(load(path)) == []


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_no_ingress_from_the_world_except_the_load_balancer_http_ports(path):
    assert ingress_problems(load(path)) == []


def test_the_rules_are_not_vacuous():
    """The rules cover what the templates define, and catch a bad template."""
    defined = {r["Type"] for path in TEMPLATES for r in load(path)["Resources"].values()}
    assert {"AWS::EC2::LaunchTemplate", "AWS::EC2::Instance", "AWS::S3::Bucket", "AWS::EC2::SecurityGroup",
            "AWS::ElasticLoadBalancingV2::LoadBalancer"} <= defined

    bad = {
        "Parameters": {"Open": {"Type": "String", "Default": "10.0.0.0/8"},
                       "Checked": {"Type": "String", "AllowedPattern": r"^10\..*$"}},
        "Resources": {
            "Lt": {"Type": "AWS::EC2::LaunchTemplate", "Properties": {"LaunchTemplateData": {
                "MetadataOptions": {"HttpTokens": "optional"},
                "SecurityGroupIds": [{"Fn::GetAtt": ["Shared", "GroupId"]}],
                "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}]}}},
            "Vm": {"Type": "AWS::EC2::Instance", "Properties": {}},
            "Bucket": {"Type": "AWS::S3::Bucket", "Properties": {
                "PublicAccessBlockConfiguration": {"BlockPublicAcls": True}}},
            "Lb": {"Type": "AWS::ElasticLoadBalancingV2::LoadBalancer", "Properties": {
                "SecurityGroups": [{"Ref": "LbGroup"}, {"Ref": "Shared"}]}},
            "LbGroup": {"Type": "AWS::EC2::SecurityGroup", "Properties": {"SecurityGroupIngress": [
                {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "CidrIpv6": "::/0"},  # allowed
                {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": "0.0.0.0/0"},
                {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "CidrIp": {"Ref": "Open"}},
                {"IpProtocol": "tcp", "FromPort": 8081, "ToPort": 8081, "CidrIp": {"Ref": "Checked"}}]}},
            "Shared": {"Type": "AWS::EC2::SecurityGroup", "Properties": {"SecurityGroupIngress": [
                {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "CidrIp": "0.0.0.0/0"}]}},
            "Extra": {"Type": "AWS::EC2::SecurityGroupIngress", "Properties": {
                "GroupId": {"Ref": "LbGroup"}, "IpProtocol": "-1", "CidrIp": "0.0.0.0/0"}},
        },
    }
    assert instance_problems(bad) == [
        "Lt: LaunchTemplateData.MetadataOptions.HttpTokens is not 'required' (IMDSv2)",
        "Lt: EBS volume /dev/xvda not encrypted",
        "Vm: MetadataOptions.HttpTokens is not 'required' (IMDSv2)",
    ]
    assert bucket_problems(bad) == [
        "Bucket: no default server-side encryption (BucketEncryption)",
        "Bucket: PublicAccessBlockConfiguration lacks BlockPublicPolicy, IgnorePublicAcls, RestrictPublicBuckets",
    ]
    problems = ingress_problems(bad)
    assert [p.split(":")[0] for p in problems] == ["LbGroup", "LbGroup", "Shared", "LbGroup"], problems
    assert "tcp 22-22" in problems[0] and "parameter Open accepts the world" in problems[1]
    assert "tcp 80-80" in problems[2]  # the group is also an instance's: no exception
    assert "-1 None-None" in problems[3]


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0"])
def test_the_templates_refuse_a_world_cidr_parameter(cidr):
    """UiIngressCidr and TestIngressCidr: the world is refused by the template itself, not only by the config."""
    checked = []
    for path in TEMPLATES:
        template = load(path)
        for _, props in resources(template, "AWS::EC2::SecurityGroup"):
            for rule in props.get("SecurityGroupIngress") or []:
                name = referenced_resource(rule.get("CidrIp"))
                if name in (template.get("Parameters") or {}):
                    pattern = template["Parameters"][name]["AllowedPattern"]
                    assert not re.fullmatch(pattern, cidr), (path.name, name)
                    assert re.fullmatch(pattern, "10.0.0.0/8") and re.fullmatch(pattern, "203.0.113.7/32")
                    checked.append(name)
    assert checked  # UiIngressCidr (ci-environment.yaml), TestIngressCidr (router.yaml)


# --------------------------------------------------------------------------------------- cfn-lint


def test_every_template_passes_cfn_lint():
    """All of them, including templates added later (the driver tests lint the ones they deploy)."""
    assert TEMPLATES
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run([str(cfn_lint), *map(str, TEMPLATES)], capture_output=True, text=True, timeout=300)
    # cfn-lint exit codes: 0 clean, 4 warnings only; 2 / 6 mean errors.
    assert result.returncode in (0, 4), result.stdout + result.stderr


# ---------------------------------------------------------------------------------------- checkov


def inline_skips() -> list[tuple[str, int, str, str]]:
    """(file, line, check id, reason) of every inline checkov suppression in the templates."""
    skips = []
    for path in TEMPLATES:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in SKIP_COMMENT.finditer(line):
                reason = (match.group(3) or ":")[1:].strip()
                for check_id in (match.group(2) or "").split(","):
                    skips.append((path.name, number, check_id, reason))
    return skips


def test_every_checkov_skip_has_a_reason():
    skips = inline_skips()
    assert skips, "no checkov skips found: update this test if the templates need none any more"
    bad = [f"{file}:{line}: {check_id or '(no check id)'}" for file, line, check_id, reason in skips
           if not check_id or not reason or reason.lower() == "no comment provided"]
    assert not bad, "checkov skips without a check id or a reason (# checkov:skip=CKV_AWS_x:why):\n" + "\n".join(bad)
    # The other way to suppress (Metadata: checkov: skip: [{id, comment}]) needs a comment too.
    for path in TEMPLATES:
        for name, resource in load(path)["Resources"].items():
            for skip in ((resource.get("Metadata") or {}).get("checkov") or {}).get("skip") or []:
                assert str(skip.get("comment", "")).strip(), f"{path.name}: {name}: Metadata skip {skip} has no comment"


def test_checkov_finds_no_failed_check(capsys):
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed: `make test` (or `make venv-checkov`) creates {CHECKOV.parents[1].name}")
    started = time.monotonic()
    result = subprocess.run(
        [str(CHECKOV), "-d", str(TEMPLATE_DIR), "--framework", "cloudformation", "-o", "json",
         # Offline: no download of guidelines, severities or custom policies from Prisma Cloud.
         "--skip-download"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    elapsed = time.monotonic() - started
    # Exit code 1 is "failed checks", reported below from the JSON; anything else is checkov itself failing.
    assert result.returncode in (0, 1), (
        f"checkov exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    reports = json.loads(result.stdout)
    reports = [r for r in (reports if isinstance(reports, list) else [reports]) if r["check_type"] == "cloudformation"]
    assert reports, f"checkov reported nothing for the templates:\n{result.stdout[:2000]}"
    results = {key: [c for r in reports for c in r["results"].get(key, [])]
               for key in ("passed_checks", "failed_checks", "skipped_checks", "parsing_errors")}

    def where(check) -> str:
        first, last = check.get("file_line_range") or ["?", "?"]
        return f"{check['resource']} ({check['file_path'].lstrip('/')}:{first}-{last})"

    skipped = sorted(f"{c['check_id']} {where(c)}: {c['check_result'].get('suppress_comment', '')}"
                     for c in results["skipped_checks"])
    report = [f"checkov {reports[0]['summary'].get('checkov_version')} ({elapsed:.1f} s): "
              f"{len(results['passed_checks'])} passed, {len(results['failed_checks'])} failed, "
              f"{len(skipped)} skipped in the templates:", *(f"  {s}" for s in skipped)]
    with capsys.disabled():  # in pytest's output even when the test passes
        print("\n" + "\n".join(report))

    assert not results["parsing_errors"], f"checkov could not parse: {results['parsing_errors']}"
    failed = sorted(f"{c['check_id']} {c.get('check_name', '')}: {where(c)}" for c in results["failed_checks"])
    assert not failed, (
        f"checkov: {len(failed)} failed check(s); fix the template, or skip the check in the resource with\n"
        "`# checkov:skip=CKV_AWS_xxx:reason` when there is a real reason:\n" + "\n".join(failed))

    # Every resource of every template was scanned (a YAML file checkov does not take for a
    # CloudFormation template would otherwise pass silently).
    resource_count = sum(r["summary"].get("resource_count", 0) for r in reports)
    expected = sum(len(load(p)["Resources"]) for p in TEMPLATES)
    assert resource_count == expected, f"checkov saw {resource_count} resources, the templates define {expected}"
    # Every inline skip suppresses something (a misplaced or stale one would not show up as skipped).
    applied = {(Path(c["file_path"]).name, c["check_id"]) for c in results["skipped_checks"]}
    stale = [f"{file}:{line}: {check_id}" for file, line, check_id, _ in inline_skips()
             if (file, check_id) not in applied]
    assert not stale, "checkov skips that skip nothing (outside a resource, or a wrong id):\n" + "\n".join(stale)
