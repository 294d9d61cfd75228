"""Custom-resource handler: applies Kubernetes objects to an EKS cluster at deploy time.

Server-side apply over the cluster's (private) HTTPS endpoint, authenticated with an EKS token
(a presigned STS GetCallerIdentity, as `aws eks get-token` makes), so the function needs
neither kubectl nor a Kubernetes client library. Properties: `ClusterName`, `Manifests` (a
JSON list of objects: CloudFormation turns every scalar property into a string, so the
objects travel as one JSON string to keep their numbers and booleans), and `Rbac` with
`PrincipalArn`: the ClusterRole and binding that give this handler's Kubernetes group exactly
the kinds it applies. Create and Update apply every object (re-applying changes nothing) and
delete the objects a previous version had and this one dropped; Delete removes them all.

The handler has no standing cluster-admin: its access entry only names a Kubernetes group.
When the RBAC objects are missing or must grow (the first deploy, a new kind), it associates
AmazonEKSClusterAdminPolicy with its own access entry, applies them, and disassociates it
again before it applies anything else (EKS User Guide, "Associate access policies with
access entries"; its role may associate that one policy with its own entry only).

Controllers that grant themselves RBAC (Karpenter, Kueue) cannot be applied with a narrow role:
Kubernetes refuses to let anyone create a role granting more than it holds. `Bundles` (files of
pinned third-party objects shipped beside this handler under `bundles/`, each named with its
SHA-256) and `Privileged` (kiln's own objects of that kind) are therefore applied under the
same moment of cluster-admin, and only when they differ from the previous deploy's; a
`Manifests` object with the identity of a bundle object replaces it there (kiln's Kueue
configuration). Objects of kinds that a CRD of the same deploy defines, or that a webhook not
yet serving must admit, are retried until the API server takes them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # in the Lambda runtime
from botocore.signers import RequestSigner  # type: ignore[import-untyped]

LOG = logging.getLogger(__name__)
LOG.setLevel(logging.INFO)

FIELD_MANAGER = "kiln"
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
# The kinds kiln applies, with their REST plural and whether they live in a namespace.
KINDS: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "ServiceAccount": ("serviceaccounts", True),
    "ConfigMap": ("configmaps", True),
    "Secret": ("secrets", True),
    "Service": ("services", True),
    "DaemonSet": ("daemonsets", True),
    "Deployment": ("deployments", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "PriorityClass": ("priorityclasses", False),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "MutatingWebhookConfiguration": ("mutatingwebhookconfigurations", False),
    "ValidatingWebhookConfiguration": ("validatingwebhookconfigurations", False),
    "APIService": ("apiservices", False),
    # Karpenter
    "NodePool": ("nodepools", False),
    "EC2NodeClass": ("ec2nodeclasses", False),
    # Kueue
    "ResourceFlavor": ("resourceflavors", False),
    "ClusterQueue": ("clusterqueues", False),
    "LocalQueue": ("localqueues", True),
}
# Answers that mean "not yet": a CRD not established (404 on its kind's path), a webhook whose
# pods are not serving (500 "failed calling webhook"), an API service not available (503).
_NOT_YET = ("failed calling webhook", "the server could not find the requested resource")
CLUSTER_ADMIN = "AmazonEKSClusterAdminPolicy"


class Forbidden(RuntimeError):
    """The API server refused the request (HTTP 403): the caller lacks the RBAC for it."""


class NotYet(RuntimeError):
    """The API server cannot take the object yet (its CRD or webhook is still coming up)."""


def object_path(manifest: dict[str, Any]) -> str:
    """The REST path of one object, e.g. `/apis/apps/v1/namespaces/kube-system/daemonsets/x`."""
    kind = manifest.get("kind", "")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one this handler applies; allowed: {sorted(KINDS)}")
    plural, namespaced = KINDS[kind]
    api_version = manifest["apiVersion"]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    name = manifest["metadata"]["name"]
    if namespaced:
        namespace = manifest["metadata"].get("namespace", "default")
        return f"{root}/namespaces/{namespace}/{plural}/{name}"
    return f"{root}/{plural}/{name}"


def eks_token(cluster: str, region: str, session: Any = None) -> str:
    """A bearer token for the cluster: `k8s-aws-v1.` + base64url(presigned GetCallerIdentity)."""
    session = session or boto3.session.Session()
    sts = session.client("sts", region_name=region)
    signer = RequestSigner(
        sts.meta.service_model.service_id,
        region,
        "sts",
        "v4",
        session.get_credentials(),
        session.events,
    )
    url = signer.generate_presigned_url(
        {
            "method": "GET",
            "url": f"https://sts.{region}.amazonaws.com/"
            "?Action=GetCallerIdentity&Version=2011-06-15",
            "body": {},
            "headers": {"x-k8s-aws-id": cluster},
            "context": {},
        },
        region_name=region,
        expires_in=60,
        operation_name="",
    )
    return "k8s-aws-v1." + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


Send = Callable[[str, str, bytes | None, str], tuple[int, bytes]]


class Cluster:
    """Talks to one cluster's API server; `send(method, path, body, content_type)`."""

    def __init__(self, endpoint: str, ca_data: str, token: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        # Only the cluster's own CA is trusted for its endpoint.
        self.context = ssl.create_default_context(cadata=base64.b64decode(ca_data).decode())

    def send(
        self, method: str, path: str, body: bytes | None, content_type: str
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.endpoint + path,
            data=body,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": content_type,
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


def apply(send: Send, manifest: dict[str, Any]) -> None:
    """Server-side apply of one object; raises with the API server's message on failure."""
    path = object_path(manifest) + f"?fieldManager={FIELD_MANAGER}&force=true"
    status, body = send(
        "PATCH", path, json.dumps(manifest).encode(), "application/apply-patch+yaml"
    )
    if status == 403:
        raise Forbidden(f"applying {_describe(manifest)}: HTTP 403: {_reason(body)}")
    reason = _reason(body)
    if status == 503 or (status in (404, 500) and any(s in reason for s in _NOT_YET)):
        raise NotYet(f"applying {_describe(manifest)}: HTTP {status}: {reason}")
    if status >= 300:
        raise RuntimeError(f"applying {_describe(manifest)} failed: HTTP {status}: {_reason(body)}")


def delete(send: Send, manifest: dict[str, Any]) -> None:
    """Deletes one object; one that is already gone is fine."""
    status, body = send("DELETE", object_path(manifest), None, "application/json")
    if status >= 300 and status != 404:
        raise RuntimeError(f"deleting {_describe(manifest)} failed: HTTP {status}: {_reason(body)}")


def _describe(manifest: dict[str, Any]) -> str:
    meta = manifest.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{manifest.get('kind')} {where}{meta.get('name')}"


def _reason(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", body[:300]))
    except (ValueError, AttributeError):
        return body[:300].decode(errors="replace")


def _key(manifest: dict[str, Any]) -> str:
    return object_path(manifest)


def bundle_reference(file: str, directory: Path | None = None) -> dict[str, str]:
    """What a template names to apply one bundle: its file and SHA-256 (used at synth time)."""
    directory = directory or BUNDLES_DIR
    path = directory / file
    if not path.is_file():
        raise ValueError(
            f"no vendored bundle {file} in {directory}: pin a version that is vendored, or "
            "vendor it with scripts/vendor_cluster_bundles.py"
        )
    return {"file": file, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def load_bundle(reference: dict[str, str], directory: Path | None = None) -> list[dict[str, Any]]:
    """The objects of one vendored bundle, checked against the SHA-256 the template names."""
    directory = directory or BUNDLES_DIR
    path = directory / reference["file"]
    if path.parent != directory or not path.is_file():
        raise ValueError(f"no bundle {reference['file']!r} beside the handler")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != reference["sha256"]:
        raise ValueError(
            f"bundle {reference['file']} has SHA-256 {digest}, the template expects "
            f"{reference['sha256']}: redeploy from one commit"
        )
    objects: list[dict[str, Any]] = json.loads(data)["objects"]
    return objects


def privileged_objects(
    bundles: list[dict[str, str]],
    privileged: list[dict[str, Any]],
    overrides: list[dict[str, Any]],
    directory: Path | None = None,
) -> list[dict[str, Any]]:
    """The bundles' objects in order, each replaced by the override of the same identity, then
    `privileged`; overrides that replace a bundle object are not applied again later."""
    replacing = {_key(m): m for m in overrides}
    objects = [
        replacing.get(_key(obj), obj) for ref in bundles for obj in load_bundle(ref, directory)
    ]
    return objects + privileged


def apply_when_ready(
    send: Send,
    manifest: dict[str, Any],
    *,
    attempts: int = 60,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """`apply`, retried every 10 s while the API server answers "not yet"."""
    for attempt in range(attempts):
        try:
            apply(send, manifest)
            return
        except NotYet as err:
            if attempt == attempts - 1:
                raise RuntimeError(f"{err} (still refused after {attempts} tries)") from err
            LOG.info("%s; retrying", err)
            sleep(10.0)


def reconcile(
    send: Send,
    manifests: list[dict[str, Any]],
    previous: list[dict[str, Any]],
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Applies `manifests` in order, then deletes what only `previous` had (in reverse)."""
    done = []
    for manifest in manifests:
        apply_when_ready(send, manifest, sleep=sleep)
        done.append(f"applied {_describe(manifest)}")
    current = {_key(m) for m in manifests}
    for manifest in reversed(previous):
        if _key(manifest) not in current:
            delete(send, manifest)
            done.append(f"deleted {_describe(manifest)}")
    return done


@contextlib.contextmanager
def cluster_admin_for_a_moment(
    eks: Any, cluster: str, principal_arn: str, partition: str = "aws"
) -> Iterator[None]:
    """Associates AmazonEKSClusterAdminPolicy with the handler's own access entry for the
    duration of the block, and always disassociates it again."""
    policy = f"arn:{partition}:eks::aws:cluster-access-policy/{CLUSTER_ADMIN}"
    eks.associate_access_policy(
        clusterName=cluster,
        principalArn=principal_arn,
        policyArn=policy,
        accessScope={"type": "cluster"},
    )
    LOG.info("associated %s with %s to bootstrap RBAC", CLUSTER_ADMIN, principal_arn)
    try:
        yield
    finally:
        eks.disassociate_access_policy(
            clusterName=cluster, principalArn=principal_arn, policyArn=policy
        )
        LOG.info("disassociated %s from %s", CLUSTER_ADMIN, principal_arn)


def ensure_rbac(
    send: Send,
    rbac: list[dict[str, Any]],
    elevate: Callable[[], contextlib.AbstractContextManager[None]],
    *,
    attempts: int = 12,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Applies the handler's own RBAC objects; when it may not (they are missing, or grow),
    does so under a moment of cluster-admin, retrying while the association propagates."""
    try:
        for manifest in rbac:
            apply(send, manifest)
        return "RBAC current"
    except Forbidden as err:
        LOG.info("RBAC needs bootstrapping: %s", err)
    with elevate():
        for attempt in range(attempts):
            try:
                for manifest in rbac:
                    apply(send, manifest)
                return "RBAC bootstrapped"
            except Forbidden:
                if attempt == attempts - 1:
                    raise
                sleep(5.0)
    raise AssertionError("unreachable")


def connect(cluster_name: str, eks: Any = None, session: Any = None) -> Send:
    """A `send` function for the named cluster, found through the EKS API."""
    session = session or boto3.session.Session()
    eks = eks or session.client("eks")
    info = eks.describe_cluster(name=cluster_name)["cluster"]
    token = eks_token(cluster_name, eks.meta.region_name, session)
    return Cluster(info["endpoint"], info["certificateAuthority"]["data"], token).send


def on_event(
    event: dict[str, Any],
    context: Any = None,
    *,
    send: Send | None = None,
    eks: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """The Provider framework's onEvent entry point."""
    del context
    properties = event["ResourceProperties"]
    cluster = properties["ClusterName"]
    physical_id = event.get("PhysicalResourceId") or f"{cluster}/kiln-manifests"
    request = event["RequestType"]
    manifests = json.loads(properties["Manifests"])
    if request == "Delete":
        try:
            send = send or connect(cluster)
        except Exception as err:  # a cluster that never came up or is gone holds nothing
            LOG.warning("delete: cluster %s unreachable (%s); nothing to remove", cluster, err)
            return {"PhysicalResourceId": physical_id}
        for manifest in reversed(manifests):
            delete(send, manifest)
        # Controllers and CRDs last (a CRD's deletion removes its objects too), under the same
        # moment of cluster-admin they were applied with; a refused delete is logged, not
        # fatal, so the stack can go.
        extra = privileged_objects(
            json.loads(properties.get("Bundles", "[]")),
            json.loads(properties.get("Privileged", "[]")),
            [],
        )
        if extra:
            principal = properties["PrincipalArn"]
            eks = eks or boto3.client("eks")
            with cluster_admin_for_a_moment(eks, cluster, principal, principal.split(":")[1]):
                for manifest in reversed(extra):
                    try:
                        delete(send, manifest)
                    except RuntimeError as err:
                        LOG.warning("delete: %s", err)
        return {"PhysicalResourceId": physical_id}
    send = send or connect(cluster)
    rbac = json.loads(properties.get("Rbac", "[]"))
    old_properties = event.get("OldResourceProperties", {})
    bundles = json.loads(properties.get("Bundles", "[]"))
    privileged = json.loads(properties.get("Privileged", "[]"))
    changed = request == "Create" or any(
        properties.get(key, "[]") != old_properties.get(key, "[]")
        for key in ("Bundles", "Privileged")
    )
    outcomes = []
    principal = properties.get("PrincipalArn", "")
    partition = principal.split(":")[1] if principal else "aws"
    eks = eks or (boto3.client("eks") if rbac or (changed and (bundles or privileged)) else None)
    if rbac:
        outcomes.append(
            ensure_rbac(
                send,
                rbac,
                lambda: cluster_admin_for_a_moment(eks, cluster, principal, partition),
                sleep=sleep,
            )
        )
    if changed and (bundles or privileged):
        objects = privileged_objects(bundles, privileged, manifests)
        with cluster_admin_for_a_moment(eks, cluster, principal, partition):
            outcomes += _with_rbac_retry(lambda: reconcile(send, objects, [], sleep), sleep)
    plain = manifests
    if changed and bundles:  # overrides of bundle objects went in with their bundle
        replaced = {_key(o) for ref in bundles for o in load_bundle(ref)}
        plain = [m for m in manifests if _key(m) not in replaced]
    previous = json.loads(old_properties.get("Manifests", "[]"))
    outcomes += _with_rbac_retry(lambda: reconcile(send, plain, previous, sleep), sleep)
    LOG.info("%s on %s: %s", request, cluster, "; ".join(outcomes))
    return {"PhysicalResourceId": physical_id}


def _with_rbac_retry(step: Callable[[], list[str]], sleep: Callable[[float], None]) -> list[str]:
    """RBAC takes effect at once for new requests; a short retry covers API-server caches."""
    for attempt in range(6):
        try:
            return step()
        except Forbidden:
            if attempt == 5:
                raise
            sleep(5.0)
    raise AssertionError("unreachable")
