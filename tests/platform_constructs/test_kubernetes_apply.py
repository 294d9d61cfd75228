"""The deploy-time Kubernetes applier: REST paths, server-side apply, the EKS token, and TLS to a
real HTTPS server on loopback standing in for the API server."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.credentials import Credentials
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from platform_constructs.handlers import kubernetes_apply as ka

NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "training"}}
ACCOUNT = {
    "apiVersion": "v1",
    "kind": "ServiceAccount",
    "metadata": {"name": "trainer", "namespace": "training"},
}
PLUGIN = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "nvidia-device-plugin", "namespace": "kube-system"},
    "spec": {"template": {"spec": {"containers": [{"name": "p", "image": "x"}]}}},
}


def test_rest_paths() -> None:
    assert ka.object_path(NAMESPACE) == "/api/v1/namespaces/training"
    assert ka.object_path(ACCOUNT) == "/api/v1/namespaces/training/serviceaccounts/trainer"
    assert ka.object_path(PLUGIN) == (
        "/apis/apps/v1/namespaces/kube-system/daemonsets/nvidia-device-plugin"
    )
    pool = {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "gpu"}}
    assert ka.object_path(pool) == "/apis/karpenter.sh/v1/nodepools/gpu"
    queue = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": "ml-gpu", "namespace": "training-ml"},
    }
    assert ka.object_path(queue) == (
        "/apis/kueue.x-k8s.io/v1beta2/namespaces/training-ml/localqueues/ml-gpu"
    )
    with pytest.raises(ValueError, match="kind 'Pod' is not one this handler applies"):
        ka.object_path({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "s"}})


class Recorder:
    """A `send` that records requests and answers from a table of (method, path) -> status."""

    def __init__(self, statuses: dict[tuple[str, str], int] | None = None) -> None:
        self.calls: list[tuple[str, str, Any, str]] = []
        self.statuses = statuses or {}

    def __call__(self, method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes]:
        self.calls.append((method, path, json.loads(body) if body else None, ctype))
        status = self.statuses.get((method, path.split("?")[0]), 200)
        return status, json.dumps({"message": f"status {status}"}).encode()


def event(
    request: str, manifests: list[dict[str, Any]], old: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "RequestType": request,
        "ResourceProperties": {"ClusterName": "kiln-dev", "Manifests": json.dumps(manifests)},
    }
    if old is not None:
        result["OldResourceProperties"] = {"Manifests": json.dumps(old)}
    return result


def test_create_server_side_applies_each_object_in_order() -> None:
    send = Recorder()
    result = ka.on_event(event("Create", [NAMESPACE, ACCOUNT, PLUGIN]), send=send)
    assert result == {"PhysicalResourceId": "kiln-dev/kiln-manifests"}
    assert [(m, p) for m, p, _, _ in send.calls] == [
        ("PATCH", "/api/v1/namespaces/training?fieldManager=kiln&force=true"),
        (
            "PATCH",
            "/api/v1/namespaces/training/serviceaccounts/trainer?fieldManager=kiln&force=true",
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/kube-system/daemonsets/nvidia-device-plugin"
            "?fieldManager=kiln&force=true",
        ),
    ]
    assert all(ctype == "application/apply-patch+yaml" for *_, ctype in send.calls)
    assert send.calls[2][2] == PLUGIN  # the object itself, numbers and booleans intact


def test_update_deletes_objects_the_new_version_dropped() -> None:
    send = Recorder()
    ka.on_event(event("Update", [NAMESPACE, ACCOUNT], old=[NAMESPACE, ACCOUNT, PLUGIN]), send=send)
    assert [m for m, *_ in send.calls] == ["PATCH", "PATCH", "DELETE"]
    assert send.calls[-1][1] == ka.object_path(PLUGIN)


def test_delete_removes_everything_in_reverse_and_tolerates_gone_objects() -> None:
    send = Recorder({("DELETE", ka.object_path(ACCOUNT)): 404})
    ka.on_event(event("Delete", [NAMESPACE, ACCOUNT, PLUGIN]), send=send)
    assert [p for _, p, _, _ in send.calls] == [
        ka.object_path(PLUGIN),
        ka.object_path(ACCOUNT),
        ka.object_path(NAMESPACE),
    ]


def test_api_server_refusal_fails_with_its_message() -> None:
    send = Recorder({("PATCH", ka.object_path(ACCOUNT)): 422})
    with pytest.raises(
        RuntimeError,
        match=r"applying ServiceAccount training/trainer failed: "
        r"HTTP 422: status 422",
    ):
        ka.on_event(event("Create", [NAMESPACE, ACCOUNT]), send=send)


def test_delete_of_an_unreachable_cluster_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(name: str) -> Any:
        raise RuntimeError("ResourceNotFoundException: No cluster found")

    monkeypatch.setattr(ka, "connect", unreachable)
    assert ka.on_event(event("Delete", [NAMESPACE])) == {
        "PhysicalResourceId": "kiln-dev/kiln-manifests"
    }


def static_session() -> boto3.session.Session:
    session = boto3.session.Session(region_name="us-east-1")
    creds = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    session._session._credentials = creds  # type: ignore[attr-defined]  # no AWS account here
    return session


def test_eks_token_is_a_presigned_get_caller_identity() -> None:
    token = ka.eks_token("kiln-dev", "us-east-1", static_session())
    assert token.startswith("k8s-aws-v1.")
    encoded = token.removeprefix("k8s-aws-v1.")
    url = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    assert parsed.netloc == "sts.us-east-1.amazonaws.com"
    assert query["Action"] == ["GetCallerIdentity"] and query["X-Amz-Expires"] == ["60"]
    assert "x-k8s-aws-id" in query["X-Amz-SignedHeaders"][0]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate, recording requests."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder: Path = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    seen: list[tuple[str, str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(("PATCH", self.path, self.headers["Authorization"], body))
            status = 200 if self.headers["Authorization"] == "Bearer k8s-aws-v1.test" else 401
            self.send_response(status)
            self.end_headers()
            self.wfile.write(json.dumps({"message": "ok" if status == 200 else "no"}).encode())

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ca = base64.b64encode(cert.public_bytes(serialization.Encoding.PEM)).decode()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca, seen
    server.shutdown()


def test_cluster_client_speaks_tls_with_the_cluster_ca_and_bearer_token(
    api_server: tuple[str, str, list],
) -> None:
    endpoint, ca, seen = api_server
    send = ka.Cluster(endpoint, ca, "k8s-aws-v1.test").send
    ka.apply(send, NAMESPACE)
    method, path, auth, body = seen[-1]
    assert (method, path, auth) == (
        "PATCH",
        "/api/v1/namespaces/training?fieldManager=kiln&force=true",
        "Bearer k8s-aws-v1.test",
    )
    assert json.loads(body) == NAMESPACE
    refused = ka.Cluster(endpoint, ca, "k8s-aws-v1.wrong").send
    with pytest.raises(RuntimeError, match="HTTP 401: no"):
        ka.apply(refused, NAMESPACE)


def test_cluster_client_rejects_a_server_the_ca_did_not_sign(
    api_server: tuple[str, str, list],
) -> None:
    endpoint, _, _ = api_server
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])
    now = datetime.datetime.now(datetime.UTC)
    other_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(other.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(other, hashes.SHA256())
    )
    ca = base64.b64encode(other_cert.public_bytes(serialization.Encoding.PEM)).decode()
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        ka.Cluster(endpoint, ca, "k8s-aws-v1.test").send(
            "PATCH", "/api/v1/namespaces/x", b"{}", "application/apply-patch+yaml"
        )


def test_connect_finds_endpoint_and_ca_through_eks(api_server: tuple[str, str, list]) -> None:
    endpoint, ca, seen = api_server
    session = static_session()
    eks = session.client("eks", region_name="us-east-1")
    with Stubber(eks) as stub:
        stub.add_response(
            "describe_cluster",
            {
                "cluster": {
                    "name": "kiln-dev",
                    "endpoint": endpoint,
                    "certificateAuthority": {"data": ca},
                }
            },
            {"name": "kiln-dev"},
        )
        send = ka.connect("kiln-dev", eks=eks, session=session)
    status, _ = send("PATCH", ka.object_path(NAMESPACE), b"{}", "application/apply-patch+yaml")
    assert status == 401  # a real signed token, which this test server does not accept
    assert seen[-1][2].startswith("Bearer k8s-aws-v1.")


# --- issue 17, item 4: its own RBAC, bootstrapped under a moment of cluster-admin ------------

RBAC_PATH = "/apis/rbac.authorization.k8s.io/v1/clusterroles/kiln:cluster-objects"


class FakeEks:
    """Records AssociateAccessPolicy/DisassociateAccessPolicy; `on_associate` runs after one."""

    def __init__(self, on_associate: Any = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.on_associate = on_associate

    def associate_access_policy(self, **kwargs: Any) -> None:
        self.calls.append(("associate", kwargs))
        if self.on_associate:
            self.on_associate()

    def disassociate_access_policy(self, **kwargs: Any) -> None:
        self.calls.append(("disassociate", kwargs))


def rbac_event(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    from platform_constructs.cluster_manifests import applier_rbac

    result = event("Create", manifests)
    result["ResourceProperties"]["Rbac"] = json.dumps(applier_rbac())
    result["ResourceProperties"]["PrincipalArn"] = "arn:aws:iam::123456789012:role/applier"
    return result


def test_rbac_in_place_needs_no_elevation() -> None:
    send, eks = Recorder(), FakeEks()
    ka.on_event(rbac_event([NAMESPACE]), send=send, eks=eks, sleep=lambda _: None)
    assert eks.calls == []
    paths = [c[1].split("?")[0] for c in send.calls]
    assert paths[0] == RBAC_PATH and paths[-1] == "/api/v1/namespaces/training"


def test_missing_rbac_is_bootstrapped_then_admin_is_dropped_before_anything_else() -> None:
    send = Recorder({("PATCH", RBAC_PATH): 403})
    eks = FakeEks(on_associate=lambda: send.statuses.clear())  # admin: RBAC now applies
    order: list[str] = []
    original = send.__call__

    def traced(method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes]:
        order.append(f"{method} {path.split('?')[0]} admin={len(eks.calls) % 2 == 1}")
        return original(method, path, body, ctype)

    ka.on_event(rbac_event([NAMESPACE]), send=traced, eks=eks, sleep=lambda _: None)
    assert [c[0] for c in eks.calls] == ["associate", "disassociate"]
    associate = eks.calls[0][1]
    assert associate["policyArn"] == (
        "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
    )
    assert associate["accessScope"] == {"type": "cluster"}
    assert associate["principalArn"] == "arn:aws:iam::123456789012:role/applier"
    # The namespace is applied after the disassociation, through the group's own RBAC.
    assert order[-1] == "PATCH /api/v1/namespaces/training admin=False"


def test_admin_is_dropped_even_when_bootstrapping_fails() -> None:
    send, eks = Recorder({("PATCH", RBAC_PATH): 403}), FakeEks()  # stays forbidden
    with pytest.raises(ka.Forbidden):
        ka.on_event(rbac_event([NAMESPACE]), send=send, eks=eks, sleep=lambda _: None)
    assert [c[0] for c in eks.calls] == ["associate", "disassociate"]


# --- bundles and privileged objects (issue 18) -------------------------------------------------

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "nodepools.karpenter.sh"},
}
BUNDLED_CONFIG = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "cfg", "namespace": "kueue-system"},
    "data": {"k": "theirs"},
}
OUR_CONFIG = {**BUNDLED_CONFIG, "data": {"k": "ours"}}
CONTROLLER_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "metadata": {"name": "karpenter"},
}
POOL = {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "gpu"}}


@pytest.fixture
def bundle_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"source": "test", "objects": [CRD, BUNDLED_CONFIG]}))
    monkeypatch.setattr(ka, "BUNDLES_DIR", tmp_path)
    return ka.bundle_reference("b.json", tmp_path)


def bundle_event(request: str, reference: dict[str, str], old: bool = False) -> dict[str, Any]:
    props = {
        "ClusterName": "kiln-dev",
        "Manifests": json.dumps([OUR_CONFIG, POOL]),
        "Privileged": json.dumps([CONTROLLER_ROLE]),
        "Bundles": json.dumps([reference]),
        "PrincipalArn": "arn:aws:iam::123456789012:role/applier",
    }
    result: dict[str, Any] = {"RequestType": request, "ResourceProperties": props}
    if old:
        result["OldResourceProperties"] = dict(props)
    return result


def test_bundles_and_privileged_objects_go_in_under_a_moment_of_admin(
    bundle_dir: dict[str, str],
) -> None:
    eks = FakeEks()
    send = Recorder()
    admin_during: list[tuple[str, bool]] = []
    original = send.__call__

    def traced(method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes]:
        admin_during.append((path.split("?")[0], len(eks.calls) % 2 == 1))
        return original(method, path, body, ctype)

    ka.on_event(bundle_event("Create", bundle_dir), send=traced, eks=eks, sleep=lambda _: None)
    assert [c[0] for c in eks.calls] == ["associate", "disassociate"]
    assert admin_during == [
        (ka.object_path(CRD), True),
        # Our ConfigMap takes the bundle's place (same identity), with our data.
        (ka.object_path(OUR_CONFIG), True),
        (ka.object_path(CONTROLLER_ROLE), True),
        # kiln's plain objects after admin is dropped; the override is not applied twice.
        (ka.object_path(POOL), False),
    ]
    config_body = [c[2] for c in send.calls if c[1].startswith(ka.object_path(OUR_CONFIG))]
    assert config_body == [OUR_CONFIG]


def test_unchanged_bundles_are_not_reapplied_and_need_no_admin(
    bundle_dir: dict[str, str],
) -> None:
    eks, send = FakeEks(), Recorder()
    ka.on_event(bundle_event("Update", bundle_dir, old=True), send=send, eks=eks)
    assert eks.calls == []
    assert [c[1].split("?")[0] for c in send.calls] == [
        ka.object_path(OUR_CONFIG),
        ka.object_path(POOL),
    ]


def test_objects_are_retried_until_their_crd_or_webhook_serves() -> None:
    answers = iter(
        [
            (404, "the server could not find the requested resource"),
            (500, 'Internal error occurred: failed calling webhook "vclusterqueue.kb.io"'),
            (200, "ok"),
        ]
    )
    slept: list[float] = []

    def send(method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes]:
        status, message = next(answers)
        return status, json.dumps({"message": message}).encode()

    ka.apply_when_ready(send, POOL, sleep=slept.append)
    assert slept == [10.0, 10.0]
    # Any other refusal fails at once with the API server's words.
    with pytest.raises(RuntimeError, match=r"HTTP 422: spec\.limits: Invalid value"):
        ka.apply_when_ready(
            lambda *a: (422, b'{"message": "spec.limits: Invalid value"}'),
            POOL,
            sleep=slept.append,
        )
