"""The offline CEL evaluator of CRD rules (tests/crd_cel.py): Kubernetes' library functions it
adds, with Go's semantics; defaulting and field escaping as the API server does them; and the
safety net: every rule of every vendored CRD is evaluated on create, or is a transition rule,
or is listed in NOT_EVALUATED with why. Nothing is skipped silently."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from tests import crd_cel
from tests.support import REPO

# Every vendored CRD: Karpenter's and Kueue's bundles, the Kubeflow Trainer schemas.
BUNDLES = REPO / "platform_constructs" / "handlers" / "bundles"
TRAINER = REPO / "tests" / "kiln_cli" / "schemas"


def vendored() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(source, apiVersion, kind) -> openAPIV3Schema of every CRD version vendored."""
    schemas = {}
    for path in sorted(BUNDLES.glob("*.json")):
        for obj in json.loads(path.read_text())["objects"]:
            if obj["kind"] == "CustomResourceDefinition":
                spec = obj["spec"]
                for version in spec["versions"]:
                    key = (path.stem, f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    for path in sorted(TRAINER.glob("*/*.json")):
        doc = json.loads(path.read_text())
        key = (path.parent.name, f"{doc['group']}/{doc['version']}", doc["kind"])
        schemas[key] = doc["openAPIV3Schema"]
    return schemas


def run(rule: str, value: Any) -> Any:
    compiled = crd_cel.compile_rule(rule)
    assert compiled.program is not None, compiled.skipped
    return compiled.program.evaluate({"self": json_to_cel(value)})


@pytest.mark.parametrize(
    ("rule", "value", "expected"),
    [
        # strings extension (cel-go ext.Strings: Go's strings.SplitN)
        ("self.split('@')", "al2023@latest", ["al2023", "latest"]),
        ("self.split('@')", "no-separator", ["no-separator"]),
        ("self.split('@')", "", [""]),
        ("self.split('')", "abc", ["a", "b", "c"]),
        ("self.split(',', 2)", "a,b,c", ["a", "b,c"]),
        ("self.split(',', 0)", "a,b,c", []),
        ("self.split(',', -1)", "a,b,c", ["a", "b", "c"]),
        ("self.split('', 2)", "abc", ["a", "bc"]),
        # regex library (k8s.io/apiserver/pkg/cel/library/regex.go: RE2, first match or '')
        ("self.find('^[^@]+')", "bottlerocket@v1.2", "bottlerocket"),
        ("self.find('^([^/]+)')", "karpenter.sh/nodepool", "karpenter.sh"),
        ("self.find('[0-9]+')", "abc", ""),
        ("self.findAll('[0-9]+')", "a1b22c333", ["1", "22", "333"]),
        ("self.findAll('[0-9]+', 2)", "a1b22c333", ["1", "22"]),
        ("self.findAll('[0-9]+', 0)", "a1b22c333", []),
        # celpy's own, as the vendored rules use them
        ("self.matches('^[a-z]+$')", "abc", True),
        ("self.matches('b')", "abc", True),  # CEL matches is a search, not a full match
        ("int(self[0]) >= 0", ["12"], True),
        ("[has(self.a), has(self.b)].filter(x, x).size() <= 1", {"a": 1, "b": 2}, False),
    ],
)
def test_kubernetes_library_functions(rule: str, value: Any, expected: Any) -> None:
    assert run(rule, value) == expected


def test_an_invalid_pattern_is_an_evaluation_error_not_a_crash() -> None:
    with pytest.raises(CELEvalError):
        run("self.find('(') == ''", "x")


def test_property_names_are_escaped_as_kubernetes_does() -> None:
    assert crd_cel.escape_property("namespace") == "__namespace__"
    assert crd_cel.escape_property("foo-bar.baz/q") == "foo__dash__bar__dot__baz__slash__q"
    assert crd_cel.escape_property("a__b") == "a__underscores__b"
    assert crd_cel.escape_property("x y") is None
    schema = {
        "type": "object",
        "properties": {"max-count": {"type": "integer"}},
        "x-kubernetes-validations": [{"rule": "self.max__dash__count <= 3", "message": "max"}],
    }
    crd_cel.evaluate({"max-count": 3}, schema)
    with pytest.raises(crd_cel.CELValidationError, match="<root>: Invalid value: max"):
        crd_cel.evaluate({"max-count": 4}, schema)


def test_defaults_are_applied_before_the_rules_and_null_meets_no_rule() -> None:
    schema = {
        "type": "object",
        "properties": {
            "policy": {
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "default": "Never"},
                    "limit": {"type": "integer", "nullable": True},
                },
                "x-kubernetes-validations": [
                    {"rule": "self.mode == 'Never' || has(self.limit)", "message": "limit"},
                ],
            },
            "ratio": {
                "type": "number",
                "nullable": True,
                "x-kubernetes-validations": [{"rule": "self <= 1.0", "message": "ratio"}],
            },
        },
    }
    # `mode` absent: without defaulting `self.mode` would be an error (no such key).
    assert crd_cel.evaluate({"policy": {}, "ratio": 1}, schema) == [
        "self.mode == 'Never' || has(self.limit)",
        "self <= 1.0",  # an integer where the schema says number is a CEL double
    ]
    assert crd_cel.evaluate({"ratio": None}, schema) == []
    with pytest.raises(crd_cel.CELValidationError, match=r"policy: Invalid value: limit"):
        crd_cel.evaluate({"policy": {"mode": "Any"}}, schema)


def test_an_evaluation_error_refuses_the_object_with_the_rules_message() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}},
        "x-kubernetes-validations": [{"rule": "self.a.b == 'x'", "message": "b must be x"}],
    }
    with pytest.raises(
        crd_cel.CELValidationError, match=r"b must be x \(evaluation error: no such member"
    ):
        crd_cel.evaluate({"a": {}}, schema)


def test_message_expression_and_field_path_name_what_failed() -> None:
    schema = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"}}},
        "x-kubernetes-validations": [
            {
                "rule": "size(self.items) <= 2",
                "messageExpression": "'at most 2 items, got ' + string(size(self.items))",
                "fieldPath": ".items",
            },
            {"rule": "self.items.all(i, i != '')"},
        ],
    }
    with pytest.raises(crd_cel.CELValidationError) as err:
        crd_cel.evaluate({"items": ["a", "", "c"]}, schema)
    assert err.value.failures == [
        "items: Invalid value: at most 2 items, got 3",
        "<root>: Invalid value: failed rule: self.items.all(i, i != '')",
    ]


def test_transition_rules_are_skipped_on_create_and_root_sees_only_name() -> None:
    assert crd_cel.compile_rule("self == oldSelf").skipped == "transition"
    schema = {
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.spec == oldSelf.spec", "message": "immutable"},
            {"rule": "!has(self.metadata.labels)", "message": "labels are not visible"},
        ],
        "properties": {"spec": {"type": "object"}},
    }
    obj = {"metadata": {"name": "n", "labels": {"a": "b"}}, "spec": {}}
    assert crd_cel.evaluate(obj, schema) == ["!has(self.metadata.labels)"]


def test_no_vendored_rule_is_skipped_silently() -> None:
    """The safety net: a new release's rules are evaluated automatically; one that cannot be
    (a library function missing here, syntax celpy lacks) fails until it is implemented or
    listed in crd_cel.NOT_EVALUATED with why, and a listed rule that no longer exists fails."""
    unlisted, listed_seen = [], set()
    counts: dict[str, Counter[str]] = {}
    for (source, api_version, kind), schema in vendored().items():
        rules = crd_cel.census(schema)
        # The walk meets every rule of the schema (none hides under allOf or the like).
        assert Counter(r.rule for r in rules) == Counter(crd_cel.all_rule_texts(schema)), kind
        counts[f"{source} {api_version} {kind}"] = Counter(
            "evaluated" if r.skipped is None else r.skipped for r in rules
        )
        for r in rules:
            if r.skipped in (None, "transition"):
                continue
            if r.rule in crd_cel.NOT_EVALUATED:
                listed_seen.add(r.rule)
            else:
                unlisted.append(f"{kind} {r.path}: {r.rule} ({r.skipped})")
    assert unlisted == []
    assert set(crd_cel.NOT_EVALUATED) == listed_seen, "NOT_EVALUATED names rules no CRD has"
    # What is evaluated on create, per CRD kind kiln renders (the report's figures).
    assert counts["karpenter-1.14.1 karpenter.k8s.aws/v1 EC2NodeClass"] == {"evaluated": 54}
    assert counts["karpenter-1.14.1 karpenter.sh/v1 NodePool"] == {
        "evaluated": 17,
        "transition": 3,
    }
    for kind, evaluated, transition in [
        ("ResourceFlavor", 7, 3),
        ("ClusterQueue", 4, 0),
        ("LocalQueue", 0, 1),
    ]:
        expected = {"evaluated": evaluated, "transition": transition}
        assert counts[f"kueue-v0.19.2 kueue.x-k8s.io/v1beta2 {kind}"] == {
            k: n for k, n in expected.items() if n
        }
    assert counts["kubeflow-trainer-v2.3.0 trainer.kubeflow.org/v1alpha1 TrainJob"] == {
        "evaluated": 6,
        "transition": 13,
    }
    assert counts["kubeflow-trainer-v2.3.0 trainer.kubeflow.org/v1alpha1 TrainingRuntime"] == {
        "evaluated": 5,
        "transition": 6,
    }
