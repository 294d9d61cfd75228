"""The CEL rules of a CRD schema (`x-kubernetes-validations`), evaluated offline on an object as
the API server does on create: defaults applied first, `self` bound to the value at each schema
node that carries rules, every rule of a present node evaluated, a false result (or an evaluation
error, which the API server also refuses) reported with the rule's message and the object's path.

jsonschema checks the OpenAPI part of a CRD; this is the rest. The evaluator is cel-python
(`celpy`, pinned in the `dev` extra) with the few functions of Kubernetes' CEL libraries that the
vendored rules use and celpy lacks (`KUBERNETES_FUNCTIONS`). `census` sorts every rule of a
schema into evaluated, transition (skipped on create) or unsupported, so that no rule is ever
skipped without a test knowing it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import celpy
import lark
import re2  # type: ignore[import-untyped]  # google-re2 (celpy uses it) ships no stubs
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

# --- Kubernetes' CEL libraries that celpy lacks ----------------------------------------------
# https://kubernetes.io/docs/reference/using-api/cel/ ("Kubernetes CEL libraries"): the strings
# extension is cel-go's ext.Strings, the regex library k8s.io/apiserver/pkg/cel/library/regex.go.
# Both use Go semantics: RE2 regular expressions, strings.SplitN.


def _go_split(text: str, sep: str, limit: int) -> list[str]:
    """Go's strings.SplitN: limit < 0 all parts, 0 none, n at most n (the last one the rest);
    an empty separator splits into characters."""
    if limit == 0:
        return []
    if sep == "":
        chars = list(text)
        if 0 < limit < len(chars):
            return [*chars[: limit - 1], "".join(chars[limit - 1 :])]
        return chars
    return text.split(sep) if limit < 0 else text.split(sep, limit - 1)


def cel_split(
    text: celtypes.StringType, sep: celtypes.StringType, limit: celtypes.IntType | None = None
) -> celtypes.ListType:
    """`<string>.split(<string>) -> list(string)`, `<string>.split(<string>, <int>)`."""
    parts = _go_split(str(text), str(sep), -1 if limit is None else int(limit))
    return celtypes.ListType([celtypes.StringType(p) for p in parts])


def cel_find(text: celtypes.StringType, pattern: celtypes.StringType) -> Any:
    """`<string>.find(<string>) -> string`: the first match of an RE2 pattern, '' if none."""
    try:
        match = re2.search(str(pattern), str(text))
    except re2.error as err:
        return CELEvalError("invalid regex", type(err), err.args)
    return celtypes.StringType(match.group(0) if match else "")


def cel_find_all(
    text: celtypes.StringType, pattern: celtypes.StringType, limit: celtypes.IntType | None = None
) -> Any:
    """`<string>.findAll(<string>) -> list(string)`, `.findAll(<string>, <int>)`: every
    non-overlapping match (at most `limit` when it is not negative)."""
    n = -1 if limit is None else int(limit)
    found: list[celtypes.Value] = []
    try:
        matches = list(re2.finditer(str(pattern), str(text)))
    except re2.error as err:
        return CELEvalError("invalid regex", type(err), err.args)
    for match in matches:
        if 0 <= n <= len(found):
            break
        found.append(celtypes.StringType(match.group(0)))
    return celtypes.ListType(found)


KUBERNETES_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "split": cel_split,
    "find": cel_find,
    "findAll": cel_find_all,
}
# CEL's macros (expanded by the parser, not looked up as functions).
MACROS = frozenset({"has", "all", "exists", "exists_one", "map", "filter", "dyn"})
KNOWN_FUNCTIONS = frozenset(celpy.evaluation.base_functions) | set(KUBERNETES_FUNCTIONS) | MACROS

_ENV = celpy.Environment()

# Rules of the vendored CRDs that are not evaluated on create, besides the transition rules
# (`oldSelf`, which the API server evaluates on update only): rule text -> why. Empty: every
# other rule of Karpenter 1.14.1, Kueue v0.19.2 and Kubeflow Trainer v2.3.0 is evaluated. A new
# release's rule that cannot be evaluated fails tests/test_crd_cel.py until it is listed here.
NOT_EVALUATED: dict[str, str] = {}


@dataclass(frozen=True)
class Compiled:
    """One rule, compiled once: `program` is None when it cannot be evaluated on create, with
    `skipped` saying why ('transition' for oldSelf rules, else what is missing)."""

    program: celpy.Runner | None
    skipped: str | None
    functions: frozenset[str]


def _called(tree: lark.Tree[lark.Token]) -> set[str]:
    """The names of the functions and methods a parsed rule calls."""
    names = set()
    for node in tree.iter_subtrees():
        if node.data == "ident_arg":
            names.add(str(node.children[0]))
        elif node.data == "member_dot_arg":
            names.add(str(node.children[1]))
    return names


def _idents(tree: lark.Tree[lark.Token]) -> set[str]:
    return {str(n.children[0]) for n in tree.iter_subtrees() if n.data == "ident"}


@cache
def compile_rule(rule: str, optional_old_self: bool = False) -> Compiled:
    """The rule compiled (cached: a schema's rules are compiled once per test session)."""
    try:
        tree = _ENV.compile(rule)
    except CELParseError as err:
        return Compiled(None, f"celpy cannot parse it: {err}".splitlines()[0], frozenset())
    functions = frozenset(_called(tree))
    if "oldSelf" in _idents(tree):
        if optional_old_self:
            # Evaluated on create with oldSelf = optional.none(); celpy has no optionals.
            return Compiled(None, "optionalOldSelf: celpy has no optional values", functions)
        # A transition rule: the API server evaluates it only on update, with both values.
        return Compiled(None, "transition", functions)
    missing = sorted(functions - KNOWN_FUNCTIONS)
    if missing:
        return Compiled(None, f"no implementation of {', '.join(missing)}", functions)
    return Compiled(_ENV.program(tree, functions=KUBERNETES_FUNCTIONS), None, functions)


# --- walking a schema ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A rule of a schema: where it sits (a schema path, list items as `[*]`, map values as
    `{*}`), its text, and whether it is evaluated on create."""

    path: str
    rule: str
    message: str
    skipped: str | None


def _children(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The sub-schemas a value's parts are judged by: properties, list items, map values."""
    for name, sub in schema.get("properties", {}).items():
        yield f".{name}", sub
    if isinstance(schema.get("items"), dict):
        yield "[*]", schema["items"]
    if isinstance(schema.get("additionalProperties"), dict):
        yield "{*}", schema["additionalProperties"]


def census(schema: dict[str, Any], path: str = "") -> list[Rule]:
    """Every rule the walk meets, each with its verdict."""
    rules = []
    for rule in schema.get("x-kubernetes-validations", []):
        compiled = compile_rule(rule["rule"], bool(rule.get("optionalOldSelf")))
        rules.append(Rule(path, rule["rule"], rule.get("message", ""), compiled.skipped))
    for step, sub in _children(schema):
        rules += census(sub, path + step)
    return rules


def all_rule_texts(schema: Any) -> list[str]:
    """Every rule anywhere in a schema, found without the walk's notion of where rules may sit
    (so that a rule under, say, `allOf` that the walk would never meet is noticed)."""
    found = []
    if isinstance(schema, dict):
        found += [r["rule"] for r in schema.get("x-kubernetes-validations", [])]
        for value in schema.values():
            found += all_rule_texts(value)
    elif isinstance(schema, list):
        for value in schema:
            found += all_rule_texts(value)
    return found


# --- defaulting and CEL values -----------------------------------------------------------


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting, as the API server does before validating: a missing property
    with a `default` gets it (a null one too unless nullable), then every property is
    defaulted in turn, the ones just set included."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if "default" in sub and (
                name not in value or (value[name] is None and not sub.get("nullable"))
            ):
                value[name] = copy.deepcopy(sub["default"])
        for name, item in value.items():
            if name in props:
                apply_defaults(item, props[name])
            elif isinstance(schema.get("additionalProperties"), dict):
                apply_defaults(item, schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


# CEL's reserved words; a property so named is `__name__` to a rule.
_RESERVED = frozenset(
    {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for"}
    | {"function", "if", "import", "let", "loop", "package", "namespace", "return", "var"}
    | {"void", "while"}
)
_IDENT = re.compile(r"[a-zA-Z_.\-/][a-zA-Z0-9_.\-/]*")


def escape_property(name: str) -> str | None:
    """A property's name as CEL sees it (Kubernetes' escaping), None if CEL cannot see it."""
    if name in _RESERVED:
        return f"__{name}__"
    if not _IDENT.fullmatch(name):
        return None
    for raw, escaped in (("__", "__underscores__"), (".", "__dot__"), ("-", "__dash__")):
        name = name.replace(raw, escaped)
    return name.replace("/", "__slash__")


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """A JSON value as a CEL value of its schema's type: integer -> int, number -> double,
    date-time strings -> timestamp, objects with properties -> maps of their (escaped) fields,
    maps -> maps, arrays -> lists; anything the schema leaves open as JSON gives it."""
    if value is None:
        return None
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out: dict[Any, Any] = {}
        for name, item in value.items():
            if name in props:
                key = escape_property(name)
                if key is not None:
                    out[celtypes.StringType(key)] = to_cel(item, props[name])
            elif isinstance(extra, dict):
                out[celtypes.StringType(name)] = to_cel(item, extra)
            else:
                out[celtypes.StringType(name)] = json_to_cel(item)
        return celtypes.MapType(out)
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return celtypes.ListType([to_cel(v, items or {}) for v in value])
    kind = schema.get("type")
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number" and isinstance(value, int | float):
        return celtypes.DoubleType(value)
    if isinstance(value, str) and schema.get("format") == "date-time":
        return celtypes.TimestampType(datetime.fromisoformat(value.replace("Z", "+00:00")))
    return json_to_cel(value)


# --- evaluation ------------------------------------------------------------------------------


class CELValidationError(ValueError):
    """What the API server would answer: every failed rule (`failures`), with its path."""

    def __init__(self, kind: str, name: str, failures: list[str]) -> None:
        self.failures = failures
        super().__init__(f'{kind} "{name}" is invalid: ' + "; ".join(failures))


@cache
def _message_program(expression: str) -> celpy.Runner | None:
    try:
        return _ENV.program(_ENV.compile(expression), functions=KUBERNETES_FUNCTIONS)
    except CELParseError:
        return None


def _message(rule: dict[str, Any], activation: dict[str, Any]) -> str:
    program = _message_program(rule["messageExpression"]) if "messageExpression" in rule else None
    if program is not None:
        try:
            return str(program.evaluate(activation))
        except CELEvalError:
            pass  # The API server falls back to `message` too.
    return str(rule.get("message") or f"failed rule: {rule['rule']}")


def _evaluate(
    value: Any, schema: dict[str, Any], path: str, failures: list[str], evaluated: list[str]
) -> None:
    if value is None:
        return  # A null (nullable) value meets no rule.
    rules = schema.get("x-kubernetes-validations", [])
    if rules:
        activation = {"self": to_cel(value, schema)}
        for rule in rules:
            compiled = compile_rule(rule["rule"], bool(rule.get("optionalOldSelf")))
            if compiled.program is None:
                continue  # transition rules (update only); unsupported ones are in the census
            where = (path + rule.get("fieldPath", "")).lstrip(".") or "<root>"
            evaluated.append(rule["rule"])
            result: Any
            try:
                result = compiled.program.evaluate(activation)
            except CELEvalError as err:
                result = err
            if isinstance(result, CELEvalError):
                # The API server refuses the object too (a missing field, a bad pattern).
                error = f"(evaluation error: {result.args[0]})"
                failures.append(f"{where}: Invalid value: {_message(rule, activation)} {error}")
            elif not (isinstance(result, celtypes.BoolType) and bool(result)):
                failures.append(f"{where}: Invalid value: {_message(rule, activation)}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in props:
                _evaluate(item, props[name], f"{path}.{name}".lstrip("."), failures, evaluated)
            elif isinstance(extra, dict):
                _evaluate(item, extra, f"{path}[{name}]", failures, evaluated)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _evaluate(item, schema["items"], f"{path}[{i}]", failures, evaluated)


def evaluate(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every CEL rule of `schema` that an object meets on create, evaluated; returns the rules
    evaluated, raises CELValidationError naming every failed one."""
    body = apply_defaults(copy.deepcopy(obj), schema)
    # At the root, rules see only metadata.name and metadata.generateName (Kubernetes' rule).
    meta = body.get("metadata", {})
    body["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
    root = {
        **schema,
        "properties": {
            **schema.get("properties", {}),
            "metadata": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}},
            },
        },
    }
    failures: list[str] = []
    evaluated: list[str] = []
    _evaluate(body, root, "", failures, evaluated)
    if failures:
        raise CELValidationError(obj.get("kind", "object"), meta.get("name", ""), failures)
    return evaluated
