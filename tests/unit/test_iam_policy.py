"""Least privilege: ``include/iam/deployline-pipeline-policy.json`` grants exactly the AWS actions the code calls.

The actions are collected statically (``ast``) from ``plugins/deployline/**/*.py`` and ``dags/*.py``:

* boto3 clients: from ``deployline.aws`` (``aws.s3(config)``, ``aws.client(config, "sns")``, ...), from
  provider hooks (``S3Hook(...).get_conn()``, ``EC2Hook(...).conn``, ``AwsBaseHook(client_type=...)``,
  subclasses of them) and ``boto3``/session ``.client("<service>")``; held in variables, attributes and
  parameters whose names follow the code's conventions (``s3_client``, ``self.cfn``, ``clients.ssm``, ...),
  or passed as arguments to a function whose parameter has a generic name (``client``);
* every method called on such a client, checked against botocore's service model (``xform_name``),
  ``get_paginator("<op>")`` and ``get_waiter("<name>")`` (botocore's waiter models, and the custom waiters
  in ``plugins/deployline/waiters/``, also when named by ``waiter_name=`` as the provider's triggers do);
* the provider operators/triggers the DAGs use, from the explicit table ``PROVIDER_CLASSES``.

A call that looks like an AWS operation but cannot be attributed to a client fails the test (listed in
the message), as does a method on a client that is no operation, an unresolvable service or waiter name,
or an amazon provider class missing from ``PROVIDER_CLASSES``: nothing is skipped silently.

The parameters of the calls are collected too: one that hands a role to a service (``RoleARN``,
``IamInstanceProfile``: ``ROLE_PARAMETERS``) needs ``iam:PassRole``, granted only to that service.

The CloudFormation service role's policy (``include/iam/deployline-cloudformation-service-role.json``) is checked
against what the templates' resource types need: their handlers' permissions in the resource provider schemas.

``python tests/unit/test_iam_policy.py`` prints the collected operations and actions, and the derivation.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import botocore.session
import pytest
from botocore import xform_name

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "include" / "iam" / "deployline-pipeline-policy.json"
SOURCES = [ROOT / "plugins" / "deployline", ROOT / "dags"]
CUSTOM_WAITERS = ROOT / "plugins" / "deployline" / "waiters"  # <service>.json, provider waiter format

# --- how the code names its clients ----------------------------------------------------------------

# Variable, attribute and parameter names that hold a boto3 client of a service (by convention).
CLIENT_NAMES = {
    "s3": "s3", "s3_client": "s3",
    "ec2": "ec2", "ec2_client": "ec2",
    "ssm": "ssm", "ssm_client": "ssm",
    "cfn": "cloudformation", "cfn_client": "cloudformation", "cloudformation": "cloudformation",
    "autoscaling": "autoscaling", "autoscaling_client": "autoscaling",
    "elbv2": "elbv2", "elbv2_client": "elbv2",
    "sns": "sns", "sns_client": "sns",
    "cloudwatch": "cloudwatch", "cloudwatch_client": "cloudwatch",
}
# Provider hooks whose ``.conn`` / ``.get_conn()`` is a client of a service (AwsBaseHook: its client_type).
HOOK_SERVICES = {"S3Hook": "s3", "EC2Hook": "ec2", "SsmHook": "ssm", "CloudFormationHook": "cloudformation",
                 "SnsHook": "sns", "StsHook": "sts", "AwsBaseHook": None}

# Client methods that are no API operation themselves.
CLIENT_HELPERS = {"get_paginator", "get_waiter", "can_paginate", "close"}

# S3 transfer methods boto3 adds to the client: the operations they call (s3transfer; multipart above 8 MB,
# aborted on failure).
S3_TRANSFER = {
    "upload_file": ["PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload",
                    "AbortMultipartUpload"],
    "download_file": ["HeadObject", "GetObject"],
}

# --- the calls made for us by provider operators and triggers ---------------------------------------

# Every class imported from airflow.providers.amazon in the code, with the actions it performs itself.
# Hooks only make clients (their calls are collected through the clients); AwsBaseWaiterTrigger runs the
# waiter its subclass names with ``waiter_name=`` (resolved from the waiter files below: AmiAvailableTrigger
# -> custom waiter ec2 "image_available" -> DescribeImages).
PROVIDER_CLASSES = {
    "S3Hook": set(),
    "StsHook": set(),  # its client's assume_role call is collected from the code
    "EC2Hook": set(),
    "SsmHook": set(),
    "CloudFormationHook": set(),
    "AwsBaseHook": set(),
    "AwsBaseWaiterTrigger": set(),
    # The waiter loop AwsBaseWaiterTrigger.run uses; the waiter (and so its calls) is named by waiter_name=.
    "async_wait": set(),
    "WaiterMaxAttemptsError": set(),
    # SnsPublishOperator.execute -> SnsHook.publish_to_target -> sns.publish (approvals.py).
    "SnsPublishOperator": {("sns", "Publish")},
}

# Functions that talk only to the embedded demo's moto server, with fixed test keys: never with the
# pipeline role. Their calls are listed in the report, not required of the policy.
DEMO_ONLY = {
    ("deployline.cli", "_production_address"),  # python -m deployline demo: reads the demo's moto S3
    ("deployline.embedded", "ensure_bucket"),  # creates the demo's bucket in moto
}

# --- from API operations to IAM actions ------------------------------------------------------------

# IAM service prefixes that differ from boto3's service names.
IAM_PREFIX = {"elbv2": "elasticloadbalancing"}

# S3 operations whose IAM action differs from the operation name (every S3 operation the code calls must
# be listed: S3 differs too often to assume the name).
S3_ACTIONS = {
    # GetObject/HeadObject: with s3:ListBucket a missing key answers 404 NoSuchKey, which the code relies on
    # (artifacts.head, ReleaseRegistry._read); without it S3 answers 403 AccessDenied.
    # With a VersionId (the artifact the registry records) IAM checks s3:GetObjectVersion instead.
    "GetObject": {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"},
    "HeadObject": {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"},
    "GetBucketVersioning": {"s3:GetBucketVersioning"},
    "PutObject": {"s3:PutObject"},  # also with IfMatch / IfNoneMatch (conditional writes) and checksums
    "CreateMultipartUpload": {"s3:PutObject"},
    "UploadPart": {"s3:PutObject"},
    "CompleteMultipartUpload": {"s3:PutObject"},
    "AbortMultipartUpload": {"s3:AbortMultipartUpload"},
    "ListObjectsV2": {"s3:ListBucket"},
    "HeadBucket": {"s3:ListBucket"},
    "ListObjectVersions": {"s3:ListBucketVersions"},
    # infrastructure._empty_bucket deletes object versions and delete markers (VersionId given).
    "DeleteObjects": {"s3:DeleteObject", "s3:DeleteObjectVersion"},
}

# Further actions IAM authorizes for a call, because of the parameters the code passes.
IMPLIED = {
    # images.launch_builder: TagSpecifications (tag on create).
    "ec2:RunInstances": {"ec2:CreateTags"},
    # images.create_image: TagSpecifications for the image and its snapshots.
    "ec2:CreateImage": {"ec2:CreateTags"},
}

# Parameters that hand a role to a service: a call passing one needs iam:PassRole, which the policy grants
# only with iam:PassedToService naming that service. Collected from the calls' keywords (``**request``
# dicts and helpers returning dicts included).
ROLE_PARAMETERS = {
    # images.launch_builder: baking.instance_profile; EC2 gives its role to the builder.
    ("ec2", "IamInstanceProfile"): "ec2.amazonaws.com",
    # environments/cloudformation.py and infrastructure.py: the CloudFormation service role (role_argument).
    ("cloudformation", "RoleARN"): "cloudformation.amazonaws.com",
}

# Actions the policy may grant on "Resource": "*".
STAR_RESOURCE = {
    # AWS supports no resource-level permissions for these (checked against cfn-lint's copy of the
    # Service Authorization Reference below): "*" is the only resource they match.
    "autoscaling:DescribeAutoScalingGroups",
    "ec2:DescribeImages",
    "ec2:DescribeInstances",
    "elasticloadbalancing:DescribeListeners",
    "elasticloadbalancing:DescribeTargetHealth",
    "ssm:CancelCommand",
    "ssm:GetCommandInvocation",
    # Called without StackName (CloudFormationDriver.list pages through every stack), which IAM
    # authorizes against "*" only.
    "cloudformation:DescribeStacks",
    # Metrics are no resource (the "dataset" resource type is for other calls); the policy narrows it with
    # the cloudwatch:namespace condition instead.
    "cloudwatch:PutMetricData",
}


# Condition keys AWS documents for the action itself rather than for a resource type.
ACTION_CONDITION_KEYS = {
    "ec2:CreateTags": {"ec2:CreateAction"},
    "iam:PassRole": {"iam:PassedToService"},
    "cloudwatch:PutMetricData": {"cloudwatch:namespace"},
    # The CloudFormation service role attaches only the managed policies the templates name.
    "iam:AttachRolePolicy": {"iam:PolicyARN"},
    "iam:DetachRolePolicy": {"iam:PolicyARN"},
}


# --- botocore ---------------------------------------------------------------------------------------


@cache
def _session():
    return botocore.session.get_session()


@cache
def operations(service: str) -> dict[str, str]:
    """snake_case method name -> operation name."""
    model = _session().get_service_model(service)
    return {xform_name(name): name for name in model.operation_names}


@cache
def paginates(service: str, operation: str) -> bool:
    try:
        _session().get_paginator_model(service).get_paginator(operation)
    except Exception:  # no paginator for it (or none for the service)
        return False
    return True


@cache
def waiters(service: str) -> dict[str, str]:
    """Waiter name as clients and hooks take it -> the operation it polls (custom waiters too)."""
    found = {}
    try:
        model = _session().get_waiter_model(service)
        found = {xform_name(name): model.get_waiter(name).operation for name in model.waiter_names}
    except Exception:  # a service without waiters
        pass
    custom = CUSTOM_WAITERS / f"{service}.json"
    if custom.exists():
        found.update({name: spec["operation"] for name, spec in json.loads(custom.read_text())["waiters"].items()})
    return found


def custom_waiter_services() -> dict[str, str]:
    """Custom waiter name -> its service (the file's name)."""
    return {name: path.stem for path in sorted(CUSTOM_WAITERS.glob("*.json"))
            for name in json.loads(path.read_text())["waiters"]}


def iam_actions(service: str, operation: str) -> set[str]:
    if service == "s3":
        if operation not in S3_ACTIONS:
            raise KeyError(f"S3 operation {operation}: add its IAM action(s) to S3_ACTIONS")
        actions = set(S3_ACTIONS[operation])
    else:
        actions = {f"{IAM_PREFIX.get(service, service)}:{operation}"}
    for action in list(actions):
        actions |= IMPLIED.get(action, set())
    return actions


# --- the static collection -------------------------------------------------------------------------


@dataclass
class Function:
    qualname: str
    module: str
    node: ast.AST  # FunctionDef, or the Module for module-level code
    cls: str | None  # enclosing class (methods)
    parent: Function | None  # enclosing function (nested defs)
    params: list[str] = field(default_factory=list)
    own: list[ast.AST] = field(default_factory=list)  # nodes of its body, not of nested defs/classes


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    modules: dict[str, str] = field(default_factory=dict)  # local name -> imported module
    names: dict[str, str] = field(default_factory=dict)  # local name -> imported "module.attr"
    constants: dict[str, ast.AST] = field(default_factory=dict)  # module-level NAME = <expr>


@dataclass
class Collected:
    operations: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))  # -> where
    # (service, operation) -> parameter name -> where (the pipeline's calls, not the demo's).
    parameters: dict[tuple[str, str], dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set)))
    demo: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    unattributed: list[str] = field(default_factory=list)  # looks like an AWS call, client unknown
    unknown: list[str] = field(default_factory=list)  # a client call that is no operation, or unresolvable
    provider_classes: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # class -> modules
    demo_functions_seen: set[tuple[str, str]] = field(default_factory=set)

    def actions(self) -> dict[str, set[str]]:
        """IAM action -> where it comes from."""
        found: dict[str, set[str]] = defaultdict(set)
        for (service, operation), where in self.operations.items():
            for action in iam_actions(service, operation):
                found[action] |= where
        for principal, where in self.passed_roles().items():
            found["iam:PassRole"] |= {f"{w} (a role for {principal})" for w in where}
        return found

    def passed_roles(self) -> dict[str, set[str]]:
        """The service principals the code hands roles to (ROLE_PARAMETERS) -> where."""
        found: dict[str, set[str]] = defaultdict(set)
        for (service, _operation), parameters in self.parameters.items():
            for name, where in parameters.items():
                if (service, name) in ROLE_PARAMETERS:
                    found[ROLE_PARAMETERS[(service, name)]] |= where
        return found


def _own_nodes(body: list[ast.AST]) -> list[ast.AST]:
    """Every node of ``body`` that runs in its scope: not the bodies of nested functions (they are
    functions of their own), but class bodies' statements other than methods."""
    found, stack = [], list(body)
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            stack.extend(n for n in node.decorator_list + node.args.defaults + node.args.kw_defaults if n)
            continue
        if isinstance(node, ast.ClassDef):
            stack.extend(node.decorator_list + node.bases + node.keywords)
            stack.extend(n for n in node.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _module_name(path: Path) -> str:
    for root in SOURCES:
        if path.is_relative_to(root):
            parts = path.relative_to(root.parent).with_suffix("").parts
            return ".".join(p for p in parts if p != "__init__")
    raise ValueError(path)


def _where(module: Module, node: ast.AST) -> str:
    return f"{module.path.relative_to(ROOT)}:{node.lineno}"


class Collector:
    def __init__(self, paths: list[Path]):
        self.modules: dict[str, Module] = {}
        self.functions: dict[str, Function] = {}
        self.classes: dict[str, ast.ClassDef] = {}  # "module.Class"
        for path in paths:
            module = Module(_module_name(path), path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
            self.modules[module.name] = module
        for module in self.modules.values():
            self._index(module)
        self.hooks = self._hook_classes()
        self.bindings: dict[str, dict[str, object]] = defaultdict(dict)  # qualname -> param -> kind
        self.conflicts: list[str] = []
        self.factories: dict[str, object] = {}  # qualname -> service, or ("param", name)
        self.result = Collected()

    # --- indexing

    def _index(self, module: Module) -> None:
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module.modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    local = alias.asname or alias.name
                    if self._is_module(full):
                        module.modules[local] = full
                    else:
                        module.names[local] = full
        for node in module.tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                module.constants[node.targets[0].id] = node.value
        top = Function(module.name, module.name, module.tree, None, None, [], _own_nodes(module.tree.body))
        self.functions[f"{module.name}.<module>"] = top
        self._index_body(module, module.tree.body, module.name, None, None)

    def _is_module(self, name: str) -> bool:
        # The code's own modules; anything else imported by ``from x import y`` counts as a name (a receiver
        # that is an imported module or name is skipped either way, see _call).
        return name in self.modules

    def _index_body(self, module, body, prefix, cls, parent) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                self.classes[f"{prefix}.{node.name}"] = node
                self._index_body(module, node.body, f"{prefix}.{node.name}", node.name, parent)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                function = Function(f"{prefix}.{node.name}", module.name, node, cls, parent, params,
                                    _own_nodes(node.body))
                self.functions[function.qualname] = function
                self._index_body(module, node.body, f"{function.qualname}.<locals>", None, function)

    def _hook_classes(self) -> dict[str, str | None]:
        """Provider hook class names, and the code's subclasses of them, with their service."""
        hooks = dict(HOOK_SERVICES)
        changed = True
        while changed:
            changed = False
            for node in self.classes.values():
                for base in node.bases:
                    name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
                    if name in hooks and node.name not in hooks:
                        hooks[node.name] = hooks[name]
                        changed = True
        return hooks

    # --- resolving names

    def resolve(self, function: Function, func: ast.AST) -> tuple[str | None, int]:
        """The function a call calls (qualname) and how many leading parameters the call binds itself."""
        module = self.modules[function.module]
        if isinstance(func, ast.Name):
            for candidate in (f"{module.name}.{func.id}", module.names.get(func.id, "")):
                if candidate in self.functions:
                    return candidate, 0
                if candidate in self.classes and f"{candidate}.__init__" in self.functions:
                    return f"{candidate}.__init__", 1
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner = func.value.id
            if owner in module.modules:
                candidate = f"{module.modules[owner]}.{func.attr}"
                if candidate in self.functions:
                    return candidate, 0
            if owner in ("self", "cls"):
                cls_function = function
                while cls_function is not None and cls_function.cls is None:
                    cls_function = cls_function.parent
                if cls_function is not None:
                    candidate = cls_function.qualname.rsplit(".", 1)[0] + f".{func.attr}"
                    if candidate in self.functions:
                        return candidate, 1
        return None, 0

    def env(self, function: Function) -> dict[str, object]:
        """Local name -> kind (a service name, ("hook", service) or ("param", name)), outer scopes first."""
        env = dict(self.env(function.parent)) if function.parent else {}
        env.update(self.bindings.get(function.qualname, {}))
        for _ in range(2):  # assignments that use earlier ones
            for node in function.own:
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        self._bind(function, env, target, node.value)
        return env

    def _bind(self, function, env, target, value) -> None:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts, strict=True):
                self._bind(function, env, t, v)
        elif isinstance(target, ast.Name):
            kind = self.kind(function, env, value)
            if kind is not None:
                env[target.id] = kind

    def strings(self, function: Function, expr: ast.AST) -> set[str] | None:
        """The string values ``expr`` can have, when the code spells them out (None: it does not)."""
        module = self.modules[function.module]
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.Tuple | ast.List | ast.Dict):
            values = [self.strings(function, e) for e in (expr.values if isinstance(expr, ast.Dict) else expr.elts)]
            return set().union(*values) if values and all(v is not None for v in values) else None
        if isinstance(expr, ast.Subscript):  # NAMES[key]: any of the mapping's values
            return self.strings(function, expr.value)
        if isinstance(expr, ast.Name):
            scope = function
            while scope is not None:
                for node in scope.own:
                    if isinstance(node, ast.Assign) and any(
                            isinstance(t, ast.Name) and t.id == expr.id for t in node.targets):
                        return self.strings(function, node.value)
                    if isinstance(node, ast.comprehension | ast.For) and isinstance(node.target, ast.Name) \
                            and node.target.id == expr.id:
                        return self.strings(function, node.iter)
                scope = scope.parent
            if expr.id in module.constants:
                return self.strings(function, module.constants[expr.id])
            if expr.id in module.names:  # a constant imported from another deployline module
                source, _, name = module.names[expr.id].rpartition(".")
                top = self.functions.get(f"{source}.<module>")
                if top is not None and name in self.modules[source].constants:
                    return self.strings(top, self.modules[source].constants[name])
        return None

    def kind(self, function: Function, env: dict, expr: ast.AST) -> object:
        """What ``expr`` is: a client of a service (its name), a hook (("hook", service)), or None."""
        module = self.modules[function.module]
        if isinstance(expr, ast.Name):
            return env.get(expr.id, CLIENT_NAMES.get(expr.id))
        if isinstance(expr, ast.Attribute):
            if expr.attr == "conn":
                inner = self.kind(function, env, expr.value)
                if isinstance(inner, tuple) and inner[0] == "hook":
                    return inner[1]
            return CLIENT_NAMES.get(expr.attr)
        if not isinstance(expr, ast.Call):
            return None
        func = expr.func
        if isinstance(func, ast.Attribute) and func.attr == "get_conn":
            inner = self.kind(function, env, func.value)
            if isinstance(inner, tuple) and inner[0] == "hook":
                return inner[1]
        hook = func.id if isinstance(func, ast.Name) else None
        if hook in self.hooks and (hook in module.names or f"{module.name}.{hook}" in self.classes):
            service = self.hooks[hook]
            if service is None:  # AwsBaseHook(client_type=...)
                arg = next((k.value for k in expr.keywords if k.arg == "client_type"), None)
                service = self._service_arg(function, arg)
            return ("hook", service) if service is not None else None
        if isinstance(func, ast.Attribute) and func.attr == "client" and expr.args:
            owner = func.value
            if isinstance(owner, ast.Name) and (module.modules.get(owner.id) == "boto3" or "session" in owner.id):
                return self._service_arg(function, expr.args[0])
        callee, skip = self.resolve(function, func)
        if callee in self.factories:
            made = self.factories[callee]
            if isinstance(made, tuple):  # the service is a parameter of the factory
                params = self.functions[callee].params[skip:]
                index = params.index(made[1])
                arg = next((k.value for k in expr.keywords if k.arg == made[1]), None)
                if arg is None and index < len(expr.args):
                    arg = expr.args[index]
                return self._service_arg(function, arg, (callee, made[1]))
            return made
        return None

    def _service_arg(self, function: Function, arg: ast.AST | None, param: tuple | None = None):
        """A service name given as an argument: a constant, or a parameter of the enclosing function."""
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.Name) and arg.id in function.params:
            return ("param", arg.id)
        values = self.strings(function, arg) if arg is not None else None
        if values and len(values) == 1:
            return next(iter(values))
        if values:  # one of several (clients_from_boto3 makes a client per name of a tuple): named by use
            return ("many", frozenset(values))
        where = _where(self.modules[function.module], arg) if arg is not None else function.qualname
        what = f"{param[0]}({param[1]}=...)" if param else "client"
        self.result.unknown.append(f"{where}: {what}: cannot tell the service from {ast.unparse(arg) if arg else '?'}")
        return None

    # --- the passes

    def _calls(self, function: Function):
        return [n for n in function.own if isinstance(n, ast.Call)]

    def propagate(self) -> None:
        """Factories (functions returning a client) and parameters bound to clients by callers, to a fixpoint."""
        for _ in range(10):
            before = (dict(self.factories), {k: dict(v) for k, v in self.bindings.items()})
            for function in self.functions.values():
                env = self.env(function)
                if isinstance(function.node, ast.FunctionDef):
                    for node in function.own:
                        if isinstance(node, ast.Return) and node.value is not None:
                            made = self.kind(function, env, node.value)
                            if isinstance(made, str) or (isinstance(made, tuple) and made[0] == "param"):
                                self.factories[function.qualname] = made
                for call in self._calls(function):
                    callee, skip = self.resolve(function, call.func)
                    if callee is None:
                        continue
                    params = self.functions[callee].params[skip:]
                    pairs = list(zip(params, call.args, strict=False)) + [
                        (k.arg, k.value) for k in call.keywords if k.arg in params]
                    for param, arg in pairs:
                        if isinstance(arg, ast.Starred):
                            continue
                        made = self.kind(function, env, arg)
                        if not isinstance(made, str):
                            continue
                        named = CLIENT_NAMES.get(param)
                        if named is not None and named != made:
                            self.conflicts.append(f"{_where(self.modules[function.module], call)}: a {made} client "
                                                  f"passed as {callee}({param}), a {named} client by its name")
                        elif named is None:
                            self.bindings[callee][param] = made
            if before == (self.factories, {k: dict(v) for k, v in self.bindings.items()}):
                return
        raise AssertionError("client propagation did not settle")

    def collect(self) -> Collected:
        self.result = Collected()
        self.propagate()
        self.result.unknown.clear()  # the final pass reports each problem once
        services = self._services()
        candidates = {method: sorted(s for s in services if method in operations(s))
                      for s in services for method in operations(s)}
        for function in self.functions.values():
            module = self.modules[function.module]
            top = function
            while top.parent is not None:
                top = top.parent
            demo = (module.name, top.qualname.rsplit(".", 1)[-1]) if top.node is not module.tree else None
            if demo in DEMO_ONLY:
                self.result.demo_functions_seen.add(demo)
            sink = self.result.demo if demo in DEMO_ONLY else self.result.operations
            env = self.env(function)
            for call in self._calls(function):
                self._call(function, module, env, call, sink, candidates)
        for module in self.modules.values():
            for local, full in module.names.items():
                if full.startswith("airflow.providers.amazon."):
                    self.result.provider_classes[local].add(module.name)
        for name in self.result.provider_classes:
            for service, operation in PROVIDER_CLASSES.get(name, set()):
                self.result.operations[(service, operation)].add(f"{name} (PROVIDER_CLASSES)")
        return self.result

    def _services(self) -> set[str]:
        """Every service the code makes a client of, or names a client after."""
        services = set(CLIENT_NAMES.values())
        for function in self.functions.values():
            env = self.env(function)
            for call in self._calls(function):
                made = self.kind(function, env, call)
                if isinstance(made, str):
                    services.add(made)
        return services

    def _call(self, function, module, env, call, sink, candidates) -> None:
        where = _where(module, call)
        for keyword in call.keywords:  # a provider trigger/hook running a waiter by name
            if keyword.arg == "waiter_name":
                names = self.strings(function, keyword.value) or set()
                custom = custom_waiter_services()
                if not names or not names <= set(custom):
                    self.result.unknown.append(f"{where}: waiter_name={ast.unparse(keyword.value)}: not a custom "
                                               f"waiter in {CUSTOM_WAITERS.relative_to(ROOT)}")
                for name in names & set(custom):
                    sink[(custom[name], waiters(custom[name])[name])].add(f"{where} (waiter {name})")
        func = call.func
        if not isinstance(func, ast.Attribute):
            return
        receiver, method = func.value, func.attr
        if isinstance(receiver, ast.Name) and (receiver.id in module.modules or receiver.id in module.names):
            return  # a module's function (deployline's own are followed through their parameters)
        service = self.kind(function, env, receiver)
        if isinstance(service, tuple):
            if service[0] == "hook":
                if method != "get_conn":  # hook methods (S3Hook.load_file, ...) make calls of their own
                    self.result.unknown.append(f"{where}: {ast.unparse(func)}(): a provider hook method, whose "
                                               "AWS calls are not collected; call the client instead")
            elif function.qualname not in self.factories:
                which = sorted(service[1]) if service[0] == "many" else service[1]
                self.result.unknown.append(f"{where}: {ast.unparse(func)}(): cannot tell the client's service "
                                           f"({service[0]}: {which})")
            return
        if not isinstance(service, str):
            if method in candidates:
                self.result.unattributed.append(
                    f"{where}: {ast.unparse(func)}() looks like {'/'.join(candidates[method])} "
                    f"{operations(candidates[method][0])[method]}, but its client is unknown")
            return
        try:
            ops = operations(service)
        except Exception as exc:
            self.result.unknown.append(f"{where}: {ast.unparse(func)}(): no botocore service {service!r}: {exc}")
            return
        if method in CLIENT_HELPERS:
            if method not in ("get_paginator", "get_waiter"):
                return
            names = self.strings(function, call.args[0]) if call.args else None
            if names is None and method == "get_waiter":
                # A waiter name passed in: every waiter of the service the module spells out.
                names = {n.value for n in ast.walk(module.tree) if isinstance(n, ast.Constant)
                         and isinstance(n.value, str) and n.value in waiters(service)}
            for name in sorted(names or ()):
                if method == "get_paginator" and name in ops and paginates(service, ops[name]):
                    sink[(service, ops[name])].add(f"{where} (paginator)")
                elif method == "get_waiter" and name in waiters(service):
                    sink[(service, waiters(service)[name])].add(f"{where} (waiter {name})")
                else:
                    self.result.unknown.append(f"{where}: {service} has no {method[4:]} {name!r}")
            if not names:
                self.result.unknown.append(f"{where}: {ast.unparse(call)}: cannot tell which {method[4:]}")
            return
        if service == "s3" and method in S3_TRANSFER:
            for operation in S3_TRANSFER[method]:
                assert operation in ops.values(), operation
                sink[(service, operation)].add(f"{where} ({method})")
            return
        if method not in ops:
            self.result.unknown.append(f"{where}: {ast.unparse(func)}(): {method} is no {service} operation")
            return
        sink[(service, ops[method])].add(where)
        if sink is self.result.operations:
            parameters = self.call_parameters(function, call)
            if parameters is None:
                # Only a service with a ROLE_PARAMETERS entry can be handed a role through a parameter.
                if any(s == service for s, _ in ROLE_PARAMETERS):
                    self.result.unknown.append(f"{where}: {ast.unparse(func)}(): cannot tell its parameters (a ** "
                                               "argument that is no dict literal, local dict or helper returning one)")
                return
            for name in parameters:
                self.result.parameters[(service, ops[method])][name].add(where)

    # --- the parameters of a call (for ROLE_PARAMETERS)

    def call_parameters(self, function: Function, call: ast.Call) -> set[str] | None:
        """The parameter names a call passes: its keywords, and the keys of its ``**`` arguments (None: unknown)."""
        names = set()
        for keyword in call.keywords:
            keys = {keyword.arg} if keyword.arg else self.dict_keys(function, keyword.value)
            if keys is None:
                return None
            names |= keys
        return names

    def dict_keys(self, function: Function, expr: ast.AST, depth: int = 0) -> set[str] | None:
        """The keys a dict expression can have: a literal (with ``**`` parts), ``a if c else b``, a local variable
        (its assignment plus ``name["key"] = ...`` in the same scope) or a call of the code's own function
        returning one of those. None when it is anything else."""
        if depth > 5:
            return None
        if isinstance(expr, ast.Dict):
            keys = set()
            for key, value in zip(expr.keys, expr.values, strict=True):
                if key is None:  # {**other}
                    inner = self.dict_keys(function, value, depth + 1)
                    if inner is None:
                        return None
                    keys |= inner
                elif isinstance(key, ast.Constant) and isinstance(key.value, str):
                    keys.add(key.value)
                else:
                    return None
            return keys
        if isinstance(expr, ast.IfExp):
            branches = [self.dict_keys(function, branch, depth + 1) for branch in (expr.body, expr.orelse)]
            return None if None in branches else branches[0] | branches[1]
        if isinstance(expr, ast.Name):
            scope = function
            while scope is not None:
                keys, found = set(), False
                for node in scope.own:
                    if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        for target in targets:
                            if isinstance(target, ast.Name) and target.id == expr.id:
                                inner = self.dict_keys(scope, node.value, depth + 1)
                                if inner is None:
                                    return None
                                keys |= inner
                                found = True
                            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) \
                                    and target.value.id == expr.id:
                                if not (isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str)):
                                    return None
                                keys.add(target.slice.value)
                if found:
                    return keys
                scope = scope.parent
            return None
        if isinstance(expr, ast.Call):
            callee, _ = self.resolve(function, expr.func)
            if callee is None:
                return None
            target = self.functions[callee]
            returns = [n.value for n in target.own if isinstance(n, ast.Return) and n.value is not None]
            keys = set()
            for value in returns:
                inner = self.dict_keys(target, value, depth + 1)
                if inner is None:
                    return None
                keys |= inner
            return keys if returns else None
        return None


def source_files() -> list[Path]:
    return sorted(p for root in SOURCES for p in root.rglob("*.py") if "__pycache__" not in p.parts)


@cache
def collected() -> Collected:
    collector = Collector(source_files())
    result = collector.collect()
    result.unknown = sorted(set(result.unknown + collector.conflicts))
    result.unattributed = sorted(set(result.unattributed))
    return result


# --- the policy -------------------------------------------------------------------------------------


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def load_policy() -> dict:
    return json.loads(POLICY.read_text(encoding="utf-8"))


def granted(policy: dict) -> set[str]:
    return {a for s in policy["Statement"] for a in _as_list(s.get("Action", []))}


@cache
def iam_reference() -> dict:
    """cfn-lint's copy of the IAM Service Authorization Reference: actions and their resource types."""
    import cfnlint

    return json.loads((Path(cfnlint.__file__).parent / "data" / "AdditionalSpecs" / "Policies.json").read_text())


def report() -> str:
    result = collected()
    lines = []
    by_service: dict[str, list[str]] = defaultdict(list)
    for (service, operation), where in sorted(result.operations.items()):
        by_service[service].append(f"    {operation:28} {', '.join(sorted(where))}")
    for service, entries in by_service.items():
        lines += [f"{service}: {len(entries)} operation(s)", *entries]
    actions = result.actions()
    per_prefix: dict[str, int] = defaultdict(int)
    for action in actions:
        per_prefix[action.split(":")[0]] += 1
    lines.append(f"IAM actions: {len(actions)} ({', '.join(f'{p} {n}' for p, n in sorted(per_prefix.items()))})")
    lines += [f"    {a}" for a in sorted(actions)]
    if result.demo:
        lines.append("demo only (embedded moto, not the pipeline role): " + ", ".join(
            f"{s}:{o}" for s, o in sorted(result.demo)))
    for title, items in (("UNATTRIBUTED", result.unattributed), ("UNKNOWN", result.unknown)):
        lines += [f"{title}: {item}" for item in items]
    return "\n".join(lines)


# --- tests ------------------------------------------------------------------------------------------


def test_every_aws_call_is_attributed():
    result = collected()
    problems = [f"unattributed: {u}" for u in result.unattributed] + [f"unknown: {u}" for u in result.unknown]
    assert not problems, (
        "AWS calls the static collection cannot account for (name the client after its service, e.g. "
        "ec2_client, or extend tests/unit/test_iam_policy.py):\n  " + "\n  ".join(problems))


def test_provider_classes_are_mapped():
    result = collected()
    unmapped = sorted(set(result.provider_classes) - set(PROVIDER_CLASSES))
    assert not unmapped, (
        "amazon provider classes used by the code, with no entry in PROVIDER_CLASSES (which AWS calls do they "
        f"make?): {', '.join(f'{n} ({sorted(result.provider_classes[n])})' for n in unmapped)}")
    stale = sorted(set(PROVIDER_CLASSES) - set(result.provider_classes))
    assert not stale, f"PROVIDER_CLASSES lists classes the code no longer uses: {stale}"


def test_demo_only_functions_exist():
    result = collected()
    assert result.demo_functions_seen == DEMO_ONLY, f"stale DEMO_ONLY entries: {DEMO_ONLY - result.demo_functions_seen}"


def test_the_collection_sees_the_known_calls():
    """A guard for the collector itself: calls of every kind it must find (direct, paginator, waiter, custom
    waiter via waiter_name, generic parameter name, provider operator, S3 transfer)."""
    operations = set(collected().operations)
    for expected in [("ec2", "RunInstances"), ("ec2", "DescribeInstances"), ("ec2", "DescribeImages"),
                     ("cloudformation", "DescribeStacks"), ("cloudwatch", "PutMetricData"), ("sns", "Publish"),
                     ("s3", "ListObjectsV2"), ("s3", "PutObject"), ("s3", "CreateMultipartUpload"),
                     ("elbv2", "ModifyListener"), ("ssm", "SendCommand")]:
        assert expected in operations, expected
    # Parameters, also through **request dicts and helpers returning one (role_argument).
    parameters = collected().parameters
    for operation in ("CreateStack", "UpdateStack", "DeleteStack"):
        assert "RoleARN" in parameters[("cloudformation", operation)], operation
    assert "IamInstanceProfile" in parameters[("ec2", "RunInstances")]


def test_policy_grants_exactly_the_collected_actions():
    needed = collected().actions()
    have = granted(load_policy())
    missing = sorted(set(needed) - have)
    extra = sorted(have - set(needed))
    message = []
    if missing:
        message.append("missing from the policy (the code calls them):\n  " + "\n  ".join(
            f"{a}  <- {', '.join(sorted(needed[a]))}" for a in missing))
    if extra:
        message.append("granted but never called (remove them):\n  " + "\n  ".join(extra))
    assert not message, f"{POLICY.relative_to(ROOT)}:\n" + "\n".join(message)


def test_roles_are_passed_only_to_the_services_the_code_hands_them_to():
    """iam:PassRole serves two uses (the builders' instance profile, the CloudFormation service role): each
    statement granting it names one service in iam:PassedToService, and those are exactly the services the
    code hands roles to (ROLE_PARAMETERS); dropping RoleARN from the code leaves a statement to remove."""
    passed = collected().passed_roles()
    granted_to: dict[str, str] = {}
    for statement in load_policy()["Statement"]:
        sid, actions = statement["Sid"], _as_list(statement["Action"])
        if "iam:PassRole" not in actions:
            continue
        assert actions == ["iam:PassRole"], f"{sid}: iam:PassRole in a statement of its own"
        services = _as_list(statement.get("Condition", {}).get("StringEquals", {}).get("iam:PassedToService", []))
        assert len(services) == 1, f"{sid}: iam:PassRole without iam:PassedToService naming one service"
        assert services[0] not in granted_to, f"{sid}: a second statement passing roles to {services[0]}"
        assert _as_list(statement["Resource"]) != ["*"], f"{sid}: iam:PassRole on every role"
        granted_to[services[0]] = statement["Resource"]
    assert set(granted_to) == set(passed), (
        f"roles passed to (policy) {sorted(granted_to)}, by the code {sorted(passed)}: "
        + "; ".join(f"{p} <- {', '.join(sorted(w))}" for p, w in sorted(passed.items())))
    # Only the service role, named as include/iam/README.md has it created.
    assert granted_to["cloudformation.amazonaws.com"] == "arn:aws:iam::*:role/deployline-cloudformation*"


def _check_document(path: Path, *, star_ok, size_limit: int, limit: str, wildcards: bool = False) -> None:
    """The rules every policy document here follows: Version 2012-10-17, a Sid and Effect Allow on every
    statement, exact actions (or, with ``wildcards``, the trailing ``*`` of an AWS-given pattern), "*" only for
    actions ``star_ok`` accepts, and the size limit IAM sets for where the policy goes."""
    policy = json.loads(path.read_text(encoding="utf-8"))
    name = path.name
    assert set(policy) == {"Version", "Statement"}, (name, sorted(policy))
    assert policy["Version"] == "2012-10-17", name
    statements = policy["Statement"]
    assert isinstance(statements, list) and statements, name
    sids = [s.get("Sid") for s in statements]
    assert all(isinstance(sid, str) and re.fullmatch(r"[A-Za-z0-9]+", sid) for sid in sids), (name, sids)
    assert len(set(sids)) == len(sids), f"{name}: duplicate Sid: {sids}"
    action_pattern = r"[a-z0-9-]+:[A-Za-z0-9]+\*?" if wildcards else r"[a-z0-9-]+:[A-Za-z0-9]+"
    for statement in statements:
        sid = f"{name}: {statement['Sid']}"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}, (sid, sorted(statement))
        assert statement["Effect"] == "Allow", sid
        actions, resources = _as_list(statement["Action"]), _as_list(statement["Resource"])
        assert actions and resources, sid
        assert len(set(actions)) == len(actions), f"{sid}: duplicate actions"
        for action in actions:
            assert re.fullmatch(action_pattern, action), f"{sid}: {action!r}: exact actions only, no *"
        if "*" in resources:
            assert resources == ["*"], f"{sid}: '*' together with other resources"
            star = sorted(a for a in actions if not star_ok(a))
            assert not star, f"{sid}: Resource '*' for {star}, which support resource-level permissions"
    # IAM counts a policy's characters without whitespace.
    size = len(re.sub(r"\s", "", path.read_text(encoding="utf-8")))
    assert size <= size_limit, f"{name}: {size} characters: over the limit of {size_limit:,} for {limit}"


def test_policy_document_is_well_formed():
    # An action appears in several statements only where its resources need different conditions.
    _check_document(POLICY, star_ok=STAR_RESOURCE.__contains__, size_limit=6144, limit="a managed policy")


def _arn_pattern(arn_format: str) -> re.Pattern:
    """A reference ARN format (``arn:${Partition}:ec2:${Region}:${Account}:instance/.*``) as a regex that
    matches the policy's ARN patterns (whose ``*`` are plain characters here)."""
    tokens = re.split(r"(\$\{[A-Za-z]+\}|\.\*)", arn_format)
    return re.compile("".join("[^:]*" if t.startswith("${") else ".*" if t == ".*" else re.escape(t)
                              for t in tokens) + "$")


def _condition_keys(statement: dict) -> set[str]:
    return {key for operator in statement.get("Condition", {}).values() for key in operator}


def _key_pattern(key_format: str) -> re.Pattern:
    tokens = re.split(r"(\$\{[A-Za-z]+\}|tag-key)", key_format)
    return re.compile("".join(".+" if t.startswith("${") or t == "tag-key" else re.escape(t) for t in tokens) + "$",
                      re.IGNORECASE)


def _reference_actions(action: str) -> list[str]:
    """The reference's actions an action names (several for a wildcard such as ec2:Describe*), lower case."""
    prefix, name = action.lower().split(":")
    return [a for a in iam_reference().get(prefix, {}).get("Actions", {}) if fnmatch.fnmatchcase(a, name)]


def _reference_problems(policy: dict, star_ok, not_in_reference: frozenset[str] = frozenset()) -> list[str]:
    """Every action exists (bar ``not_in_reference``); "*" only where the action has no resource type or
    ``star_ok`` says so; every resource ARN is of a type its statement's actions apply to (an ARN no action can
    match grants nothing); every condition key applies to the action or to the resource types the statement
    names."""
    reference = iam_reference()
    problems = []
    for statement in policy["Statement"]:
        sid = statement["Sid"]
        resources = _as_list(statement["Resource"])
        used = set()
        for action in _as_list(statement["Action"]):
            if action in not_in_reference:
                used |= set(resources)  # nothing to check it against
                continue
            prefix = action.split(":")[0]
            names = _reference_actions(action)
            if not names:
                problems.append(f"{sid}: {action} is no IAM action")
                continue
            types = sorted({t for n in names for t in reference[prefix]["Actions"][n].get("Resources", [])})
            if resources == ["*"] and types and not star_ok(action):
                problems.append(f"{sid}: {action} on '*' but it supports resource types {types}")
            # The action's resource types (its own service's, else another's: iam:PassRole -> role) that the
            # statement's resources are of.
            specs = [reference[prefix].get("Resources", {}).get(t) or next(
                (svc["Resources"][t] for svc in reference.values() if t in svc.get("Resources", {})), {})
                for t in types]
            matched = [spec for spec in specs if resources == ["*"] or any(
                _arn_pattern(f).match(r) for f in spec.get("ARNFormats", []) for r in resources)]
            if resources != ["*"]:
                matching = {r for r in resources for spec in specs
                            for f in spec.get("ARNFormats", []) if _arn_pattern(f).match(r)}
                if not matching:
                    problems.append(f"{sid}: {action} applies to none of {resources} (its types: {types})")
                used |= matching
            known = [_key_pattern(k) for spec in matched for k in spec.get("ConditionKeys", [])]
            for key in _condition_keys(statement):
                if key not in ACTION_CONDITION_KEYS.get(action, ()) and not any(k.match(key) for k in known):
                    problems.append(f"{sid}: condition key {key} does not apply to {action} on {resources}")
        if resources != ["*"]:
            problems += [f"{sid}: resource {r} matches none of its actions" for r in resources if r not in used]
    return problems


def test_policy_actions_and_resources_match_the_iam_reference():
    """Every action exists; "*" only where AWS has no resource type for it (or STAR_RESOURCE says why); every
    resource ARN is of a type its statement's actions apply to; every condition key applies."""
    reference = iam_reference()
    problems = _reference_problems(load_policy(), STAR_RESOURCE.__contains__)
    star_with_types = [a for a in STAR_RESOURCE
                       if reference[a.split(":")[0]]["Actions"][a.split(":")[1].lower()].get("Resources")]
    assert sorted(star_with_types) == ["cloudformation:DescribeStacks", "cloudwatch:PutMetricData"], (
        "STAR_RESOURCE: these have resource types; say why '*' in a comment and here", star_with_types)
    assert not problems, "\n".join(problems)


# --- the CloudFormation service role -------------------------------------------------------------------
#
# CloudFormation creates, updates and deletes the templates' resources with the role passed as RoleARN
# (environments.cloudformation.service_role_arn, service_role_arn in include/infrastructure.yaml). Its policy is
# derived, not written by hand: each resource type the templates use, and for each the permissions its resource
# handlers need (the resource provider schemas' handlers.<create|read|update|delete>.permissions, which AWS
# publishes and cfn-lint ships in cfnlint/data/schemas).

SERVICE_ROLE_POLICY = ROOT / "include" / "iam" / "deployline-cloudformation-service-role.json"
SERVICE_ROLE_TRUST = ROOT / "include" / "iam" / "deployline-cloudformation-trust-policy.json"
SERVICE_ROLE_NAME = "deployline-cloudformation"  # as include/iam/README.md creates it
TEMPLATES = ROOT / "include" / "cloudformation"
# What CloudFormation does with a stack's resources; "list" serves the Cloud Control API, not stacks.
HANDLERS = ("create", "read", "update", "delete")
# The derived actions need more than a managed policy's 6,144 characters: the policy is the role's inline
# policy (aws iam put-role-policy), and a role's inline policies may hold 10,240 together.
INLINE_ROLE_POLICY_LIMIT = 10240

# Handler permissions that cfn-lint's copy of the Service Authorization Reference does not know. Granted
# all the same (IAM takes any action name; one that no service authorizes matches nothing): the handlers list
# them, and a name missing from the copy may be newer than the copy.
NOT_IN_REFERENCE = frozenset({
    # A service prefix the copy lacks; the AutoScalingGroup handler lists these.
    "managed-fleets:CreateAutoScalingGroup", "managed-fleets:DeleteAutoScalingGroup",
    "managed-fleets:DeregisterAutoScalingGroup", "managed-fleets:Get*", "managed-fleets:RegisterAutoScalingGroup",
    "managed-fleets:UpdateAutoScalingGroup",
    # S3 API operation names in the Bucket handler's list; IAM authorizes them as s3:PutBucketCORS,
    # s3:PutEncryptionConfiguration, s3:PutReplicationConfiguration, ... (also listed, and granted).
    "s3:DeleteBucketAnalyticsConfiguration", "s3:DeleteBucketCors", "s3:DeleteBucketEncryption",
    "s3:DeleteBucketLifecycle", "s3:DeleteBucketMetricsConfiguration", "s3:DeleteBucketReplication",
    "s3:PutBucketReplication", "s3:PutObjectLockConfiguration",
})

# Services the service role acts on with Resource "*", and why. S3 (the artifact bucket, deployline-*), SNS (the
# topic, deployline-*) and IAM (the CI stack's role and instance profile, deployline-ci-environment-*) are scoped
# by name instead. For the others the templates give their resources no name of ours: AWS assigns the ids and
# CloudFormation generates the names from stack and logical id; scoping by the aws:cloudformation:stack-name tag
# would take tag-on-create conditions for every create action, which nothing here (moto) could check.
SERVICE_ROLE_STAR = {
    "ec2": "VPC, subnets, gateways, routes, security groups, launch templates, instances: ids assigned by AWS",
    "elasticloadbalancing": "load balancers, target groups, listeners: names generated by CloudFormation",
    "autoscaling": "auto scaling groups: names generated by CloudFormation",
    "cloudwatch": "alarms of an auto scaling group's scaling policies (the group handler manages them)",
    "ssm": "SSM associations and documents of an instance (the instance handler manages them)",
    "cognito-idp": "user pools of a listener's authenticate-cognito action (none in the templates)",
    "s3tables": "S3 metadata tables of a bucket (none in the templates)",
    "vpc-lattice": "VPC Lattice traffic sources of an auto scaling group (none in the templates)",
    "managed-fleets": "a service the reference does not know (NOT_IN_REFERENCE): no resource types to go by",
}


@cache
def template_resource_types() -> dict[str, set[str]]:
    """Resource type -> the templates (include/cloudformation/*.yaml) that use it."""
    from cfnlint.decode import decode

    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(TEMPLATES.glob("*.yaml")):
        template, matches = decode(str(path))
        assert template is not None, f"{path}: {matches}"
        for resource in template["Resources"].values():
            found[resource["Type"]].add(path.name)
    return found


@cache
def handler_permissions() -> dict[str, set[str]]:
    """Permission -> "<resource type> <handler>" needing it, from cfn-lint's resource provider schemas
    (``providers/<region>.json`` names each type's schema in ``resources/``; every region's, in case one differs)."""
    import cfnlint

    schemas = Path(cfnlint.__file__).parent / "data" / "schemas"
    regions = [json.loads(p.read_text()) for p in sorted((schemas / "providers").glob("*.json")) if p.stem != "sam"]
    found: dict[str, set[str]] = defaultdict(set)
    for type_name in sorted(template_resource_types()):
        digests = {region[type_name] for region in regions if type_name in region}
        assert digests, f"{type_name}: no resource provider schema in cfn-lint's data"
        for digest in sorted(digests):
            handlers = json.loads((schemas / "resources" / f"{digest}.json").read_text()).get("handlers")
            assert handlers, f"{type_name}: its schema (resources/{digest}.json) has no handlers"
            for handler in HANDLERS:
                for permission in handlers.get(handler, {}).get("permissions", []):
                    found[permission].add(f"{type_name} {handler}")
    return found


@cache
def service_role_actions() -> dict[str, set[str]]:
    """The service role's actions: every handler permission, less the exact ones a listed wildcard covers
    (ec2:DescribeVpcs beside ec2:Describe*). Action -> where it comes from."""
    permissions = handler_permissions()
    wildcards = [p.lower() for p in permissions if "*" in p]
    return {p: where for p, where in permissions.items()
            if not any(w != p.lower() and fnmatch.fnmatchcase(p.lower(), w) for w in wildcards)}


def service_role_star_ok(action: str) -> bool:
    if action.split(":")[0] in SERVICE_ROLE_STAR:
        return True
    reference = iam_reference()
    prefix = action.split(":")[0]
    return all(not reference[prefix]["Actions"][n].get("Resources") for n in _reference_actions(action))


def load_service_role_policy() -> dict:
    return json.loads(SERVICE_ROLE_POLICY.read_text(encoding="utf-8"))


def service_role_report() -> str:
    types = template_resource_types()
    lines = [f"CloudFormation service role: {len(types)} resource type(s) in {TEMPLATES.relative_to(ROOT)}"]
    lines += [f"    {t:45} {', '.join(sorted(files))}" for t, files in sorted(types.items())]
    actions = service_role_actions()
    lines.append(f"handler permissions: {len(handler_permissions())}, as actions: {len(actions)}")
    lines += [f"    {a:55} {', '.join(sorted(where))}" for a, where in sorted(actions.items())]
    return "\n".join(lines)


def test_service_role_policy_grants_exactly_the_handler_permissions():
    needed = service_role_actions()
    have = granted(load_service_role_policy())
    missing, extra = sorted(set(needed) - have), sorted(have - set(needed))
    message = []
    if missing:
        message.append("missing (the templates' resource handlers need them):\n  " + "\n  ".join(
            f"{a}  <- {', '.join(sorted(needed[a]))}" for a in missing))
    if extra:
        message.append("granted but no handler of the templates' resource types needs them:\n  " + "\n  ".join(extra))
    assert not message, f"{SERVICE_ROLE_POLICY.relative_to(ROOT)}:\n" + "\n".join(message)


def test_service_role_policy_document_is_well_formed():
    _check_document(SERVICE_ROLE_POLICY, star_ok=service_role_star_ok, size_limit=INLINE_ROLE_POLICY_LIMIT,
                    limit="a role's inline policies", wildcards=True)
    # Each action in one statement: a second one would be a second, differently scoped grant.
    actions = [a for s in load_service_role_policy()["Statement"] for a in _as_list(s["Action"])]
    assert len(actions) == len(set(actions)), sorted({a for a in actions if actions.count(a) > 1})


def test_service_role_policy_matches_the_iam_reference():
    policy = load_service_role_policy()
    problems = _reference_problems(policy, service_role_star_ok, NOT_IN_REFERENCE)
    unknown = {a for a in granted(policy) if not _reference_actions(a)}
    assert unknown == NOT_IN_REFERENCE, (
        f"NOT_IN_REFERENCE is out of date: unknown now {sorted(unknown - NOT_IN_REFERENCE)}, "
        f"known now {sorted(NOT_IN_REFERENCE - unknown)}")
    starred = {a.split(":")[0] for s in policy["Statement"] if _as_list(s["Resource"]) == ["*"]
               for a in _as_list(s["Action"])}
    stale = sorted(set(SERVICE_ROLE_STAR) - starred)
    assert not stale, f"SERVICE_ROLE_STAR names services with no '*' statement: {stale}"
    assert not problems, "\n".join(problems)


def test_service_role_cannot_change_itself_or_the_pipeline_roles():
    """Whoever may create a stack with the service role may do what it can: its IAM rights must not reach
    itself (a template could give it any policy) nor the roles the pipeline passes (deployline-*)."""
    for statement in load_service_role_policy()["Statement"]:
        if not any(a.startswith("iam:") for a in _as_list(statement["Action"])):
            continue
        for resource in _as_list(statement["Resource"]):
            assert resource != "*", f"{statement['Sid']}: IAM actions on every resource"
            for name in (SERVICE_ROLE_NAME, "deployline-builder"):  # the latter: baking.instance_profile's, say
                assert not fnmatch.fnmatchcase(f"arn:aws:iam::123456789012:role/{name}", resource), (
                    f"{statement['Sid']}: {resource} covers the role {name}")


def test_service_role_attaches_only_the_managed_policies_the_templates_name():
    """iam:AttachRolePolicy would let a template give its role any managed policy (AdministratorAccess):
    the condition names those the templates' roles have, no more, no fewer."""
    from cfnlint.decode import decode

    named = set()
    for path in sorted(TEMPLATES.glob("*.yaml")):
        template, _ = decode(str(path))
        for resource in template["Resources"].values():
            if resource["Type"] != "AWS::IAM::Role":
                continue
            for arn in resource.get("Properties", {}).get("ManagedPolicyArns", []):
                arn = arn.get("Fn::Sub", arn) if isinstance(arn, dict) else arn
                named.add(arn.replace("${AWS::Partition}", "aws"))
    statements = [s for s in load_service_role_policy()["Statement"]
                  if {"iam:AttachRolePolicy", "iam:DetachRolePolicy"} & set(_as_list(s["Action"]))]
    assert len(statements) == 1 and set(statements[0]["Condition"]) == {"ArnEquals"}, statements
    assert sorted(_as_list(statements[0]["Condition"]["ArnEquals"]["iam:PolicyARN"])) == sorted(named)


def test_service_role_trust_policy():
    """Only CloudFormation may assume the service role."""
    trust = json.loads(SERVICE_ROLE_TRUST.read_text(encoding="utf-8"))
    assert trust == {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "CloudFormationAssumesIt",
            "Effect": "Allow",
            "Principal": {"Service": "cloudformation.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }],
    }


if __name__ == "__main__":  # the report: python tests/unit/test_iam_policy.py
    print(report())
    print(service_role_report())
    pytest.main([__file__, "-q", "-p", "no:cacheprovider"])


def test_the_api_server_may_only_read():
    """The API server (UI, insight pages) reads the release registry and task logs: read-only AWS rights,
    and all that the insight app's registry reads need (get_object, list_objects_v2)."""
    policy = json.loads((ROOT / "include/iam/deployline-api-server-policy.json").read_text())
    granted = {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert all(a.split(":")[1].startswith(("Get", "List", "Describe")) for a in granted), granted
    assert {"s3:GetObject", "s3:ListBucket"} <= granted
    source = (ROOT / "plugins/deployline/insight_app.py").read_text()
    assert "put_object" not in source and "delete_object" not in source
