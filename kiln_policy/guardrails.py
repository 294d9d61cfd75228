"""kiln's own policy rules over synthesized stacks, for what cdk-nag has no rule for, and the
runner that applies them.

A rule is an id, the reason it exists (its docstring), the resource types it judges (none: it
judges the stack itself), the environments it applies to, and a predicate that returns the
problems it finds in one resource or stack. `check` runs every registered rule (or the ones it
is given) over one stack and reports each problem as a `Violation`; the rules never loop or
build violations themselves, as cdk-nag splits its rules from its packs. Tests run every rule
over every template of every environment, and each rule on a compliant and a non-compliant case.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kiln import instances as serving_instances
from kiln import naming
from kiln.contract import DO_NOT_DISRUPT, GPU_TAINT, QUEUE_LABEL, TRAINING_JOB_LABEL
from kiln.settings import Settings, covers_the_internet
from kiln_policy.assembly import SynthesizedStack
from kiln_policy.published_metrics import alarm_uses, dashboard_uses, placeholder_join

Resource = dict[str, Any]
ResourcePredicate = Callable[[Resource, Settings], Iterable[str]]
StackPredicate = Callable[[SynthesizedStack, Settings], Iterable[str]]
Applies = Callable[[Settings], bool]

# Resource types that hold data someone would miss: removing the stack must not delete them.
DATA_STORE_TYPES = frozenset(
    {
        "AWS::S3::Bucket",
        "AWS::KMS::Key",
        "AWS::Logs::LogGroup",
        "AWS::RedshiftServerless::Namespace",
        "AWS::Redshift::Cluster",
        "AWS::MSK::Cluster",
        "AWS::MSK::Topic",
        "AWS::SecretsManager::Secret",
    }
)
_KEEPING_POLICIES = frozenset({"Retain", "Snapshot", "RetainExceptOnCreate"})
# CloudFormation spells the Kubernetes taint effects in upper snake case.
_CFN_TAINT_EFFECT = {
    "NoSchedule": "NO_SCHEDULE",
    "NoExecute": "NO_EXECUTE",
    "PreferNoSchedule": "PREFER_NO_SCHEDULE",
}
STACK = "(stack)"  # the `resource` of a violation found on the stack itself


@dataclass(frozen=True)
class Violation:
    rule: str
    stack: str
    resource: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.stack}/{self.resource}: {self.message}"


def _always(settings: Settings) -> bool:
    del settings
    return True


@dataclass(frozen=True)
class ResourceRule:
    """A rule judging each resource of `resource_types` on its own."""

    id: str
    reason: str
    resource_types: frozenset[str]
    predicate: ResourcePredicate
    applies: Applies = _always

    def problems(self, stack: SynthesizedStack, settings: Settings) -> Iterator[tuple[str, str]]:
        """(logical id, problem) for every problem of this rule in `stack`."""
        for logical_id, resource in stack.resources_of_type(*self.resource_types).items():
            for problem in self.predicate(resource, settings):
                yield logical_id, problem


@dataclass(frozen=True)
class StackRule:
    """A rule judging a stack's own deploy options (tags, termination protection)."""

    id: str
    reason: str
    predicate: StackPredicate
    applies: Applies = _always
    resource_types: frozenset[str] = frozenset()

    def problems(self, stack: SynthesizedStack, settings: Settings) -> Iterator[tuple[str, str]]:
        for problem in self.predicate(stack, settings):
            yield STACK, problem


Rule = ResourceRule | StackRule

# Every rule, by id, in the order they were defined; `check` runs them all by default.
RULES: dict[str, Rule] = {}


def _register(rule: Rule) -> None:
    if rule.id in RULES:
        raise ValueError(f"two guardrail rules share the id {rule.id!r}")
    RULES[rule.id] = rule


def resource_rule(
    rule_id: str, *resource_types: str, applies: Applies = _always
) -> Callable[[ResourcePredicate], ResourcePredicate]:
    """Registers the decorated predicate as a rule over `resource_types`; its docstring is the
    rule's reason."""

    def register(predicate: ResourcePredicate) -> ResourcePredicate:
        reason = inspect.getdoc(predicate) or ""
        _register(ResourceRule(rule_id, reason, frozenset(resource_types), predicate, applies))
        return predicate

    return register


def stack_rule(
    rule_id: str, *, applies: Applies = _always
) -> Callable[[StackPredicate], StackPredicate]:
    """Registers the decorated predicate as a rule over whole stacks."""

    def register(predicate: StackPredicate) -> StackPredicate:
        _register(StackRule(rule_id, inspect.getdoc(predicate) or "", predicate, applies))
        return predicate

    return register


def check(
    stack: SynthesizedStack, settings: Settings, rules: Iterable[Rule] | None = None
) -> list[Violation]:
    """The violations of `rules` (default: every registered rule) in one stack."""
    return [
        Violation(rule.id, stack.stack_name, where, problem)
        for rule in (RULES.values() if rules is None else rules)
        if rule.applies(settings)
        for where, problem in rule.problems(stack, settings)
    ]


# --- the rules -----------------------------------------------------------------------------


def _props(resource: Resource) -> dict[str, Any]:
    props: dict[str, Any] = resource.get("Properties", {})
    return props


@resource_rule(
    "data-stores-retained",
    *sorted(DATA_STORE_TYPES),
    applies=lambda settings: settings.removal_policy == "retain",
)
def data_stores_retained(resource: Resource, settings: Settings) -> Iterator[str]:
    """With `removal_policy: retain` (always in prod), data stores survive stack deletion
    and replacement."""
    for attribute in ("DeletionPolicy", "UpdateReplacePolicy"):
        value = resource.get(attribute, "Delete")
        if value not in _KEEPING_POLICIES:
            yield (
                f"{resource['Type']} has {attribute} {value}; removal_policy is retain, "
                f"so it must be one of {sorted(_KEEPING_POLICIES)}"
            )


@stack_rule("termination-protected", applies=lambda settings: settings.termination_protection)
def termination_protected(stack: SynthesizedStack, settings: Settings) -> Iterator[str]:
    """Stacks of an environment that asks for termination protection have it."""
    if not stack.termination_protection:
        yield "termination protection is off but the environment's settings require it"


@stack_rule("required-tags")
def required_tags(stack: SynthesizedStack, settings: Settings) -> Iterator[str]:
    """Every stack carries project, environment and owner tags with the environment's values."""
    for key, value in naming.standard_tags(settings).items():
        if stack.tags.get(key) != value:
            yield f"tag {key!r} is {stack.tags.get(key)!r}, expected {value!r}"


@resource_rule("kms-bucket-keys", "AWS::S3::Bucket")
def kms_buckets_use_bucket_keys(bucket: Resource, settings: Settings) -> Iterator[str]:
    """SSE-KMS buckets enable S3 Bucket Keys: without them every object read and write is a
    KMS request (cost, and KMS request-rate throttling under training-data reads)."""
    encryption = _props(bucket).get("BucketEncryption", {})
    for rule in encryption.get("ServerSideEncryptionConfiguration", []):
        algorithm = rule.get("ServerSideEncryptionByDefault", {}).get("SSEAlgorithm")
        if algorithm in ("aws:kms", "aws:kms:dsse") and rule.get("BucketKeyEnabled") is not True:
            yield "SSE-KMS bucket without BucketKeyEnabled: true"


@resource_rule("msk-iam-tls-only", "AWS::MSK::Cluster")
def msk_iam_and_tls_only(cluster: Resource, settings: Settings) -> Iterator[str]:
    """MSK clusters admit IAM-authenticated clients only, over TLS, with TLS between brokers."""
    auth = _props(cluster).get("ClientAuthentication", {})
    transit = _props(cluster).get("EncryptionInfo", {}).get("EncryptionInTransit", {})
    if auth.get("Sasl", {}).get("Iam", {}).get("Enabled") is not True:
        yield "IAM client authentication is not enabled"
    if auth.get("Unauthenticated", {}).get("Enabled") is True:
        yield "unauthenticated access is enabled"
    if auth.get("Sasl", {}).get("Scram", {}).get("Enabled") is True or auth.get("Tls"):
        yield "an authentication method other than IAM is enabled"
    # MSK's default for ClientBroker is TLS; only an explicit plaintext mode is a violation.
    if transit.get("ClientBroker", "TLS") != "TLS":
        yield f"client-broker encryption is {transit['ClientBroker']}, not TLS"
    if transit.get("InCluster") is False:
        yield "traffic between brokers is not encrypted"


@resource_rule(
    "warehouse-private-encrypted",
    "AWS::RedshiftServerless::Workgroup",
    "AWS::Redshift::Cluster",
    "AWS::RedshiftServerless::Namespace",
)
def warehouse_private_and_encrypted(resource: Resource, settings: Settings) -> Iterator[str]:
    """Redshift is never publicly accessible and always KMS-encrypted with our key."""
    props, kind = _props(resource), resource["Type"]
    if (
        kind != "AWS::RedshiftServerless::Namespace"
        and props.get("PubliclyAccessible") is not False
    ):
        yield "PubliclyAccessible is not explicitly false"
    if kind == "AWS::Redshift::Cluster" and props.get("Encrypted") is not True:
        yield "Encrypted is not true"
    if kind != "AWS::RedshiftServerless::Workgroup" and not props.get("KmsKeyId"):
        yield "no customer-managed KmsKeyId"


@resource_rule("firehose-kms", "AWS::KinesisFirehose::DeliveryStream")
def firehose_uses_kms(stream: Resource, settings: Settings) -> Iterator[str]:
    """Firehose deliveries to S3 encrypt what they write with a KMS key."""
    props = _props(stream)
    for key in ("ExtendedS3DestinationConfiguration", "S3DestinationConfiguration"):
        if key not in props:
            continue
        encryption = props[key].get("EncryptionConfiguration", {})
        if not encryption.get("KMSEncryptionConfig", {}).get("AWSKMSKeyARN"):
            yield f"{key} writes S3 objects without a KMS key"


@resource_rule("eks-endpoint-private", "AWS::EKS::Cluster")
def eks_endpoint_private(cluster: Resource, settings: Settings) -> Iterator[str]:
    """EKS API endpoints are private outside dev; a dev public endpoint is CIDR-restricted."""
    vpc_config = _props(cluster).get("ResourcesVpcConfig", {})
    public = vpc_config.get("EndpointPublicAccess", True)  # EKS's default is public
    if public and settings.tier != "dev":
        yield f"public API endpoint in a {settings.tier}-tier environment"
    elif public and covers_the_internet(vpc_config.get("PublicAccessCidrs", ["0.0.0.0/0"])):
        yield "public API endpoint open to the whole internet"


@resource_rule("gpu-nodes-tainted", "AWS::EKS::Nodegroup")
def gpu_nodes_tainted(group: Resource, settings: Settings) -> Iterator[str]:
    """GPU node groups carry `nvidia.com/gpu=true:NoSchedule`, so only pods that ask for GPUs
    (and tolerate it) land on the expensive nodes."""
    key, value, effect = GPU_TAINT["key"], GPU_TAINT["value"], GPU_TAINT["effect"]
    wanted = {"Key": key, "Value": value, "Effect": _CFN_TAINT_EFFECT[effect]}
    ami = _props(group).get("AmiType")
    if "NVIDIA" in str(ami or "").upper() and wanted not in _props(group).get("Taints", []):
        yield f"GPU node group ({ami}) lacks the taint {key}={value}:{effect}"


@resource_rule("imdsv2-required", "AWS::EKS::Nodegroup", "AWS::EC2::LaunchTemplate")
def imdsv2_required(resource: Resource, settings: Settings) -> Iterator[str]:
    """Nodes answer only IMDSv2: every node group has a launch template, and every launch
    template requires session tokens (a node group without one allows IMDSv1)."""
    if resource["Type"] == "AWS::EKS::Nodegroup":
        if "LaunchTemplate" not in _props(resource):
            yield "node group without a launch template (EKS then allows IMDSv1)"
        return
    data = _props(resource).get("LaunchTemplateData", {})
    tokens = data.get("MetadataOptions", {}).get("HttpTokens", "optional")
    if tokens != "required":
        yield f"MetadataOptions.HttpTokens is {tokens}, so IMDSv1 is allowed"
    # One hop: a pod (one hop further than the node) cannot reach the node role's credentials;
    # it gets its own through Pod Identity. EC2's default for a launch template is 1, but EKS
    # documents 2 for its own templates, so the value must be said.
    hops = data.get("MetadataOptions", {}).get("HttpPutResponseHopLimit")
    if hops != 1:
        yield (
            f"MetadataOptions.HttpPutResponseHopLimit is {hops}, not 1: pods reach node credentials"
        )


@resource_rule(
    "endpoint-auto-rollback",
    "AWS::SageMaker::Endpoint",
    applies=lambda settings: settings.is_prod,
)
def prod_endpoints_roll_back(endpoint: Resource, settings: Settings) -> Iterator[str]:
    """A prod endpoint deploys blue/green and rolls back by itself on CloudWatch alarms."""
    config = _props(endpoint).get("DeploymentConfig", {})
    if not config.get("AutoRollbackConfiguration", {}).get("Alarms"):
        yield "prod endpoint without auto-rollback alarms"
    if "BlueGreenUpdatePolicy" not in config:
        yield "prod endpoint without a blue/green update policy"


@resource_rule("endpoint-kms", "AWS::SageMaker::EndpointConfig")
def endpoints_encrypted(config: Resource, settings: Settings) -> Iterator[str]:
    """Endpoint storage is encrypted: with a customer-managed KmsKeyId where the instance type
    has no local storage, and with none where it has (the instance encrypts its NVMe volumes
    itself, and CreateEndpointConfig fails when KmsKeyId is given for such a type: SageMaker
    API Reference, CreateEndpointConfig, KmsKeyId). Captured data uses a KMS key."""
    props = _props(config)
    types = [v.get("InstanceType", "") for v in props.get("ProductionVariants", [])]
    local = sorted({t for t in types if serving_instances.has_instance_storage(t)})
    if local and props.get("KmsKeyId"):
        yield (
            f"KmsKeyId is set but {', '.join(local)} has local instance storage: "
            "CreateEndpointConfig rejects it"
        )
    elif not local and not props.get("KmsKeyId"):
        yield "endpoint config without KmsKeyId for its volumes"
    capture = props.get("DataCaptureConfig", {})
    if capture.get("EnableCapture", True) and capture and not capture.get("KmsKeyId"):
        yield "data capture without a KMS key"


@resource_rule(
    "endpoint-redundancy",
    "AWS::SageMaker::EndpointConfig",
    "AWS::ApplicationAutoScaling::ScalableTarget",
    applies=lambda settings: settings.is_prod,
)
def prod_endpoints_redundant(resource: Resource, settings: Settings) -> Iterator[str]:
    """A prod endpoint runs at least 2 instances, and autoscaling never goes below 2."""
    props = _props(resource)
    if resource["Type"] == "AWS::SageMaker::EndpointConfig":
        for variant in props.get("ProductionVariants", []):
            if variant.get("InitialInstanceCount", 1) < 2:
                yield f"variant {variant.get('VariantName')} starts with fewer than 2 instances"
    elif props.get("ServiceNamespace") == "sagemaker" and props.get("MinCapacity", 0) < 2:
        yield "autoscaling may scale the endpoint below 2 instances"


# --- as deployed: what a first real deploy would hit (issue 21) ------------------------------


def _contains_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_contains_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_contains_key(v, key) for v in value)
    return False


@stack_rule("no-weak-references")
def no_weak_references(stack: SynthesizedStack, settings: Settings) -> Iterator[str]:
    """Cross-stack references are strong (`Fn::ImportValue`), never `Fn::GetStackOutput`: a
    weak reference "is resolved at stack create or update time. If the referenced stack or
    output is later deleted or modified, the consuming stack is not automatically updated"
    (https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/intrinsic-function-reference-getstackoutput.html),
    so a replaced MSK cluster or alarm leaves its consumers on the old one with no diff shown;
    and `Fn::Join`'s documented value functions do not list it
    (https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/intrinsic-function-reference-join.html)."""
    for section in ("Resources", "Outputs"):
        for name, value in stack.template.get(section, {}).items():
            if _contains_key(value, "Fn::GetStackOutput"):
                yield f"{section}.{name} reads another stack with Fn::GetStackOutput"


_CUSTOM_TYPES = ("AWS::CloudFormation::CustomResource",)
_WAITER_RETRY = re.compile(r'\\"IntervalSeconds\\":(\d+),\\"MaxAttempts\\":(\d+)')
# Of CloudFormation's hour, what the waiter leaves for on_event and the framework's own calls.
_WAITER_MARGIN_SECONDS = 300


@stack_rule("custom-resources-fit-service-timeout")
def custom_resources_fit_service_timeout(
    stack: SynthesizedStack, settings: Settings
) -> Iterator[str]:
    """CloudFormation waits at most 3600 s for a custom resource (`ServiceTimeout`, "an
    integer from 1 to 3600", https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/aws-resource-cloudformation-customresource.html):
    a custom resource's timeout (3600 s when unset) stays within it, and a provider waiter
    polls for less than that hour (less 5 minutes for the first handler run), so it fails
    with its own message instead of CloudFormation timing out behind a waiter still running
    (the CDK's Provider `totalTimeout` defaults to 30 minutes and accepts up to 2 hours)."""
    for logical_id, resource in stack.resources.items():
        kind = str(resource.get("Type", ""))
        if kind.startswith("Custom::") or kind in _CUSTOM_TYPES:
            timeout = resource.get("Properties", {}).get("ServiceTimeout", 3600)
            if not 1 <= int(timeout) <= 3600:
                yield f"{logical_id}: ServiceTimeout {timeout} is outside 1..3600 seconds"
    for logical_id, machine in stack.resources_of_type("AWS::StepFunctions::StateMachine").items():
        definition = json.dumps(machine.get("Properties", {}).get("DefinitionString", ""))
        for interval, attempts in _WAITER_RETRY.findall(definition):
            waits = int(interval) * int(attempts)
            if waits > 3600 - _WAITER_MARGIN_SECONDS:
                yield (
                    f"{logical_id}: the waiter polls for up to {waits} s, past CloudFormation's "
                    f"3600 s custom-resource limit less {_WAITER_MARGIN_SECONDS} s"
                )


@resource_rule("endpoint-keeps-scaled-count", "AWS::SageMaker::Endpoint")
def endpoint_keeps_scaled_count(endpoint: Resource, settings: Settings) -> Iterator[str]:
    """An endpoint update keeps the instance count autoscaling reached: without
    `RetainAllVariantProperties` SageMaker deploys the new config's `InitialInstanceCount`
    ("To retain the variant properties of an endpoint when updating it, set
    RetainAllVariantProperties to true", https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_UpdateEndpoint.html),
    so every model rollout would shrink a scaled-out fleet back to its initial size."""
    if _props(endpoint).get("RetainAllVariantProperties") is not True:
        yield "RetainAllVariantProperties is not true: an update resets the instance count"


def _depends_on(resource: Resource) -> list[str]:
    depends = resource.get("DependsOn", [])
    return [depends] if isinstance(depends, str) else list(depends)


@stack_rule("msk-topics-wait-for-active")
def msk_topics_wait_for_active(stack: SynthesizedStack, settings: Settings) -> Iterator[str]:
    """MSK topics are created and changed only while the cluster is ACTIVE, and never beside
    the connectivity update: `UpdateConnectivity` takes the cluster out of ACTIVE for tens of
    minutes and Firehose needs the cluster "active" with multi-VPC connectivity
    (https://docs.aws.amazon.com/firehose/latest/dev/writing-with-msk.html). Every
    AWS::MSK::Topic depends on the gate that waits for ACTIVE (`Step: active`), and the
    connectivity action depends on every topic."""
    actions = stack.resources_of_type("Custom::MskPrivateConnectivity")
    if not actions:
        return
    gates = {k for k, r in actions.items() if r.get("Properties", {}).get("Step") == "active"}
    connectivity = {k for k in actions if k not in gates}
    for logical_id, _topic in stack.resources_of_type("AWS::MSK::Topic").items():
        if not gates & set(_depends_on(_topic)):
            yield f"{logical_id}: topic does not wait for the cluster to be ACTIVE"
        for action in sorted(connectivity):
            if logical_id not in _depends_on(stack.resources[action]):
                yield f"{action}: the connectivity update may run beside topic {logical_id}"


@resource_rule("metrics-published", "AWS::CloudWatch::Alarm", "AWS::CloudWatch::Dashboard")
def metrics_published(resource: Resource, settings: Settings) -> Iterator[str]:
    """Every alarm and dashboard widget asks for a metric AWS publishes, under the dimensions
    it publishes it with (`kiln_policy.published_metrics.PUBLISHED`, each row citing its AWS
    page): a metric that never arrives leaves an alarm that cannot fire and an empty widget."""
    uses = (
        alarm_uses(resource, "alarm")
        if resource["Type"] == "AWS::CloudWatch::Alarm"
        else dashboard_uses(resource, "dashboard")
    )
    for use in uses:
        problem = use.problem()
        if problem:
            yield problem


@resource_rule("endpoint-capture-privacy", "AWS::SageMaker::EndpointConfig")
def capture_only_what_events_allow(config: Resource, settings: Settings) -> Iterator[str]:
    """Data capture stores request and response bodies (prompts and completions); an
    environment whose prediction events may not carry raw text (`events.allow_raw_text`
    false) captures none."""
    capture = _props(config).get("DataCaptureConfig")
    if not capture or capture.get("EnableCapture") is False or settings.events.allow_raw_text:
        return
    modes = sorted(o.get("CaptureMode", "") for o in capture.get("CaptureOptions", []))
    yield (
        f"data capture of {', '.join(modes) or 'payloads'} is on although "
        "events.allow_raw_text is false"
    )


# --- model data and containers (issue 19) ----------------------------------------------------

# ContainerDefinition.Environment (SageMaker API Reference, CreateModel): "The maximum length
# of each key and value in the Environment map is 1024 bytes. The maximum length of all keys
# and values in the map, combined, is 32 KB"; at most 100 entries; keys `[a-zA-Z_][a-zA-Z0-9_]*`.
_ENV_MAX_ENTRIES = 100
_ENV_MAX_BYTES = 1024
_ENV_MAX_TOTAL_BYTES = 32 * 1024
_ENV_KEY = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _containers(model: Resource) -> list[dict[str, Any]]:
    props = _props(model)
    return (
        [props["PrimaryContainer"]] if "PrimaryContainer" in props else props.get("Containers", [])
    )


@resource_rule("model-data-documented", "AWS::SageMaker::Model")
def model_data_documented(model: Resource, settings: Settings) -> Iterator[str]:
    """A model's data and variables are ones CreateModel accepts (SageMaker API Reference,
    ContainerDefinition and S3ModelDataSource): `ModelDataUrl` "must point to a single gzip
    compressed tar archive (.tar.gz suffix)"; an `S3Prefix` data source's S3Uri "always ends
    with a forward slash (/)"; `Gzip` is described only for an `S3Object` (a tar.gz); no
    `ModelDataSource` on a multi-model container ("you cannot use ModelDataSource in conjunction
    with ... SageMaker multi-model endpoints"); at most 100 variables, keys and values of at
    most 1024 bytes, 32 KB together."""
    for container in _containers(model):
        url = container.get("ModelDataUrl")
        if isinstance(url, str) and not url.endswith(".tar.gz"):
            yield f"ModelDataUrl {url} is not a .tar.gz archive (use ModelDataSource for others)"
        source = container.get("ModelDataSource", {}).get("S3DataSource")
        if source:
            uri, kind = source.get("S3Uri"), source.get("S3DataType")
            compression = source.get("CompressionType")
            if kind == "S3Prefix" and isinstance(uri, str) and not uri.endswith("/"):
                yield f"S3Prefix data source {uri} does not end with /"
            if compression == "Gzip" and kind != "S3Object":
                yield f"Gzip compression with S3DataType {kind}: only an S3Object can be a tar.gz"
            if container.get("Mode") == "MultiModel":
                yield "ModelDataSource on a multi-model container"
        environment = container.get("Environment", {})
        if len(environment) > _ENV_MAX_ENTRIES:
            yield f"{len(environment)} environment variables, over {_ENV_MAX_ENTRIES}"
        total = 0
        for key, value in environment.items():
            if not _ENV_KEY.fullmatch(key):
                yield f"environment variable name {key!r} is not [a-zA-Z_][a-zA-Z0-9_]*"
            size = len(key.encode()) + (len(value.encode()) if isinstance(value, str) else 0)
            total += size
            if isinstance(value, str) and len(value.encode()) > _ENV_MAX_BYTES:
                yield f"environment variable {key} holds over {_ENV_MAX_BYTES} bytes"
        if total > _ENV_MAX_TOTAL_BYTES:
            yield f"environment variables hold {total} bytes, over {_ENV_MAX_TOTAL_BYTES}"


def _is_mlflow_endpoint(service: Any) -> bool:
    """Whether a VPC endpoint's ServiceName is SageMaker MLflow's
    (`aws.sagemaker.<region>.experiments`, literal or joined around the region)."""
    text = json.dumps(service) if not isinstance(service, str) else service
    return "aws.sagemaker." in text and ".experiments" in text


@resource_rule("mlflow-endpoint-private", "AWS::EC2::VPCEndpoint")
def mlflow_endpoint_private(endpoint: Resource, settings: Settings) -> Iterator[str]:
    """SageMaker MLflow's interface endpoint serves what the tracking client calls, and only
    the tracking server: the `sagemaker-mlflow` plugin calls the regional name
    `https://<region>.experiments.sagemaker.aws`, which resolves to the endpoint only with
    private DNS (without it, training's HTTPS goes out through the NAT, or nowhere where
    egress is to the VPC and S3 only); and its policy names tracking servers, not "*" (the
    SageMaker guide's "Create a VPC Endpoint Policy for SageMaker AI MLflow")."""
    props = _props(endpoint)
    if not _is_mlflow_endpoint(props.get("ServiceName")):
        return
    if props.get("PrivateDnsEnabled") is not True:
        yield (
            "the MLflow endpoint has no private DNS: the tracking client's regional name "
            "would not resolve to it"
        )
    statements = (props.get("PolicyDocument") or {}).get("Statement", [])
    if not statements:
        yield "the MLflow endpoint has no policy: any tracking server is reachable through it"
    for statement in statements:
        resources = statement.get("Resource")
        listed = resources if isinstance(resources, list) else [resources]
        if statement.get("Effect") == "Allow" and "*" in listed:
            yield "the MLflow endpoint's policy allows Resource * instead of the tracking server"


# A tag that names one build: not `latest`, and a tag or digest at all.
_FLOATING_TAGS = frozenset({"latest"})


@resource_rule("model-image-pinned", "AWS::SageMaker::Model")
def model_image_pinned(model: Resource, settings: Settings) -> Iterator[str]:
    """A model's image is pinned: by digest, by a content-hash tag (kiln's own image asset),
    or by a release tag (the LMI image, `kiln/lmi.py`); never untagged or `latest`, which
    would let a new model version start on a different server than the one it was tested on."""
    for container in _containers(model):
        image = container.get("Image")
        if not isinstance(image, str):
            continue  # a token (the CDK asset's URI) is pinned by its content hash
        tag = image.rpartition("/")[2].partition(":")[2]
        if "@sha256:" in image:
            continue
        if not tag or tag in _FLOATING_TAGS:
            yield f"image {image} is not pinned to a release tag or digest"


@resource_rule("model-specification-of-the-engine", "AWS::SageMaker::Model")
def model_specification_of_the_engine(model: Resource, settings: Settings) -> Iterator[str]:
    """A container that picks a registry version's inference specification
    (`InferenceSpecificationName`, "the inference specification name in the model package
    version", SageMaker API Reference, ContainerDefinition) names the environment's engine:
    kiln names a version's additional specifications by the engine whose image they hold, and
    SageMaker starts that image with this environment's engine variables. It needs a
    `ModelPackageName` to pick from."""
    for container in _containers(model):
        name = container.get("InferenceSpecificationName")
        if name is None:
            continue
        if not container.get("ModelPackageName"):
            yield f"InferenceSpecificationName {name} without a ModelPackageName to pick from"
        elif name != settings.serving.engine:
            yield (
                f"InferenceSpecificationName {name} is not this environment's engine "
                f"({settings.serving.engine}): its image would start with "
                f"{settings.serving.engine}'s variables"
            )


# What another environment's account may be granted on the registry home's resources: reading
# model data, decrypting it through S3, pulling images (resource-type -> allowed actions).
_CROSS_ACCOUNT_READS = {
    "AWS::S3::BucketPolicy": frozenset({"s3:GetObject", "s3:ListBucket"}),
    "AWS::KMS::Key": frozenset({"kms:Decrypt", "kms:DescribeKey"}),
    "AWS::ECR::Repository": frozenset(
        {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"}
    ),
}
_POLICY_DOCUMENT = {
    "AWS::S3::BucketPolicy": "PolicyDocument",
    "AWS::KMS::Key": "KeyPolicy",
    "AWS::ECR::Repository": "RepositoryPolicyText",
}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _foreign_statements(resource: Resource, settings: Settings) -> Iterator[dict[str, Any]]:
    """The Allow statements of a resource policy whose principals name a reader account."""
    document = _props(resource).get(_POLICY_DOCUMENT[resource["Type"]], {})
    for statement in document.get("Statement", []) if isinstance(document, dict) else []:
        principal = json.dumps(statement.get("Principal", {}))
        readers = [a for a in settings.registry.reader_accounts if f":{a}:" in principal]
        if statement.get("Effect") == "Allow" and readers:
            yield statement


@resource_rule(
    "cross-account-grants-read-only",
    *sorted(_CROSS_ACCOUNT_READS),
    applies=lambda s: s.registry.home and bool(s.registry.reader_accounts),
)
def cross_account_grants_read_only(resource: Resource, settings: Settings) -> Iterator[str]:
    """What the registry home grants the other environments' accounts so that they can create
    models from its versions ("Deploy a Model Version from a Different Account": the image's
    repository, the model data's bucket, and here the key that encrypts it) is read-only:
    objects under `models/` only (a listing limited to that prefix), decryption only through
    S3, image pulls only; over TLS (`aws:SecureTransport`) and from kiln's roles in those
    accounts (`aws:PrincipalArn`), never the whole account. The registry key's grant to
    decrypt versions' records through SageMaker stays per account: anyone who may read the
    registry there (operators, pipelines) reads them."""
    allowed = _CROSS_ACCOUNT_READS[resource["Type"]]
    for statement in _foreign_statements(resource, settings):
        sid = statement.get("Sid", "a statement")
        actions = set(_listed(statement.get("Action", [])))
        if not actions <= allowed:
            yield f"{sid} grants other accounts {', '.join(sorted(actions - allowed))}"
        conditions = statement.get("Condition", {})
        if conditions.get("Bool", {}).get("aws:SecureTransport") != "true":
            yield f"{sid} does not require TLS (aws:SecureTransport)"
        via = str(conditions.get("StringEquals", {}).get("kms:ViaService", ""))
        # The registry key decrypts versions' records for whoever reads the registry there
        # (operators, pipelines: any role), through SageMaker only; model data is for roles.
        records = resource["Type"] == "AWS::KMS::Key" and via.startswith("sagemaker.")
        if not records and "aws:PrincipalArn" not in conditions.get("ArnLike", {}):
            yield f"{sid} names whole accounts: limit it to roles (aws:PrincipalArn)"
        if resource["Type"] == "AWS::KMS::Key" and "kms:ViaService" not in conditions.get(
            "StringEquals", {}
        ):
            yield f"{sid} lets other accounts use the key directly, not only through S3"
        if resource["Type"] == "AWS::S3::BucketPolicy":
            for target in _listed(statement.get("Resource", [])):
                text = json.dumps(target)
                # A literal ARN, or a Fn::Join whose last part is the prefix.
                if "s3:GetObject" in actions and not text.rstrip("]}").endswith('/models/*"'):
                    yield f"{sid} opens objects outside models/: {text}"
            prefixes = conditions.get("StringLike", {}).get("s3:prefix")
            if "s3:ListBucket" in actions and _listed(prefixes) != ["models/*"]:
                yield f"{sid} lists the bucket beyond models/ (s3:prefix {prefixes})"


@resource_rule(
    "home-key-use-scoped",
    "AWS::IAM::ManagedPolicy",
    applies=lambda s: s.registry.account is not None,
)
def home_key_use_scoped(policy: Resource, settings: Settings) -> Iterator[str]:
    """A role reading the registry home's model data may decrypt with the home's keys only as
    S3 uses them for the model's bucket: the home lake key's id is generated in the home
    account, so the statement names `key/*` of that account, and `kms:ViaService` plus the
    bucket's encryption context (`kms:EncryptionContext:aws:s3:arn`) are what keep it from
    every other key and use there. Reading the registry's records needs the home's registry
    key through SageMaker only (`kms:ViaService` sagemaker)."""
    home = settings.registry.account
    for statement in _props(policy).get("PolicyDocument", {}).get("Statement", []):
        text = json.dumps(statement.get("Resource", []))
        if ":kms:" not in text or f":{home}:key/" not in text:
            continue
        equals = statement.get("Condition", {}).get("StringEquals", {})
        # Through S3 (model data): for the model's bucket only. Through SageMaker: the
        # registry's records, which only SageMaker reads.
        required = ["kms:ViaService"]
        if not str(equals.get("kms:ViaService", "")).startswith("sagemaker."):
            required.append("kms:EncryptionContext:aws:s3:arn")
        for key in required:
            if key not in equals:
                yield f"{statement.get('Sid', 'a statement')} uses the home's keys without {key}"


# --- Kubernetes objects ----------------------------------------------------------------------
# Rules over the Kubernetes objects kiln applies: those in a stack's deploy-time objects
# (`Custom::KubernetesObjects`), and a training run's objects before `kiln train` applies them
# (`check_objects`). Each is also registered as a stack resource rule, so the runner, the
# synthesized-template tests and the compliant/non-compliant cases treat it like any other.

KubeObject = dict[str, Any]
ObjectPredicate = Callable[[KubeObject], Iterable[str]]
KUBERNETES_OBJECTS = "Custom::KubernetesObjects"
# The properties of a deploy-time objects resource that hold objects (JSON lists).
_OBJECT_PROPERTIES = ("Manifests", "Privileged")
OBJECT_RULES: dict[str, tuple[frozenset[str], ObjectPredicate]] = {}


def deploy_time_objects(resource: Resource) -> list[KubeObject]:
    """The Kubernetes objects a `Custom::KubernetesObjects` resource applies, with every
    CloudFormation intrinsic inside them replaced by the placeholder TOKEN."""
    objects: list[KubeObject] = []
    for key in _OBJECT_PROPERTIES:
        value = _props(resource).get(key)
        if value is not None:
            objects += json.loads(placeholder_join(value))
    return objects


def _describe(obj: KubeObject) -> str:
    meta = obj.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


def object_rule(rule_id: str, *kinds: str) -> Callable[[ObjectPredicate], ObjectPredicate]:
    """Registers a rule over Kubernetes objects of `kinds`; its docstring is the reason."""

    def register(predicate: ObjectPredicate) -> ObjectPredicate:
        OBJECT_RULES[rule_id] = (frozenset(kinds), predicate)

        def over_stack(resource: Resource, settings: Settings) -> Iterator[str]:
            del settings
            for obj in deploy_time_objects(resource):
                if obj.get("kind") in kinds:
                    for problem in predicate(obj):
                        yield f"{_describe(obj)}: {problem}"

        reason = inspect.getdoc(predicate) or ""
        _register(ResourceRule(rule_id, reason, frozenset({KUBERNETES_OBJECTS}), over_stack))
        return predicate

    return register


def check_objects(objects: Iterable[KubeObject]) -> list[str]:
    """`[rule] Kind ns/name: problem` for every object rule any of `objects` breaks."""
    return [
        f"[{rule_id}] {_describe(obj)}: {problem}"
        for obj in objects
        for rule_id, (kinds, predicate) in OBJECT_RULES.items()
        if obj.get("kind") in kinds
        for problem in predicate(obj)
    ]


@object_rule("gpu-pools-tainted", "NodePool")
def gpu_pools_tainted(pool: KubeObject) -> Iterator[str]:
    """Every Karpenter NodePool carries `nvidia.com/gpu=true:NoSchedule`: kiln's pools are GPU
    pools, and an untainted one would let any pod (a stray Deployment) start a GPU node."""
    taints = pool.get("spec", {}).get("template", {}).get("spec", {}).get("taints", [])
    if dict(GPU_TAINT) not in taints:
        key, value, effect = GPU_TAINT["key"], GPU_TAINT["value"], GPU_TAINT["effect"]
        yield f"lacks the taint {key}={value}:{effect}"


@object_rule("karpenter-imdsv2", "EC2NodeClass")
def karpenter_imdsv2(node_class: KubeObject) -> Iterator[str]:
    """Karpenter's nodes answer only IMDSv2 with one hop, said explicitly in the node class (a
    pod, one hop further, cannot reach the node role's credentials)."""
    options = node_class.get("spec", {}).get("metadataOptions", {})
    if options.get("httpTokens") != "required":
        yield f"metadataOptions.httpTokens is {options.get('httpTokens')}, so IMDSv1 is allowed"
    if options.get("httpPutResponseHopLimit") != 1:
        yield (
            f"metadataOptions.httpPutResponseHopLimit is "
            f"{options.get('httpPutResponseHopLimit')}, not 1: pods reach node credentials"
        )


def pod_templates(obj: Any) -> Iterator[KubeObject]:
    """Every pod template inside an object (a `metadata` beside a `spec` with containers)."""
    if isinstance(obj, dict):
        spec = obj.get("spec")
        if isinstance(spec, dict) and "containers" in spec and "metadata" in obj:
            yield obj
        for value in obj.values():
            yield from pod_templates(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from pod_templates(value)


# The objects of a training run Kueue admits (they carry its queue); a TrainJob's pods come
# from its TrainingRuntime, which carries the pod templates.
_QUEUED_KINDS = frozenset({"Job", "PyTorchJob", "TrainJob", "JobSet"})


@object_rule(
    "training-pods-not-disrupted", "Job", "PyTorchJob", "TrainJob", "JobSet", "TrainingRuntime"
)
def training_pods_not_disrupted(obj: KubeObject) -> Iterator[str]:
    """A training run's pods carry `karpenter.sh/do-not-disrupt: "true"` (Karpenter never
    takes their node for consolidation or drift mid-run), and the run names its Kueue queue
    (admission whole or not at all, within its team's quota)."""
    labels = obj.get("metadata", {}).get("labels", {})
    if TRAINING_JOB_LABEL not in labels:
        return  # not a kiln training run
    if obj.get("kind") in _QUEUED_KINDS and QUEUE_LABEL not in labels:
        yield f"has no {QUEUE_LABEL} label: Kueue would not queue or gang-admit it"
    templates = list(pod_templates(obj.get("spec", {})))
    if not templates and obj.get("kind") != "TrainJob":
        yield "has no pod template to judge"
    for template in templates:
        annotations = template.get("metadata", {}).get("annotations", {})
        if annotations.get(DO_NOT_DISRUPT) != "true":
            yield f'a pod template lacks the annotation {DO_NOT_DISRUPT}: "true"'


@resource_rule(
    "prod-serves-approved-packages", "AWS::SageMaker::Model", applies=lambda s: s.is_prod
)
def prod_serves_approved_packages(model: Resource, settings: Settings) -> Iterator[str]:
    """A prod endpoint's model is a registry version: every container names a
    `ModelPackageName` and carries no image or model data of its own, so SageMaker creates it
    only from a version whose ModelApprovalStatus is Approved ("For versioned models, the value
    of this parameter must be set to Approved to deploy the model", CreateModelPackage,
    https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_CreateModelPackage.html),
    and promotion to prod is an approval that leaves a record (who, when, why)."""
    props = _props(model)
    containers = [props["PrimaryContainer"]] if "PrimaryContainer" in props else []
    containers += props.get("Containers", [])
    if not containers:
        yield "model without a container"
    for container in containers:
        raw = sorted(k for k in ("Image", "ModelDataUrl", "ModelDataSource") if k in container)
        if not container.get("ModelPackageName"):
            yield (
                "container without ModelPackageName: prod serves approved registry versions "
                "only (kiln deploy-model --model-package or --latest-approved)"
            )
        elif raw:
            yield f"container sets {', '.join(raw)} beside the registry version's own"
