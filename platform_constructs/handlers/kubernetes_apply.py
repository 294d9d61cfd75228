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
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import boto3  # type: ignore[import-untyped]  # in the Lambda runtime
from botocore.signers import RequestSigner  # type: ignore[import-untyped]

LOG = logging.getLogger(__name__)
LOG.setLevel(logging.INFO)

FIELD_MANAGER = "kiln"
# The kinds kiln applies, with their REST plural and whether they live in a namespace.
KINDS: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "ServiceAccount": ("serviceaccounts", True),
    "ConfigMap": ("configmaps", True),
    "DaemonSet": ("daemonsets", True),
    "Deployment": ("deployments", True),
    "PriorityClass": ("priorityclasses", False),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
}
CLUSTER_ADMIN = "AmazonEKSClusterAdminPolicy"


class Forbidden(RuntimeError):
    """The API server refused the request (HTTP 403): the caller lacks the RBAC for it."""


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


def reconcile(
    send: Send, manifests: list[dict[str, Any]], previous: list[dict[str, Any]]
) -> list[str]:
    """Applies `manifests` in order, then deletes what only `previous` had (in reverse)."""
    done = []
    for manifest in manifests:
        apply(send, manifest)
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
        return {"PhysicalResourceId": physical_id}
    send = send or connect(cluster)
    rbac = json.loads(properties.get("Rbac", "[]"))
    outcomes = []
    if rbac:
        principal = properties["PrincipalArn"]
        eks = eks or boto3.client("eks")
        partition = principal.split(":")[1]
        outcomes.append(
            ensure_rbac(
                send,
                rbac,
                lambda: cluster_admin_for_a_moment(eks, cluster, principal, partition),
                sleep=sleep,
            )
        )
    # RBAC takes effect at once for new requests; a short retry covers API-server caches.
    for attempt in range(6):
        try:
            previous = json.loads(event.get("OldResourceProperties", {}).get("Manifests", "[]"))
            outcomes += reconcile(send, manifests, previous)
            break
        except Forbidden:
            if attempt == 5:
                raise
            sleep(5.0)
    LOG.info("%s on %s: %s", request, cluster, "; ".join(outcomes))
    return {"PhysicalResourceId": physical_id}
